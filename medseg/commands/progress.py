"""Progress bars for the command line (hidden by ``--quiet``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@contextmanager
def progress_bar(description: str, *, quiet: bool) -> Iterator[Callable[[int, int], None]]:
    """A ``(done, total)`` callback drawing one bar on stderr; a no-op when quiet."""
    if quiet:
        yield lambda done, total: None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


@contextmanager
def status_bar(label: str, console: Console, *, quiet: bool) -> Iterator[Callable[[int, int, str], None]]:
    """A ``(done, total, status)`` callback drawing one bar with the time left and a status line (the
    training commands' epoch and loss); a no-op when quiet."""
    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=True,
        disable=quiet,
    ) as bar:
        task = bar.add_task("", total=None)

        def update(done: int, total: int, status: str) -> None:
            bar.update(task, completed=done, total=total, description=status)

        yield update
