"""The one command line: ``medseg <subcommand>``. Each subcommand is a thin layer over the Python API.

The library logs and never prints; this module owns the handlers. Domain errors become one clear message
and exit status 2, never a traceback (STYLE.md 10, 11).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence

from medseg import __version__

SUBCOMMAND_MODULES = (
    "medseg.commands.inspect",
    "medseg.commands.convert",
    "medseg.synth.command",
    "medseg.commands.train",
    "medseg.commands.calibrate",
    "medseg.commands.training_range",
    "medseg.commands.train_detector",
    "medseg.commands.import_bundle",
    "medseg.commands.run",
    "medseg.commands.demo",
)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="medseg",
        description="Medical imaging analysis plugin: trusted DICOM in, segmentation with uncertainty out.",
    )
    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, tables or log lines")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug log lines")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(arguments)
    args.command_line = shlex.join(["medseg", *arguments])  # recorded in what a command writes
    level = logging.ERROR if args.quiet else logging.DEBUG if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from dicom_io.errors import DicomIOError

    try:
        return int(args.func(args))
    except (DicomIOError, ValueError, FileNotFoundError, NotADirectoryError) as err:
        print(f"medseg {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
