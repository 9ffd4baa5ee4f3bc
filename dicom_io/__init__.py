"""Everything that speaks DICOM: discovery, series splitting, geometry, decoding, physical units, writers.

Knows nothing of networks or training. The typed result of reading is ``ImageVolume``.
"""

from dicom_io.errors import (
    DicomIOError,
    GeometryError,
    InconsistentSeriesError,
    PixelDecodeError,
    UnreadableFileError,
    UnsupportedInputError,
)
from dicom_io.geometry import GeometryOptions
from dicom_io.reader import ReadOptions, ReadResult, Refusal, read_volume, read_volumes, scan
from dicom_io.volume import GeometryReport, ImageVolume, IntensityUnit, Modality, SeriesContext, SourceFrame

__all__ = [
    "DicomIOError",
    "GeometryError",
    "GeometryOptions",
    "GeometryReport",
    "ImageVolume",
    "InconsistentSeriesError",
    "IntensityUnit",
    "Modality",
    "PixelDecodeError",
    "ReadOptions",
    "ReadResult",
    "Refusal",
    "SeriesContext",
    "SourceFrame",
    "UnreadableFileError",
    "UnsupportedInputError",
    "read_volume",
    "read_volumes",
    "scan",
]
