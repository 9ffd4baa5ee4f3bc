"""The intensities a model was trained on, per structure, and the check that a scan lies inside them.

Monte-Carlo dropout measures how much the samples of one network disagree. That rises where the network
is unsure, not where a scan is unlike its training data: a model trained with wide augmentation is as sure
of itself on a scanner it never saw as at home (the validation report's held-out sites: structure mutual
information no higher than on clean cases). A hospital still needs to be told "this model was not trained
on scans like this one". So a model records, per structure, the range over its training cases of two
numbers measured on the source grid inside the structure's core (the mask eroded by one voxel, so that
partial volume at the border does not count): the median intensity and its robust spread (1.4826 x the
median absolute deviation: noise plus texture). Inference measures the same two numbers in each predicted
structure; one outside the range by more than the spec's margin sets the structure's review flag, with the
value and the range as the reason. A late-arterial aorta, a low-dose scan's noise or a drifted calibration
is named as what it is, whatever the samples' spread.

The scans' geometry is recorded too: the range of slice spacing and of in-plane pixel spacing. A scan
coarser than any training scan by more than the spec's margin (thicker slices, larger pixels) is named in
the prediction's notes, which reach the SR, ``summary.json`` and the printed summary: it concerns every
structure, not one.

Only intensities in Hounsfield units are compared: MR stored values have no common scale across scanners.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from dicom_io.volume import ImageVolume, IntensityUnit
from medseg.model_spec import ModelSpec, ReviewSpec

RANGE_FILE = "training_range.json"
MAD_TO_STD = 1.4826  # the median absolute deviation of a normal distribution times this is its std
MIN_CORE_VOXELS = 50  # a smaller eroded core (a thin or tiny structure) falls back to the whole mask


class TrainingRangeError(ValueError):
    """A training range file that cannot be read (names the file and the reason)."""


@dataclass(frozen=True)
class StructureIntensity:
    """One structure in one scan: the median intensity of its core and the robust spread around it."""

    median: float
    spread: float


def structure_intensities(
    volume: ImageVolume, label_map: npt.NDArray[np.integer], spec: ModelSpec
) -> dict[str, StructureIntensity]:
    """Per non-focal structure present in ``label_map`` (on ``volume``'s grid), by name: its intensity.

    Empty for a volume not in Hounsfield units."""
    if volume.unit is not IntensityUnit.HOUNSFIELD:
        return {}
    if label_map.shape != volume.array.shape:
        raise ValueError(f"label map {label_map.shape} is not on the volume's grid {volume.array.shape}")
    objects = ndimage.find_objects(label_map.astype(np.int32, copy=False), max_label=spec.num_classes - 1)
    out = {}
    for label in spec.labels:
        box = objects[label.value - 1]
        if label.focal or box is None:
            continue
        mask = label_map[box] == label.value
        core = ndimage.binary_erosion(mask)
        if core.sum() < MIN_CORE_VOXELS:
            core = mask
        values = volume.array[box][core].astype(np.float64)
        median = float(np.median(values))
        spread = MAD_TO_STD * float(np.median(np.abs(values - median)))
        out[label.name] = StructureIntensity(median=median, spread=spread)
    return out


@dataclass(frozen=True)
class ScanSpacing:
    """A scan's geometry as far as a model on a fixed grid is concerned: slice spacing and the coarser of
    the two in-plane pixel spacings (mm)."""

    slice_mm: float
    pixel_mm: float

    @classmethod
    def of(cls, volume: ImageVolume) -> ScanSpacing:
        slice_mm, row_mm, column_mm = volume.spacing
        return cls(slice_mm=round(slice_mm, 3), pixel_mm=round(max(row_mm, column_mm), 3))


@dataclass(frozen=True)
class SpacingRange:
    """Over the training scans: the lowest and highest slice spacing and pixel spacing (mm)."""

    slice_mm: tuple[float, float]
    pixel_mm: tuple[float, float]

    @classmethod
    def of(cls, spacings: Sequence[ScanSpacing]) -> SpacingRange:
        slices, pixels = [s.slice_mm for s in spacings], [s.pixel_mm for s in spacings]
        return cls(slice_mm=(min(slices), max(slices)), pixel_mm=(min(pixels), max(pixels)))

    def merged(self, other: SpacingRange) -> SpacingRange:
        return SpacingRange(
            slice_mm=(min(self.slice_mm[0], other.slice_mm[0]), max(self.slice_mm[1], other.slice_mm[1])),
            pixel_mm=(min(self.pixel_mm[0], other.pixel_mm[0]), max(self.pixel_mm[1], other.pixel_mm[1])),
        )

    def reasons(self, scan: ScanSpacing, margin: float, cases: int) -> tuple[str, ...]:
        """Why ``scan`` is coarser than the training scans by more than ``margin`` (a share of the
        coarsest). A finer scan is no reason: the model samples it onto its own coarser grid, and the
        validation report's full-size scans (0.8 mm pixels) score as well as training's 1.5-1.8 mm."""
        out = []
        for what, value, (_, high) in (
            ("slice spacing", scan.slice_mm, self.slice_mm),
            ("pixel spacing", scan.pixel_mm, self.pixel_mm),
        ):
            if value > high * (1.0 + margin):
                out.append(
                    f"scan outside the training data: {what} {value:.2f} mm, "
                    f"training at most {high:.2f} mm ({cases} cases)"
                )
        return tuple(out)


@dataclass(frozen=True)
class IntensityRange:
    """Over the training cases that hold a structure: the lowest and highest median, and of spread."""

    median: tuple[float, float]
    spread: tuple[float, float]
    cases: int


@dataclass(frozen=True)
class TrainingRange:
    """Per structure name, the intensities of the training cases (HU), with where they came from."""

    structures: dict[str, IntensityRange]
    cases: int
    training_data: str
    command: str = ""
    unit: str = IntensityUnit.HOUNSFIELD.value  # what ``structure_intensities`` measures in: always HU
    spacing: SpacingRange | None = None  # None: not recorded (ranges written before it was)

    @classmethod
    def of(
        cls,
        cases: Sequence[Mapping[str, StructureIntensity]],
        *,
        spacings: Sequence[ScanSpacing] = (),
        training_data: str,
        command: str = "",
    ) -> TrainingRange:
        """The range of ``cases`` (each a ``structure_intensities`` of one training scan with its truth)
        and of the same scans' ``spacings``."""
        names = sorted({name for case in cases for name in case})
        structures = {}
        for name in names:
            held = [case[name] for case in cases if name in case]
            medians = [round(s.median, 2) for s in held]  # 0.01 HU: what the file needs to say
            spreads = [round(s.spread, 2) for s in held]
            structures[name] = IntensityRange(
                median=(min(medians), max(medians)), spread=(min(spreads), max(spreads)), cases=len(held)
            )
        return cls(
            structures=structures,
            cases=len(cases),
            training_data=training_data,
            command=command,
            spacing=SpacingRange.of(spacings) if spacings else None,
        )

    def merged(self, later: TrainingRange) -> TrainingRange:
        """The range of a model fine-tuned on ``later``'s cases from one trained on these: both (once,
        where both name the same training data)."""
        if later.training_data == self.training_data:
            return later
        structures = dict(self.structures)
        for name, new in later.structures.items():
            old = structures.get(name)
            structures[name] = (
                new
                if old is None
                else IntensityRange(
                    median=(min(old.median[0], new.median[0]), max(old.median[1], new.median[1])),
                    spread=(min(old.spread[0], new.spread[0]), max(old.spread[1], new.spread[1])),
                    cases=old.cases + new.cases,
                )
            )
        return TrainingRange(
            structures=dict(sorted(structures.items())),
            cases=self.cases + later.cases,
            training_data=f"{later.training_data}, after {self.training_data}",
            command=later.command,
            # unknown for the earlier scans: unknown for the model
            spacing=self.spacing.merged(later.spacing) if self.spacing and later.spacing else None,
        )

    def reasons(self, name: str, measured: StructureIntensity, review: ReviewSpec) -> tuple[str, ...]:
        """Why ``measured`` lies outside structure ``name``'s range (empty: inside, or not recorded).

        The median may leave its range by ``review.training_range_margin_hu``; the spread may pass its
        highest by ``review.training_range_margin_spread`` of it (a quieter scan than any in training is
        no reason to distrust a model, so only a higher spread counts)."""
        known = self.structures.get(name)
        if known is None:
            return ()
        out = []
        low, high = known.median
        margin = review.training_range_margin_hu
        if not low - margin <= measured.median <= high + margin:
            out.append(
                f"outside the training data: median {measured.median:.0f} HU, "
                f"training {low:.0f} to {high:.0f} HU ({known.cases} cases)"
            )
        highest = known.spread[1]
        if measured.spread > highest * (1.0 + review.training_range_margin_spread):
            out.append(
                f"outside the training data: intensity spread {measured.spread:.0f} HU, "
                f"training at most {highest:.0f} HU ({known.cases} cases)"
            )
        return tuple(out)

    def check(
        self, intensities: Mapping[str, StructureIntensity], review: ReviewSpec
    ) -> dict[str, tuple[str, ...]]:
        """The structures of one scan that lie outside the range, by name, with the reasons."""
        found = {name: self.reasons(name, measured, review) for name, measured in intensities.items()}
        return {name: why for name, why in found.items() if why}

    def scan_reasons(self, scan: ScanSpacing, review: ReviewSpec) -> tuple[str, ...]:
        """Why a scan's geometry lies outside the training scans' (empty: inside, or not recorded)."""
        if self.spacing is None:
            return ()
        return self.spacing.reasons(scan, review.training_range_margin_spacing, self.cases)

    def save(self, folder: Path) -> None:
        (folder / RANGE_FILE).write_text(json.dumps(asdict(self), indent=1) + "\n")


def load_training_range(folder: Path) -> TrainingRange | None:
    """A model folder's training range; None where it records none (older or imported models)."""
    path = folder / RANGE_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        structures = {
            name: IntensityRange(
                median=_pair(value["median"]), spread=_pair(value["spread"]), cases=int(value["cases"])
            )
            for name, value in data["structures"].items()
        }
        if data["unit"] != IntensityUnit.HOUNSFIELD.value:
            raise ValueError(f"unit {data['unit']!r}: only ranges in HU are compared")
        spacing = data.get("spacing")
        return TrainingRange(
            structures=structures,
            cases=int(data["cases"]),
            training_data=str(data["training_data"]),
            command=str(data.get("command", "")),
            spacing=None
            if spacing is None
            else SpacingRange(slice_mm=_pair(spacing["slice_mm"]), pixel_mm=_pair(spacing["pixel_mm"])),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise TrainingRangeError(f"{path}: not a training range ({err!r})") from err


def _pair(values: Iterable[float]) -> tuple[float, float]:
    low, high = (float(v) for v in values)
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"range {low}..{high} is not finite and ordered")
    return low, high
