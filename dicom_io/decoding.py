"""Stored pixel values of one frame at a time, for every common transfer syntax (DICOM.md 7).

Three routes, all giving exactly what ``pydicom.pixels.pixel_array`` gives for the frame:

- **Uncompressed little endian on disk** (PS3.5 A.1, A.2; nearly every CT/MR series): the Pixel Data
  offset comes from the one header parse (``InstanceHeader.pixel_data_offset``) and the frame is read
  straight into a reused buffer, with unused high bits cleared as pydicom does (PS3.5 8.1.1). Anything
  unusual (odd lengths, missing or invalid Image Pixel values) falls through to pydicom, so that its
  errors and warnings stay the same.
- **Everything else** (big endian, deflate, RLE, JPEG, JPEG-LS, JPEG 2000, HTJ2K, zip members, datasets
  in memory): ``pydicom.pixels`` with the permissively licensed plugins installed with the project
  (README "Decoders"). A syntax without a decoder is refused by name.
- **JPEG Extended with 12-bit samples** (1.2.840.10008.1.2.4.51): pydicom's GDCM plugin refuses it and
  Pillow reads only 8-bit JPEG; GDCM itself decodes it, so ``_decode_jpeg_12bit`` calls GDCM frame by
  frame the way pydicom's plugin does for 8-bit data (written here because no installed library offers
  it through pydicom; checked against dcmtk's ``dcmdjpeg`` in ``tests/dicom_io/test_decoders.py``).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom.pixels
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEGExtended12Bit

from dicom_io.discovery import NATIVE_LITTLE_ENDIAN, InstanceHeader
from dicom_io.errors import DicomIOError, InconsistentSeriesError, PixelDecodeError, UnsupportedInputError
from dicom_io.series import FrameHeader

_NATIVE_PHOTOMETRIC = frozenset({"MONOCHROME1", "MONOCHROME2"})
_PIXEL_DATA_TAG = (0x7FE0, 0x0010)
_UNDEFINED_LENGTH = 0xFFFFFFFF


class FrameDecoder:
    """Decodes the frames of one volume, in any order, keeping as little as possible in memory.

    Holds one reusable frame buffer for uncompressed files and, for a compressed multi-frame instance,
    its decoded frames until a frame of another instance is asked for. The array returned by ``decode``
    is only valid until the next call: copy or convert it first.
    """

    def __init__(self) -> None:
        self._layouts: dict[str, _NativeLayout | None] = {}
        self._buffer: npt.NDArray[np.generic] | None = None
        self._decoded: dict[str, npt.NDArray[np.generic]] = {}

    def decode(self, frame: FrameHeader) -> npt.NDArray[np.generic]:
        """Stored values of ``frame`` (rows, columns), as ``pydicom.pixels.pixel_array`` gives them."""
        inst = frame.instance
        if inst.name not in self._layouts:
            self._layouts[inst.name] = _native_layout(inst)
        layout = self._layouts[inst.name]
        if layout is not None:
            buffer = self._buffer
            if buffer is None or buffer.dtype != layout.dtype or buffer.size != layout.frame_pixels:
                buffer = self._buffer = np.empty(layout.frame_pixels, dtype=layout.dtype)
            raw = _read_native_frame(layout, frame, buffer)
            if raw is not None:
                return raw
        return _decode_with_pydicom(frame, self._decoded)


@dataclass(frozen=True)
class _NativeLayout:
    """Where and how an instance's uncompressed frames lie in its file (PS3.5 8.1.1, A.1-A.2)."""

    path: Path
    element_offset: int  # the Pixel Data element's tag
    explicit_vr: bool
    dtype: np.dtype[Any]
    rows: int
    columns: int
    frame_count: int
    unused_bits: int  # BitsAllocated - BitsStored: cleared as pydicom does (correct_unused_bits)

    @property
    def frame_pixels(self) -> int:
        return self.rows * self.columns


