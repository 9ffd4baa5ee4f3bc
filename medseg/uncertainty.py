"""Monte-Carlo dropout sampling for sliding-window inference, with statistics accumulated online.

Per window, the trunk runs once (``stochastic: head``) or the whole network runs with all samples stacked
in the batch (``stochastic: all``); either way samples are batched, never looped over whole volumes. The
statistics are computed voxel chunk by voxel chunk (a few thousand voxels, so that the samples' logits
and probabilities stay in the CPU cache instead of streaming ten full-window copies through memory): per
voxel the mean class probabilities, the variance of the focal labels' probability, the mutual
information (the epistemic part, ``H(mean p) - mean H(p)``, computed inside each window so that
disagreement between overlapping windows is not mistaken for disagreement between samples) and the vote
of each focal label; MONAI then blends these like probabilities. Nothing per sample outlives its chunk,
so memory does not grow with the number of samples (with ``stochastic: all`` the network's own batch of
samples does).

Per structure it also accumulates each sample's volume and the pairwise overlaps between samples, weighted
so that overlapping windows count once; from those come the volume spread and the agreement (mean pairwise
Dice) between samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from medseg.model_spec import Stochastic
from medseg.networks import SegmentationNet

EPS = 1e-8
CHUNK_VOXELS = 4096  # per chunk: samples x classes x 4096 float32 logits, ~1.5 MB for 10 x 9
CUDA_CHUNK_VOXELS = 1 << 20  # a GPU has no such cache to fit; larger chunks mean fewer kernel launches


def entropy(probabilities: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Shannon entropy in nats along ``dim``."""
    p = probabilities.clamp_min(EPS)
    return -(p * p.log()).sum(dim=dim)


@dataclass(frozen=True)
class ChunkStatistics:
    """Monte-Carlo statistics of one chunk of voxels, from the logits of all samples there."""

    mean: torch.Tensor  # (C, K) mean class probabilities
    focal_variance: torch.Tensor  # (F, K) variance over samples of each focal label's probability
    mutual_information: torch.Tensor  # (K,) nats
    onehot: torch.Tensor  # (C, S, K) float, 1 where the class is that sample's label (its argmax)


def chunk_statistics(logits: torch.Tensor, focal_labels: Sequence[int]) -> ChunkStatistics:
    """Statistics of ``logits`` (C classes, S samples, K voxels: classes outermost, so that the softmax and
    the argmax reduce over whole rows).

    The per-sample entropy is ``log sum exp z - sum p z`` (no logarithm of each probability). A sample's
    label is the class whose logit equals the maximum: an exact tie, which float logits practically never
    produce, would count for both classes.
    """
    shifted = logits - logits.amax(dim=0)
    onehot = (shifted == 0).float()
    p = shifted.exp()
    total = p.sum(dim=0)
    p /= total
    sample_entropy = total.log_() - (p * shifted).sum(dim=0)  # (S, K)
    mean = p.mean(dim=1)
    mutual = (entropy(mean, dim=0) - sample_entropy.mean(dim=0)).clamp_min(0.0)
    focal = list(focal_labels)
    deviation = p[focal] - mean[focal][:, None]
    focal_variance = (deviation * deviation).sum(dim=1) / max(logits.shape[1] - 1, 1)
    return ChunkStatistics(mean, focal_variance, mutual, onehot)


@dataclass(frozen=True)
class SampleStructureStats:
    """Per class: each sample's volume (model voxels) and the mean pairwise Dice between samples."""

    volumes: torch.Tensor  # (samples, classes)
    agreement: torch.Tensor  # (classes,), 1.0 where no sample found the class


