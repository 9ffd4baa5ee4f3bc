"""Shared fixtures: the real data in ../shared/data (read in place, never copied) and reference tools."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, share the cores between the workers (and the commands they start) instead of
    each worker's torch and OpenMP taking them all and thrashing."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(
            f"real test data not found at {SHARED_DATA}: the tests expect ../shared beside the checkout"
        )
    return SHARED_DATA


def dcm2niix_binary() -> str:
    """The dcm2niix of the PyPI wheel in this environment (a test dependency)."""
    found = shutil.which("dcm2niix", path=str(Path(sys.executable).parent)) or shutil.which("dcm2niix")
    if found is None:
        pytest.fail("dcm2niix is not installed: run scripts/setup.sh (it comes with the dev extra)")
    return found


def run_dcm2niix(source: Path, out: Path, *extra: str) -> list[Path]:
    """Convert ``source`` with dcm2niix into ``out``; returns the NIfTI files it wrote."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [dcm2niix_binary(), "-z", "n", "-b", "y", "-f", "%s_%e_%d", *extra, "-o", str(out), str(source)],
        check=True,
        capture_output=True,
    )
    return sorted(out.glob("*.nii"))


def reorient_like(
    reference_affine: npt.NDArray[np.float64], array: npt.NDArray[np.generic], affine: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.float64]]:
    """Permute/flip ``array`` (with its LPS affine) onto the index axes of ``reference_affine``.

    Both grids must share axes up to order and sign (as dcm2niix output and ours do); the returned affine
    maps the returned array's indices, so callers compare it with the reference affine.
    """
    m = np.linalg.inv(reference_affine[:3, :3]) @ affine[:3, :3]
    perm = [int(np.argmax(np.abs(m[:, i]))) for i in range(3)]  # their axis i -> our axis perm[i]
    if sorted(perm) != [0, 1, 2]:
        raise AssertionError(f"grids do not share axes: {np.round(m, 3)}")
    out = np.asarray(array)
    new_affine = affine.copy()
    for i in range(3):
        if m[perm[i], i] < 0:
            out = np.flip(out, axis=i)
            new_affine[:3, 3] = new_affine[:3, 3] + new_affine[:3, i] * (array.shape[i] - 1)
            new_affine[:3, i] = -new_affine[:3, i]
    order = [perm.index(j) for j in range(3)]
    out = np.transpose(out, order)
    new_affine[:3, :3] = new_affine[:3, order]
    return out, new_affine