def _native_layout(inst: InstanceHeader) -> _NativeLayout | None:
    """The layout for reading an instance's pixels straight from its file, or None to let pydicom decode.

    Only plain, valid cases qualify: native little endian on disk, grey-scale 8/16/32-bit Pixel Data with
    every Image Pixel value that pydicom validates (PS3.3 C.7.6.3) present and in range.
    """
    location = inst.location
    if inst.pixel_data_offset is None or location.path is None or location.zip_member is not None:
        return None
    meta = getattr(inst.header, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts not in NATIVE_LITTLE_ENDIAN:
        return None
    p = inst.image_pixel
    rows, columns, samples, allocated = p.rows, p.columns, p.samples_per_pixel, p.bits_allocated
    stored, representation, photometric = p.bits_stored, p.pixel_representation, p.photometric_interpretation
    if not all(isinstance(v, int) for v in (rows, columns, samples, allocated, stored, representation)):
        return None
    frame_count = p.number_of_frames if p.number_of_frames != "" else 1
    if (
        not isinstance(frame_count, int)
        or samples != 1
        or allocated not in (8, 16, 32)
        or not 1 <= stored <= allocated
        or representation not in (0, 1)
        or not (0 < rows < 2**16 and 0 < columns < 2**16 and frame_count >= 1)
        or photometric not in _NATIVE_PHOTOMETRIC
    ):
        return None
    dtype = np.dtype(f"<{'iu'[representation == 0]}{allocated // 8}")
    return _NativeLayout(
        location.path,
        inst.pixel_data_offset,
        ts == ExplicitVRLittleEndian,
        dtype,
        rows,
        columns,
        frame_count,
        allocated - stored,
    )


def _read_native_frame(
    layout: _NativeLayout, frame: FrameHeader, buffer: npt.NDArray[np.generic]
) -> npt.NDArray[np.generic] | None:
    """Read one uncompressed frame into ``buffer`` (no decoder, no copy); None where anything is unusual.

    The Pixel Data element header is checked first (tag, VR, a length that holds exactly the frames
    declared, plus one pad byte where odd); a short read or anything unexpected returns None, so that
    pydicom decodes the frame and raises or warns exactly as it would.
    """
    if frame.rows != layout.rows or frame.columns != layout.columns:
        return None
    index = 0 if frame.frame_number is None else frame.frame_number - 1
    if not 0 <= index < layout.frame_count:
        return None
    frame_bytes = layout.frame_pixels * layout.dtype.itemsize
    expected = frame_bytes * layout.frame_count
    try:
        with layout.path.open("rb", buffering=0) as fp:
            fp.seek(layout.element_offset)
            head = fp.read(12 if layout.explicit_vr else 8)
            if layout.explicit_vr:
                if len(head) != 12 or head[4:6] not in (b"OB", b"OW"):
                    return None
                group, element = struct.unpack_from("<HH", head)
                (length,) = struct.unpack_from("<L", head, 8)
            else:
                if len(head) != 8:
                    return None
                group, element, length = struct.unpack("<HHL", head)
            if (group, element) != _PIXEL_DATA_TAG or length == _UNDEFINED_LENGTH:
                return None
            if length != expected + expected % 2:
                return None
            fp.seek(index * frame_bytes, io.SEEK_CUR)
            if fp.readinto(buffer.data.cast("B")) != frame_bytes:
                return None
    except OSError:
        return None  # pydicom opens the file again and reports what is wrong with it
    raw = buffer.reshape(layout.rows, layout.columns)
    if layout.unused_bits:
        np.left_shift(raw, layout.unused_bits, out=raw)
        np.right_shift(raw, layout.unused_bits, out=raw)
    return raw


def _decode_with_pydicom(
    frame: FrameHeader, decoded: dict[str, npt.NDArray[np.generic]]
) -> npt.NDArray[np.generic]:
    inst = frame.instance
    meta = getattr(inst.header, "file_meta", None)
    ts = str(getattr(meta, "TransferSyntaxUID", "") or "") if meta is not None else ""
    if frame.frame_number is not None and inst.name in decoded:
        return decoded[inst.name][frame.frame_number - 1]
    check_decoder(inst, ts)
    location = inst.location
    try:
        if ts == JPEGExtended12Bit and int(inst.image_pixel.bits_stored or 8) > 8:
            pixels = _decode_jpeg_12bit(location.read(stop_before_pixels=False), inst.name)
            if pixels.shape[0] == 1 and frame.frame_number is None:
                pixels = pixels[0]  # as pydicom returns a single frame
        elif (
            location.path is not None and location.zip_member is None and ts != DeflatedExplicitVRLittleEndian
        ):
            # reads only the pixel-describing elements and the pixel data itself: no second full parse
            # (not for deflate: ``pixel_array(path)`` does not inflate the data set, ``dcmread`` does)
            pixels = pydicom.pixels.pixel_array(location.path)
        else:
            pixels = location.read(stop_before_pixels=False).pixel_array
    except DicomIOError:
        raise
    except Exception as err:  # decoders raise many types; all mean "these pixels cannot be decoded"
        raise PixelDecodeError(
            f"{inst.name}: pixel data cannot be decoded (transfer syntax {ts or 'unknown'}): {err}"
        ) from err
    expected = (frame.rows, frame.columns)
    if frame.frame_number is None:
        if pixels.shape != expected:
            raise InconsistentSeriesError(
                f"{inst.name}: pixel array {pixels.shape} does not match Rows x Columns"
            )
        return pixels
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    decoded.clear()  # keep one multi-frame instance in memory at a time
    decoded[inst.name] = pixels
    return pixels[frame.frame_number - 1]


def check_decoder(inst: InstanceHeader, ts: str) -> None:
    """Refuse, by name, a transfer syntax that no installed decoder handles."""
    if not ts:
        return  # datasets in memory without file meta: pydicom decides from the dataset itself
    try:
        decoder = pydicom.pixels.get_decoder(ts)
    except NotImplementedError as err:
        raise UnsupportedInputError(
            f"{inst.name}: transfer syntax {ts} ({UID(ts).name}) is not supported for pixel data: no "
            "decoder exists for it here; convert the series to a supported syntax (README 'Decoders')"
        ) from err
    if not decoder.is_available:
        raise UnsupportedInputError(
            f"{inst.name}: no decoder installed for transfer syntax {ts} ({UID(ts).name}); "
            "install the project's decoders (python-gdcm, pylibjpeg-openjpeg, pylibjpeg-rle)"
        )


def _decode_jpeg_12bit(ds: Dataset, name: str) -> npt.NDArray[np.uint16]:
    """All frames of a JPEG Extended (Process 2 & 4) instance with 12-bit samples, decoded by GDCM.

    JPEG samples are unsigned (ISO/IEC 10918-1); a signed 12-bit lossy JPEG is refused rather than
    guessed. Returns (frames, rows, columns) uint16.
    """
    import gdcm  # python-gdcm, BSD licence: a project dependency, imported only for this rare syntax

    rows, columns = int(ds.Rows), int(ds.Columns)
    if int(ds.get("PixelRepresentation", 0) or 0) != 0:
        raise UnsupportedInputError(
            f"{name}: 12-bit JPEG Extended with signed pixels (PixelRepresentation 1) is not supported; "
            "decompress it with dcmtk's dcmdjpeg first"
        )
    count = int(ds.get("NumberOfFrames", 1) or 1)
    out = np.empty((count, rows, columns), dtype=np.uint16)
    for i, fragment_bytes in enumerate(generate_frames(ds.PixelData, number_of_frames=count)):
        fragment = gdcm.Fragment()
        fragment.SetByteStringValue(fragment_bytes)
        fragments = gdcm.SequenceOfFragments.New()
        fragments.AddFragment(fragment)
        element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
        element.SetValue(fragments.__ref__())
        image = gdcm.Image()
        image.SetNumberOfDimensions(2)
        image.SetDimensions((columns, rows, 1))
        image.SetDataElement(element)
        photometric = gdcm.PhotometricInterpretation.GetPIType(str(ds.PhotometricInterpretation))
        image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(photometric))
        image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(str(JPEGExtended12Bit))))
        stored = int(ds.BitsStored)
        image.SetPixelFormat(gdcm.PixelFormat(1, 16, stored, stored - 1, 0))
        data = image.GetBuffer().encode("utf-8", "surrogateescape")  # GDCM returns char* as str
        if len(data) != rows * columns * 2:
            raise PixelDecodeError(
                f"{name}: frame {i + 1} decoded to {len(data)} bytes, expected {rows * columns * 2} "
                f"({rows}x{columns} 16-bit)"
            )
        out[i] = np.frombuffer(data, dtype="<u2").reshape(rows, columns)
    return out