@dataclass(frozen=True)
class WindowChannels:
    """Where each statistic sits in the sampler's output channels (blended by sliding-window inference):
    the one layout the sampler writes and inference reads."""

    num_classes: int
    num_focal: int

    @property
    def mean_channels(self) -> slice:
        return slice(0, self.num_classes)

    @property
    def variance_channels(self) -> slice:
        return slice(self.num_classes, self.num_classes + self.num_focal)

    @property
    def mutual_information_channel(self) -> int:
        return self.num_classes + self.num_focal

    @property
    def votes_channels(self) -> slice:
        start = self.mutual_information_channel + 1
        return slice(start, start + self.num_focal)

    @property
    def count(self) -> int:
        return self.votes_channels.stop

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """(C, ...) mean class probabilities of an output with channels first."""
        return out[self.mean_channels]

    def focal_variance(self, out: torch.Tensor, i: int) -> torch.Tensor:
        """Variance over samples of the probability of the ``i``-th focal label."""
        return out[self.variance_channels][i]

    def mutual_information(self, out: torch.Tensor) -> torch.Tensor:
        return out[self.mutual_information_channel]

    def votes(self, out: torch.Tensor, i: int) -> torch.Tensor:
        """Share of samples whose label is the ``i``-th focal label."""
        return out[self.votes_channels][i]


