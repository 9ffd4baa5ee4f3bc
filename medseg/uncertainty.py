"""Monte-Carlo dropout sampling for sliding-window inference, with statistics accumulated online.

Per window, the trunk runs once (``stochastic: head``) or the whole network runs with all samples stacked
in the batch (``stochastic: all``); either way samples are batched, never looped over whole volumes. Per
voxel the sampler keeps a running mean and variance of the class probabilities (Welford) and the running
mean of the per-sample entropy, so memory does not grow with the number of samples. Mutual information
(the epistemic part) is ``H(mean p) - mean H(p)`` per window, then blended like the probabilities.

Per structure it also accumulates each sample's volume and the pairwise overlaps between samples, weighted
so that overlapping windows count once; from those come the volume spread and the agreement (mean pairwise
Dice) between samples. These need one small label map per sample per window (int8), not per volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from medseg.model_spec import Stochastic
from medseg.networks import SegmentationNet

EPS = 1e-8


def entropy(probabilities: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Shannon entropy in nats along ``dim``."""
    p = probabilities.clamp_min(EPS)
    return -(p * p.log()).sum(dim=dim)


class OnlineMoments:
    """Running mean and variance (Welford), updated with one batch of samples at a time."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, batch: torch.Tensor) -> None:
        """Add samples stacked along dim 0 (Chan et al.'s pairwise combination of mean and M2)."""
        n = batch.shape[0]
        batch_mean = batch.mean(dim=0)
        batch_m2 = ((batch - batch_mean) ** 2).sum(dim=0) if n > 1 else torch.zeros_like(batch_mean)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, batch_mean, batch_m2
            return
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + batch_m2 + delta**2 * (self.count * n / total)
        self.count = total

    @property
    def variance(self) -> torch.Tensor:
        if self.m2 is None:
            raise ValueError("no samples accumulated")
        return self.m2 / max(self.count - 1, 1)


@dataclass(frozen=True)
class SampleStructureStats:
    """Per class: each sample's volume (model voxels) and the mean pairwise Dice between samples."""

    volumes: torch.Tensor  # (samples, classes)
    agreement: torch.Tensor  # (classes,), 1.0 where no sample found the class


class MonteCarloSampler:
    """A ``sliding_window_inference`` predictor (``with_coord=True``) that samples dropout masks.

    Returns per window the channels ``[mean p (C), var p (C), mutual information (1), votes (F)]``;
    mutual information is computed inside each window (across samples only), so that disagreement between
    overlapping windows is not mistaken for disagreement between samples; ``votes`` is, per focal label,
    the fraction of samples whose label is that one (what lesion findings are built from).
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

    def _masked_head_weights(self, generator: torch.Generator) -> torch.Tensor:
        """(samples, C, F) classifier weights with dropped feature channels zeroed (inverted dropout)."""
        conv = self.net.classifier
        weight = conv.weight.detach().reshape(conv.out_channels, conv.in_channels)
        p = float(self.net.dropout.p) if self.samples > 1 else 0.0
        keep = torch.rand(self.samples, conv.in_channels, generator=generator) >= p
        masks = keep.to(weight.dtype) / (1.0 - p)
        return weight.cpu()[None] * masks[:, None, :]

    def _sample_logits(
        self, window: torch.Tensor, features: torch.Tensor | None, first: int, n: int
    ) -> torch.Tensor:
        """Logits of samples ``first .. first+n`` for every window in the batch: (n, B, C, X, Y, Z)."""
        if self.stochastic is Stochastic.HEAD:
            assert features is not None and self.head_weights is not None
            w = self.head_weights[first : first + n].to(features.device, features.dtype)
            bias = self.net.classifier.bias
            logits = torch.einsum("ncf,bf...->nbc...", w, features)
            if bias is not None:
                logits = logits + bias.to(logits.dtype).reshape(1, 1, -1, *([1] * (features.ndim - 2)))
            return logits
        logits = self.net(window.repeat(n, *([1] * (window.ndim - 1))))
        return logits.reshape(n, window.shape[0], *logits.shape[1:])

    def __call__(self, window: torch.Tensor, locations: Sequence[Sequence[slice]]) -> torch.Tensor:
        moments = OnlineMoments()
        sample_entropy = OnlineMoments()
        labels: list[torch.Tensor] = []
        features = self.net.features(window) if self.stochastic is Stochastic.HEAD else None
        done = 0
        while done < self.samples:
            n = min(self.samples_per_batch, self.samples - done)
            logits = self._sample_logits(window, features, done, n).float()
            log_p = torch.log_softmax(logits, dim=2)
            probs = log_p.exp()
            moments.update(probs)
            sample_entropy.update(-(probs * log_p).sum(dim=2))
            labels.append(_argmax_classes(logits))
            done += n
        per_sample = torch.cat(labels)
        if self.samples > 1:
            self._accumulate_structures(per_sample, locations)
        assert moments.mean is not None and sample_entropy.mean is not None
        mutual = (entropy(moments.mean, dim=1) - sample_entropy.mean).clamp_min(0.0)
        votes = [(per_sample == label).float().mean(dim=0)[:, None] for label in self.focal_labels]
        return torch.cat([moments.mean, moments.variance, mutual[:, None], *votes], dim=1)

    def _accumulate_structures(self, labels: torch.Tensor, locations: Sequence[Sequence[slice]]) -> None:
        """labels: (samples, B, X, Y, Z) per-sample argmax of the windows at ``locations``."""
        for b, location in enumerate(locations):
            w = self.weights[tuple(location[2:])].reshape(-1)
            per_sample = labels[:, b].reshape(self.samples, -1)
            for c in range(self.num_classes):
                member = (per_sample == c).float()
                weighted = member * w
                self.volumes[:, c] += weighted.sum(dim=1).double().cpu()
                self.overlaps[c] += (weighted @ member.T).double().cpu()

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


def _argmax_classes(logits: torch.Tensor) -> torch.Tensor:
    """argmax over dim 2 as int8 by a running maximum (several times faster than ``argmax`` on CPU here)."""
    best = logits[:, :, 0].clone()
    index = torch.zeros(best.shape, dtype=torch.int8, device=logits.device)
    for c in range(1, logits.shape[2]):
        better = logits[:, :, c] > best
        best = torch.maximum(best, logits[:, :, c])
        index[better] = c
    return index
