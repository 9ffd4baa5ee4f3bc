"""Importing a MONAI bundle the test builds itself, and running Monte-Carlo inference with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from monai.networks.nets import UNet

from dicom_io.volume import GeometryReport, ImageVolume, IntensityUnit, Modality, SeriesContext
from medseg.bundle import import_bundle
from medseg.cli import main
from medseg.inference import infer
from medseg.model import load_model
from medseg.model_spec import MODELS_DIR, ModelSpecError

NETWORK_DEF = {
    "_target_": "monai.networks.nets.UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 3,
    "channels": [4, 8],
    "strides": [2],
    "dropout": 0.2,
}


def _bundle(root: Path, out_channels: int = 3) -> Path:
    bundle = root / "spleen_bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    network_def = {**NETWORK_DEF, "out_channels": out_channels}
    (bundle / "configs" / "inference.json").write_text(json.dumps({"network_def": network_def}))
    (bundle / "configs" / "metadata.json").write_text(
        json.dumps({"version": "0.1", "data_source": "test data"})
    )
    torch.manual_seed(0)
    args = {k: v for k, v in network_def.items() if k != "_target_"}
    torch.save(UNet(**args).state_dict(), bundle / "models" / "model.pt")
    return bundle


def _spec(root: Path) -> Path:
    data = yaml.safe_load((MODELS_DIR / "default_ct.yaml").read_text())
    data.update(name="spleen_bundle", labels=data["labels"][1:3])
    for i, label in enumerate(data["labels"], start=1):
        label["value"] = i
    data["network"] = {"architecture": "bundle"}
    data["preprocessing"]["intensity"] = {"CT": {"kind": "window", "low": -1000, "high": 400}}  # 1 channel
    data["inference"]["roi_size"] = [32, 32, 32]
    data["preprocessing"]["spacing_mm"] = [6.0, 6.0, 6.0]
    data["uncertainty"]["stochastic"] = "all"
    path = root / "bundle_spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _volume() -> ImageVolume:
    rng = np.random.default_rng(0)
    affine = np.diag([3.0, 1.0, 1.0, 1.0])[[2, 1, 0, 3]].astype(np.float64)
    return ImageVolume(
        array=rng.normal(0, 200, (16, 48, 48)).astype(np.float32),
        affine=affine,
        modality=Modality.CT,
        unit=IntensityUnit.HOUNSFIELD,
        series=SeriesContext("1.2", "1.2.3", None, 1, "noise", "test", "p"),
        frames=(),
        geometry=GeometryReport(16, 3.0, 3.0, 3.0, 0.0, ()),
    )


def test_imported_bundle_keeps_weights_and_samples_its_own_dropout(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    model = import_bundle(bundle, _spec(tmp_path), tmp_path / "model")
    original = torch.load(bundle / "models" / "model.pt", weights_only=True)
    loaded = load_model(tmp_path / "model")
    for key, value in original.items():
        torch.testing.assert_close(loaded.network.trunk.state_dict()[key], value)
    assert loaded.provenance.source.startswith("bundle:") and loaded.provenance.training_data == "test data"
    assert loaded.device_uid == model.device_uid
    prediction = infer(_volume(), loaded, samples=3, seed=1)
    assert prediction.label_map.shape == (16, 48, 48)
    assert float(prediction.mutual_information.max()) > 0  # the bundle's own dropout makes samples differ


def test_bundle_with_wrong_channel_count_is_refused(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, out_channels=5)
    with pytest.raises(ModelSpecError, match="outputs 5 channels but spec"):
        import_bundle(bundle, _spec(tmp_path), tmp_path / "model")
    spec = _spec(tmp_path)
    data = yaml.safe_load(spec.read_text())
    window = data["preprocessing"]["intensity"]["CT"]
    data["preprocessing"]["intensity"]["CT"] = [window, {**window, "low": -160, "high": 240}]
    spec.write_text(yaml.safe_dump(data))
    with pytest.raises(ModelSpecError, match="does not take the 2 input channel"):
        import_bundle(_bundle(tmp_path / "one_channel"), spec, tmp_path / "model2")


def test_bundle_needs_whole_network_sampling(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    data = yaml.safe_load(spec.read_text())
    data["uncertainty"]["stochastic"] = "head"
    spec.write_text(yaml.safe_dump(data))
    with pytest.raises(ModelSpecError, match="stochastic must be 'all' for an imported bundle"):
        import_bundle(_bundle(tmp_path), spec, tmp_path / "model")


def test_cli_import_and_missing_weights(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    assert (
        main(["-q", "import-bundle", str(bundle), "--spec", str(_spec(tmp_path)), "-o", str(tmp_path / "m")])
        == 0
    )
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(ModelSpecError, match="no weights"):
        import_bundle(bundle, _spec(tmp_path), tmp_path / "m2")
