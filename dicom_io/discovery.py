"""Find DICOM instances in whatever a hospital sends: a folder (recursively), a zip, a DICOMDIR, files,
or datasets already in memory. Headers only; pixels are decoded later, per volume.

Nothing is modified on disk. Every file that is not read says why, by name (``SkippedFile``).
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_io.errors import UnreadableFileError

log = logging.getLogger(__name__)

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR (PS3.10 7.2)

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
        if self.dataset is not None:
            return self.dataset
        try:
            if self.zip_member is not None:
                assert self.path is not None  # constructed together, never separately
                with zipfile.ZipFile(self.path) as zf:
                    data = zf.read(self.zip_member)
                return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels)
            assert self.path is not None
            return pydicom.dcmread(self.path, stop_before_pixels=stop_before_pixels)
        except InvalidDicomError as err:
            raise UnreadableFileError(f"{self.name}: not a DICOM file (no DICM prefix or file meta)") from err
        except (EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise UnreadableFileError(
                f"{self.name}: cannot be parsed (truncated or corrupt?): {err}"
            ) from err


@dataclass(frozen=True)
class InstanceHeader:
    """One DICOM instance: where it is and its pixel-less header."""

    location: InstanceLocation
    header: Dataset

    @property
    def name(self) -> str:
        return self.location.name

    @property
    def sop_instance_uid(self) -> str:
        return _uid_with_meta_fallback(self.header, "SOPInstanceUID", "MediaStorageSOPInstanceUID")

    @property
    def sop_class_uid(self) -> str:
        return _uid_with_meta_fallback(self.header, "SOPClassUID", "MediaStorageSOPClassUID")


def _uid_with_meta_fallback(header: Dataset, keyword: str, meta_keyword: str) -> str:
    """A UID from the dataset, or from the file meta where the dataset leaves it empty (tolerant reading:
    some exporters, e.g. the TotalSegmentator example series, fill only the file meta)."""
    value = str(header.get(keyword, "") or "")
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


def _locations_for_file(path: Path) -> Iterator[InstanceLocation | SkippedFile]:
    if zipfile.is_zipfile(path):
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
            header = location.read(stop_before_pixels=True)
        except UnreadableFileError as err:
            skipped.append(SkippedFile(location.name, str(err).removeprefix(f"{location.name}: ")))
            continue
        sop_class = str(getattr(header.get("file_meta", Dataset()), "MediaStorageSOPClassUID", ""))
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
        sop_uid = _uid_with_meta_fallback(header, "SOPInstanceUID", "MediaStorageSOPInstanceUID")
        if not sop_uid:
            skipped.append(
                SkippedFile(location.name, "no SOPInstanceUID (0008,0018): not a composite instance")
            )
            continue
        if sop_uid in seen:
            skipped.append(SkippedFile(location.name, f"same SOPInstanceUID as {seen[sop_uid]}: read once"))
            continue
        seen[sop_uid] = location.name
        instances.append(InstanceHeader(location, header))
    log.info("discovered %d instances, skipped %d files", len(instances), len(skipped))
    return Discovery(tuple(instances), tuple(skipped))
