"""Find DICOM instances in whatever a hospital sends: a folder (recursively), a zip, a DICOMDIR, files,
or datasets already in memory. Headers only; pixels are decoded later, per volume.

Nothing is modified on disk. Every file that is not read says why, by name (``SkippedFile``).
"""

from __future__ import annotations

import functools
import io
import logging
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag, Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_io.errors import UnreadableFileError

log = logging.getLogger(__name__)

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR (PS3.10 7.2)
# Uncompressed, undeflated little-endian syntaxes (PS3.5 A.1, A.2): their Pixel Data can be read in place.
NATIVE_LITTLE_ENDIAN = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian})

ProgressCallback = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class InstanceLocation:
    """Where an instance lives, so that its pixels can be read later without searching again."""

    path: Path | None = None
    zip_member: str | None = None
    dataset: Dataset | None = None  # in memory (e.g. received by C-STORE)

    @property
    def name(self) -> str:
        if self.zip_member is not None:
            return f"{self.path}!{self.zip_member}"
        if self.path is not None:
            return str(self.path)
        sop = getattr(self.dataset, "SOPInstanceUID", "?")
        return f"<dataset {sop}>"

    def read(self, *, stop_before_pixels: bool) -> Dataset:
        """Parse the instance; errors name the file and the reason."""
        return self._parse(stop_before_pixels=stop_before_pixels)[0]

    def read_header(self) -> tuple[Dataset, int | None]:
        """Parse everything before the pixel data, once.

        Also returns where the Pixel Data element starts in the file when it is stored uncompressed in a
        little-endian syntax on disk, so that the reader can later read the pixels straight into the
        volume without parsing the header a second time (``None`` otherwise).
        """
        return self._parse(stop_before_pixels=True)

    def _parse(self, *, stop_before_pixels: bool) -> tuple[Dataset, int | None]:
        if self.dataset is not None:
            return self.dataset, None
        try:
            assert self.path is not None  # constructed with a path whenever there is no dataset
            if self.zip_member is not None:
                with zipfile.ZipFile(self.path) as zf:
                    data = zf.read(self.zip_member)
                return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels), None
            with self.path.open("rb") as fp:
                ds = pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels)
                # pydicom stops at (rewinds to) the pixel data element's tag; for deflated or compressed
                # syntaxes the position means nothing, so it is only kept for native little endian
                ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
                offset = fp.tell() if stop_before_pixels and ts in NATIVE_LITTLE_ENDIAN else None
                return ds, offset
        except InvalidDicomError as err:
            raise UnreadableFileError(f"{self.name}: not a DICOM file (no DICM prefix or file meta)") from err
        except (EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise UnreadableFileError(
                f"{self.name}: cannot be parsed (truncated or corrupt?): {err}"
            ) from err


@dataclass(frozen=True)
class ImagePixelValues:
    """An instance's Image Pixel module values (PS3.3 C.7.6.3) and NumberOfFrames, read once.

    Values are as pydicom converts them (``''`` where the element is absent), so that the checks and
    messages that use them see exactly what ``Dataset.get`` would give.
    """

    rows: Any
    columns: Any
    samples_per_pixel: Any
    bits_allocated: Any
    bits_stored: Any
    pixel_representation: Any
    photometric_interpretation: Any
    number_of_frames: Any

    @classmethod
    def from_header(cls, header: Dataset) -> ImagePixelValues:
        return cls(*(header_value(header, k, "") for k in _IMAGE_PIXEL_KEYWORDS))


_IMAGE_PIXEL_KEYWORDS = (
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "PhotometricInterpretation",
    "NumberOfFrames",
)


@dataclass(frozen=True)
class InstanceHeader:
    """One DICOM instance: where it is and its pixel-less header."""

    location: InstanceLocation
    header: Dataset
    # where the Pixel Data element starts in the file, for uncompressed little-endian files on disk
    pixel_data_offset: int | None = None

    @property
    def name(self) -> str:
        return self.location.name

    @functools.cached_property
    def sop_instance_uid(self) -> str:
        return _uid_with_meta_fallback(self.header, "SOPInstanceUID", "MediaStorageSOPInstanceUID")

    @functools.cached_property
    def sop_class_uid(self) -> str:
        return _uid_with_meta_fallback(self.header, "SOPClassUID", "MediaStorageSOPClassUID")

    @functools.cached_property
    def image_pixel(self) -> ImagePixelValues:
        return ImagePixelValues.from_header(self.header)


@functools.cache
def _tag(keyword: str) -> BaseTag:
    return Tag(keyword)


def header_value(header: Dataset, keyword: str, default: Any = None) -> Any:
    """The value of a top-level element, as ``header.get(keyword, default)`` gives it.

    Converted by pydicom's own ``convert_raw_data_element`` (same VR rules, same validation) but not
    stored back into the header, which costs half of what ``Dataset.get`` does for a value read once;
    the reader reads about 20 values from every instance, so this is a measurable part of reading a
    300-slice series (benchmarks/bench_reader.py).
    """
    elem = header.get_item(_tag(keyword))
    if elem is None:
        return default
    if isinstance(elem, RawDataElement):
        elem = convert_raw_data_element(elem, encoding=header.original_character_set, ds=header)
    return elem.value if isinstance(elem, DataElement) else elem


def _uid_with_meta_fallback(header: Dataset, keyword: str, meta_keyword: str) -> str:
    """A UID from the dataset, or from the file meta where the dataset leaves it empty (tolerant reading:
    some exporters, e.g. the TotalSegmentator example series, fill only the file meta)."""
    value = str(header_value(header, keyword, "") or "")
    if not value and hasattr(header, "file_meta"):
        value = str(header.file_meta.get(meta_keyword, "") or "")
    return value


@dataclass(frozen=True)
class SkippedFile:
    """A file that was not read as an image instance, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class Discovery:
    """What a source holds: parsed instance headers and the files that were skipped, with reasons."""

    instances: tuple[InstanceHeader, ...]
    skipped: tuple[SkippedFile, ...]


Source = str | Path | Dataset | Sequence[str | Path | Dataset]


def _iter_locations(source: Source) -> Iterator[InstanceLocation | SkippedFile]:
    items: Iterable[str | Path | Dataset]
    items = [source] if isinstance(source, str | Path | Dataset) else source
    for item in items:
        if isinstance(item, Dataset):
            yield InstanceLocation(dataset=item)
            continue
        path = Path(item)
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                yield from _locations_for_file(child)
        elif path.is_file():
            yield from _locations_for_file(path)
        else:
            yield SkippedFile(str(path), "no such file or folder")


def _has_dicom_prefix(path: Path) -> bool:
    """Whether the file has the DICM magic after its 128-byte preamble (PS3.10 7.1)."""
    try:
        with path.open("rb") as fp:
            return fp.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _locations_for_file(path: Path) -> Iterator[InstanceLocation | SkippedFile]:
    # A file with the DICOM prefix is read as DICOM even if a zip archive were appended to it; checking the
    # prefix first spares the zip test (a read of the file's last 64 KiB) on every DICOM file.
    if not _has_dicom_prefix(path) and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for member in sorted(zf.namelist()):
                if not member.endswith("/"):
                    yield InstanceLocation(path=path, zip_member=member)
        return
    yield InstanceLocation(path=path)


def _dicomdir_members(root: Path, header: Dataset) -> list[Path]:
    """Files a DICOMDIR references (PS3.3 F.3), resolved against the file-set root."""
    out: list[Path] = []
    for record in header.get("DirectoryRecordSequence", []):
        ids = record.get("ReferencedFileID")
        if ids:
            parts = [ids] if isinstance(ids, str) else list(ids)
            out.append(root.joinpath(*parts))
    return out


def discover(source: Source, *, progress: ProgressCallback | None = None) -> Discovery:
    """Parse the header of every instance in ``source``.

    A DICOMDIR given directly is followed to the files it references; a DICOMDIR met while walking a
    folder is skipped (the walk already finds its files). Duplicated SOP Instance UIDs are read once.
    """
    locations: list[InstanceLocation] = []
    skipped: list[SkippedFile] = []
    dicomdir_roots: dict[InstanceLocation, Path] = {}  # DICOMDIRs to follow -> their file-set root
    for item in _iter_locations(source):
        if isinstance(item, SkippedFile):
            skipped.append(item)
        else:
            locations.append(item)
    if isinstance(source, str | Path) and Path(source).is_file() and len(locations) == 1:
        dicomdir_roots[locations[0]] = Path(source).parent  # a single file given: a DICOMDIR is followed

    instances: list[InstanceHeader] = []
    seen: dict[str, str] = {}
    queue = list(locations)
    i = 0
    while i < len(queue):
        location = queue[i]
        i += 1
        if progress is not None:
            progress(i, len(queue))
        try:
            header, pixel_data_offset = location.read_header()
        except UnreadableFileError as err:
            skipped.append(SkippedFile(location.name, str(err).removeprefix(f"{location.name}: ")))
            continue
        meta = getattr(header, "file_meta", None)
        sop_class = str(getattr(meta, "MediaStorageSOPClassUID", "")) if meta is not None else ""
        if sop_class == MEDIA_STORAGE_DIRECTORY:
            if location in dicomdir_roots:
                root = dicomdir_roots[location]
                for member in _dicomdir_members(root, header):
                    if not member.is_file():
                        skipped.append(SkippedFile(str(member), f"referenced by {location.name} but missing"))
                        continue
                    followed = InstanceLocation(path=member)
                    dicomdir_roots[followed] = root  # nested directory files (Philips DIRFILE) too
                    queue.append(followed)
            else:
                skipped.append(SkippedFile(location.name, "DICOMDIR index file, not an image"))
            continue
        instance = InstanceHeader(location, header, pixel_data_offset)
        sop_uid = instance.sop_instance_uid
        if not sop_uid:
            skipped.append(
                SkippedFile(location.name, "no SOPInstanceUID (0008,0018): not a composite instance")
            )
            continue
        if sop_uid in seen:
            skipped.append(SkippedFile(location.name, f"same SOPInstanceUID as {seen[sop_uid]}: read once"))
            continue
        seen[sop_uid] = location.name
        instances.append(instance)
    log.info("discovered %d instances, skipped %d files", len(instances), len(skipped))
    return Discovery(tuple(instances), tuple(skipped))
