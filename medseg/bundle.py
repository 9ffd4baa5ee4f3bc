"""Import a local MONAI bundle (network definition + weights) as a medseg model.

A bundle says how to build its network (``configs/inference.json`` or ``.yaml``, key ``network_def``) and
holds its weights (``models/model.pt``); it does not say how its labels are coded in SNOMED CT or how the
hospital wants uncertainty reviewed. Those come from a medseg spec YAML given with the import (its
``network`` section names ``architecture: bundle``). The result is an ordinary model folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import yaml

from medseg.model import Model, ModelProvenance, save_model
from medseg.model_spec import ModelSpecError, parse_spec
from medseg.networks import SegmentationNet

log = logging.getLogger(__name__)

CONFIG_NAMES = ("configs/inference.json", "configs/inference.yaml", "configs/inference.yml")
WEIGHTS_NAMES = ("models/model.pt", "models/model.pth")


def _read_config(path: Path) -> dict[str, Any]:
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ModelSpecError(f"bundle config {path}: expected a mapping at the top level")
    return data


def _first(folder: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise ModelSpecError(f"bundle {folder}: no {what} (looked for {', '.join(names)})")


def import_bundle(bundle: Path, spec_path: Path, output: Path) -> Model:
    """Build the bundle's network, load its weights, and save it with ``spec_path``'s labels as a model."""
    config_path = _first(bundle, CONFIG_NAMES, "inference config")
    config = _read_config(config_path)
    network_def = config.get("network_def")
    if not isinstance(network_def, dict):
        raise ModelSpecError(
            f"bundle config {config_path}: no 'network_def' mapping to build the network from"
        )
    spec_data = yaml.safe_load(spec_path.read_text())
    if not isinstance(spec_data, dict) or not isinstance(spec_data.get("network"), dict):
        raise ModelSpecError(f"model spec {spec_path}: needs a 'network' section with 'architecture: bundle'")
    spec_data["network"] = {**spec_data["network"], "architecture": "bundle", "bundle_network": network_def}
    spec = parse_spec(spec_data, str(spec_path))
    network = SegmentationNet(spec)
    weights_path = _first(bundle, WEIGHTS_NAMES, "weights")
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # some bundles save a checkpoint dict
    try:
        network.trunk.load_state_dict(state)
    except RuntimeError as err:
        raise ModelSpecError(
            f"bundle {bundle}: {weights_path.name} does not fit its network_def: {err}"
        ) from err
    channels = spec.preprocessing.input_channels
    try:
        with torch.no_grad():
            probe = network.eval()(torch.zeros(1, channels, *spec.inference.roi_size))
    except RuntimeError as err:
        raise ModelSpecError(
            f"bundle {bundle}: the network does not take the {channels} input channel(s) spec {spec_path} "
            f"gives it (preprocessing.intensity): {err}"
        ) from err
    if probe.shape[1] != spec.num_classes:
        raise ModelSpecError(
            f"bundle {bundle}: the network outputs {probe.shape[1]} channels but spec {spec_path} declares "
            f"{spec.num_classes - 1} labels + background"
        )
    metadata_path = bundle / "configs" / "metadata.json"
    metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
    provenance = ModelProvenance(
        source=f"bundle:{bundle.resolve()}",
        training_data=str(
            metadata.get("data_source") or metadata.get("description") or "not stated by the bundle"
        ),
        seed=0,
        command=f"medseg import-bundle {bundle} --spec {spec_path} -o {output}",
        weights_sha256="",
    )
    model = save_model(output, spec, network, provenance)
    log.info("imported bundle %s as %r", bundle, model)
    return model
