"""The small exception hierarchy of everything that speaks DICOM.

Every error names the thing (file, series), the bad value and, where there is one, the fix (STYLE.md 6).
"""

from __future__ import annotations


class DicomIOError(Exception):
    """Base of every error raised by ``dicom_io``."""


class UnreadableFileError(DicomIOError):
    """A file is not DICOM, is truncated, or cannot be parsed."""


class UnsupportedInputError(DicomIOError):
    """Valid DICOM that this product does not handle (transfer syntax, SOP class, modality)."""


class PixelDecodeError(DicomIOError):
    """The pixel data of a file cannot be decoded."""


class InconsistentSeriesError(DicomIOError):
    """Instances that should form one volume disagree (dimensions, spacing, units...)."""


class GeometryError(DicomIOError):
    """The slices do not form a regular grid: duplicate/missing slices, uneven spacing, gantry tilt."""