class MonteCarloSampler:
    """A ``sliding_window_inference`` predictor (``with_coord=True``) that samples dropout masks.

    Returns per window the channels of ``WindowChannels``: mean p (C), variance of each focal label's
    p (F), mutual information (1) and, per focal label, the share of samples whose label is that one
    (votes, what lesion findings are built from).
    ``weights`` is 1 / (number of windows covering each voxel), so per-sample volumes add up exactly once.
    With ``stochastic: head`` the masks come from ``generator`` (seeded by the caller), one per sample and
    feature channel, and are shared by all windows: sample ``s`` is the same network everywhere.
    """

    def __init__(
        self,
        net: SegmentationNet,
        *,
        samples: int,
        stochastic: Stochastic,
        num_classes: int,
        weights: torch.Tensor,
        generator: torch.Generator,
        focal_labels: Sequence[int] = (),
        samples_per_batch: int | None = None,
    ) -> None:
        self.net = net
        self.samples = samples
        self.stochastic = stochastic
        self.num_classes = num_classes
        self.weights = weights  # (X, Y, Z) on the (padded) model grid
        self.samples_per_batch = samples_per_batch or samples
        self.focal_labels = tuple(focal_labels)
        self.volumes = torch.zeros(samples, num_classes, dtype=torch.float64)
        self.overlaps = torch.zeros(num_classes, samples, samples, dtype=torch.float64)
        self.head_weights = self._masked_head_weights(generator) if stochastic is Stochastic.HEAD else None
        # the same weights as one (C * S, F) matrix, classes outermost as ``chunk_statistics`` wants them
        self._head_matrix = (
            None
            if self.head_weights is None
            else self.head_weights.transpose(0, 1).reshape(num_classes * samples, -1).contiguous()
        )

    def _masked_head_weights(self, generator: torch.Generator) -> torch.Tensor:
        """(samples, C, F) classifier weights with dropped feature channels zeroed (inverted dropout)."""
        conv = self.net.classifier
        weight = conv.weight.detach().reshape(conv.out_channels, conv.in_channels)
        p = float(self.net.dropout.p) if self.samples > 1 else 0.0
        keep = torch.rand(self.samples, conv.in_channels, generator=generator) >= p
        masks = keep.to(weight.dtype) / (1.0 - p)
        return weight.cpu()[None] * masks[:, None, :]

    @property
    def channels(self) -> WindowChannels:
        return WindowChannels(self.num_classes, len(self.focal_labels))

    def _head_logits(self, features: torch.Tensor, chunk: slice) -> torch.Tensor:
        """(C, S, K) logits of every sample at voxels ``chunk`` of flattened (F, V) features."""
        assert self._head_matrix is not None
        w = self._head_matrix.to(features.device, features.dtype)
        logits = (w @ features[:, chunk]).reshape(self.num_classes, self.samples, -1)
        bias = self.net.classifier.bias
        return logits if bias is None else logits + bias.to(logits.dtype)[:, None, None]

    def _trunk_logits(self, window: torch.Tensor) -> torch.Tensor:
        """(B, C, S, V) logits of the whole stochastic network, ``samples_per_batch`` copies at a time."""
        parts = []
        for first in range(0, self.samples, self.samples_per_batch):
            n = min(self.samples_per_batch, self.samples - first)
            logits = self.net(window.repeat(n, *([1] * (window.ndim - 1)))).float()
            parts.append(logits.reshape(n, window.shape[0], logits.shape[1], -1))
        return torch.cat(parts).permute(1, 2, 0, 3).contiguous()

    def __call__(self, window: torch.Tensor, locations: Sequence[Sequence[slice]]) -> torch.Tensor:
        batch, spatial = window.shape[0], window.shape[2:]
        voxels = int(torch.Size(spatial).numel())
        channels = self.channels
        out = torch.empty((batch, channels.count, voxels), dtype=torch.float32, device=window.device)
        features = trunk_logits = None
        if self.stochastic is Stochastic.HEAD:
            features = self.net.features(window).float().reshape(batch, -1, voxels)
        else:
            trunk_logits = self._trunk_logits(window)
        with torch.autocast(window.device.type, enabled=False):  # statistics in float32, also on CUDA
            self._window_statistics(features, trunk_logits, locations, out)
        return out.reshape(batch, channels.count, *spatial)

    def _window_statistics(
        self,
        features: torch.Tensor | None,
        trunk_logits: torch.Tensor | None,
        locations: Sequence[Sequence[slice]],
        out: torch.Tensor,
    ) -> None:
        """Fill ``out`` (B, channels, V) chunk by chunk and add the windows' structure statistics."""
        c, channels = self.num_classes, self.channels
        focal = list(self.focal_labels)
        device, voxels = out.device, out.shape[2]
        step = CUDA_CHUNK_VOXELS if device.type == "cuda" else CHUNK_VOXELS
        for b, location in enumerate(locations):
            weights = self.weights[tuple(location[2:])].reshape(-1).to(device)
            volumes = torch.zeros((c, self.samples), dtype=torch.float32, device=device)
            overlaps = torch.zeros((c, self.samples, self.samples), dtype=torch.float32, device=device)
            for start in range(0, voxels, step):
                chunk = slice(start, min(start + step, voxels))
                if features is not None:
                    logits = self._head_logits(features[b], chunk)
                else:
                    assert trunk_logits is not None
                    logits = trunk_logits[b, :, :, chunk]
                stats = chunk_statistics(logits, focal)
                out[b, channels.mean_channels, chunk] = stats.mean
                out[b, channels.variance_channels, chunk] = stats.focal_variance
                out[b, channels.mutual_information_channel, chunk] = stats.mutual_information
                out[b, channels.votes_channels, chunk] = stats.onehot[focal].mean(dim=1)
                if self.samples > 1:
                    weighted = stats.onehot * weights[chunk]
                    volumes += weighted.sum(dim=2)
                    overlaps += torch.bmm(weighted, stats.onehot.transpose(1, 2))
            self.volumes += volumes.T.double().cpu()
            self.overlaps += overlaps.double().cpu()

    def structure_stats(self) -> SampleStructureStats:
        vol = self.volumes
        iu = torch.triu_indices(self.samples, self.samples, offset=1)
        agreement = torch.ones(self.num_classes, dtype=torch.float64)
        if self.samples > 1:
            for c in range(self.num_classes):
                inter = self.overlaps[c][iu[0], iu[1]]
                size = vol[iu[0], c] + vol[iu[1], c]
                dice = torch.where(size > 0, 2 * inter / size.clamp_min(EPS), torch.ones_like(size))
                agreement[c] = dice.mean()
        return SampleStructureStats(volumes=vol, agreement=agreement)
