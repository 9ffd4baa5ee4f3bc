"""A tiny variant of the default spec: same labels, codes and settings, a network small enough for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from medseg.cli import main
from medseg.model_spec import MODELS_DIR
from medseg.synth import generate_dataset, load_site


def tiny_spec_data(spacing_mm: float = 6.0) -> dict[str, Any]:
    """The default_ct spec as a mapping, with a 3-level 4-16 channel UNet, 32-voxel ROI and coarse grid."""
    data: dict[str, Any] = yaml.safe_load((MODELS_DIR / "default_ct.yaml").read_text())
    data["network"]["arguments"] = {
        "channels": [4, 8, 16],
        "strides": [2, 2],
        "num_res_units": 0,
        "norm": "instance",
    }
    data["network"]["features"] = 4
    data["inference"]["roi_size"] = [32, 32, 32]
    data["preprocessing"]["spacing_mm"] = [spacing_mm] * 3
    return data


def train_tiny_model(folder: Path) -> tuple[Path, Path]:
    """A three-case site_a dataset and a tiny model trained on it for two steps with ``medseg train``,
    for the commands that start from a trained model: (dataset folder, model folder)."""
    dataset, model = folder / "ds", folder / "base"
    generate_dataset(dataset, [load_site("site_a")], 3, seed=2, matrix=64, slices=24)
    data = tiny_spec_data(spacing_mm=8.0)
    data["training"].update(patch_size=[32, 32, 32], batch_size=1, epochs=1, iterations_per_epoch=2)
    spec_path = folder / "tiny.yaml"
    spec_path.write_text(yaml.safe_dump(data))
    if main(["-q", "train", str(spec_path), str(dataset), "-o", str(model), "--seed", "1"]) != 0:
        raise RuntimeError(f"medseg train of the tiny model into {model} failed")
    return dataset, model
