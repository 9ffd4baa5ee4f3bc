"""Build the segmentation network a spec names: a MONAI trunk plus a small stochastic head.

``SegmentationNet.features(x)`` runs the trunk; ``SegmentationNet.head(f)`` turns features into logits
through channel-wise dropout (``Dropout3d``). Because the head is dropout followed by a 1x1x1 convolution,
one Monte-Carlo sample is that convolution with some input channels zeroed: all samples together are one
matrix product with stacked, masked weights (``medseg.uncertainty``), so the trunk runs once per window
and ten samples cost little more than one pass.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.nets import DynUNet, SegResNet, SwinUNETR, UNet
from torch import nn

from medseg.model_spec import Architecture, ModelSpec, ModelSpecError, Stochastic


def _bundle_network(spec: ModelSpec) -> nn.Module:
    """Instantiate an imported bundle's ``network_def`` with MONAI's bundle parser.

    The ``_target_`` lookup by class name is the MONAI bundle format itself; it is confined to networks a
    hospital chose to import, never used for medseg's own specs.
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser({"network_def": spec.network.bundle_network})
    network = parser.get_parsed_content("network_def")
    if not isinstance(network, nn.Module):
        raise ModelSpecError(
            f"model {spec.name}: bundle network_def built {type(network).__name__}, not a network"
        )
    return network


def _trunk(spec: ModelSpec) -> nn.Module:
    net = spec.network
    args: dict[str, Any] = dict(net.arguments)
    common: dict[str, Any] = {
        "spatial_dims": 3,
        "in_channels": spec.preprocessing.input_channels,
        "out_channels": net.features,
    }
    if net.architecture is Architecture.UNET:
        args.setdefault(
            "dropout", spec.uncertainty.dropout if spec.uncertainty.stochastic is Stochastic.ALL else 0
        )
        return UNet(**common, **args)
    if net.architecture is Architecture.SEGRESNET:
        if spec.uncertainty.stochastic is Stochastic.ALL:
            args.setdefault("dropout_prob", spec.uncertainty.dropout)
        return SegResNet(**common, **args)
    if net.architecture is Architecture.DYNUNET:
        args.setdefault("kernel_size", [3, 3, 3, 3])
        args.setdefault("strides", [1, 2, 2, 2])
        args.setdefault("upsample_kernel_size", list(args["strides"])[1:])
        if spec.uncertainty.stochastic is Stochastic.ALL:
            args.setdefault("dropout", spec.uncertainty.dropout)
        return DynUNet(**common, **args)
    if net.architecture is Architecture.BUNDLE:
        return _bundle_network(spec)
    if net.architecture is Architecture.SWINUNETR:
        if spec.uncertainty.stochastic is Stochastic.ALL:
            args.setdefault("drop_rate", spec.uncertainty.dropout)
        return SwinUNETR(**common, **args)
    raise ModelSpecError(f"model {spec.name}: unknown architecture {net.architecture}")  # pragma: no cover


class SegmentationNet(nn.Module):
    """Trunk (any MONAI 3-D network) followed by activation, dropout and a 1x1x1 convolution to logits."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        try:
            self.trunk = _trunk(spec)
        except (TypeError, ValueError, AssertionError) as err:
            raise ModelSpecError(
                f"model {spec.name}: cannot build {spec.network.architecture} with arguments "
                f"{spec.network.arguments}: {err}"
            ) from err
        self.has_head = spec.network.architecture is not Architecture.BUNDLE
        self.activation = nn.LeakyReLU(0.01)
        self.dropout = nn.Dropout3d(spec.uncertainty.dropout)  # channel-wise: one mask per feature map
        self.classifier = nn.Conv3d(spec.network.features, spec.num_classes, kernel_size=1)
        if not self.has_head:  # an imported bundle's network already ends in logits
            self.activation, self.dropout, self.classifier = nn.Identity(), nn.Identity(), nn.Identity()  # type: ignore[assignment]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.trunk(x))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def set_dropout_sampling(module: nn.Module, *, enabled: bool) -> None:
    """Put the whole network in eval mode, then (if ``enabled``) only its dropout layers in train mode.

    ``model.train()`` would also switch batch normalisation to batch statistics, which changes the
    prediction itself; Monte-Carlo dropout must sample dropout masks and nothing else.
    """
    module.eval()
    if enabled:
        for layer in module.modules():
            if isinstance(layer, nn.modules.dropout._DropoutNd):
                layer.train()
