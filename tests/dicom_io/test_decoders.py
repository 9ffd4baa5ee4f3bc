"""Every common transfer syntax, read by the reader and checked against an independent decoder (DICOM.md 7).

Where a real grey-scale file of a syntax exists it is used (pydicom's MR_small set, pydicom-data's CT 693,
pydicom's NM and secondary-capture files); otherwise a real Philips CT slice (``dcm_qa_ct``) is re-encoded
in the test by an encoder that is not the reader's decoder: dcmtk (``dcmcjpeg``, ``dcmcjpls``, ``dcmcrle``,
``dcmconv``), OpenJPH (``ojph_compress``, HTJ2K) or pylibjpeg-openjpeg (JPEG 2000). Lossless syntaxes must
give exactly the uncompressed original; lossy ones must agree with dcmtk's or OpenJPH's own decoder (within
one stored value where implementations may round differently) and stay close to the original. The last
part checks the reader's direct read of uncompressed files against pydicom's decoder on awkward cases.
"""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pydicom.pixels
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from dicom_io import (
    ImageVolume,
    PixelDecodeError,
    ReadOptions,
    UnsupportedInputError,
    read_volume,
    read_volumes,
)
from dicom_io.decoding import FrameDecoder, _native_layout
from dicom_io.discovery import discover
from dicom_io.series import frame_headers

DERIVED_TOO = ReadOptions(include_derived=True)  # lossy re-encodings are DERIVED images (PS3.3 C.7.6.1.1.2)
PHILIPS_CT = Path("dcm_qa_ct/In/Philips/S21570/S2010/I210")  # 512x512, 12-bit unsigned, HU = v - 1024
CT_693 = Path("pydicom-data/data_store/data")  # CT 512x512, 14-bit signed: uncompressed, J2K lossless/lossy

Encoder = Callable[[Path, Path], None]  # (uncompressed source, output file)


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run scripts/setup.sh (Debian dcmtk / openjph-tools)")
    return found


def _run(*command: str | Path) -> None:
    subprocess.run([_tool(str(command[0])), *map(str, command[1:])], check=True, capture_output=True)


def _syntax(path: Path) -> UID:
    return UID(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def _read(path: Path) -> ImageVolume:
    return read_volume(path, DERIVED_TOO)


@pytest.fixture
def philips_ct(shared_data: Path) -> Path:
    return shared_data / PHILIPS_CT


def _stored(volume: ImageVolume, path: Path) -> npt.NDArray[np.float64]:
    """The volume's values back in stored units of ``path`` (its own RescaleSlope/Intercept)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    return (volume.array.astype(np.float64) - intercept) / slope


# --- encoders that are not the reader's decoders -------------------------------------------------------


def _dcmtk(tool: str, *options: str) -> Encoder:
    def encode(source: Path, out: Path) -> None:
        _run(tool, *options, source, out)

    return encode


def _openjpeg(syntax: UID, **kwargs: object) -> Encoder:
    def encode(source: Path, out: Path) -> None:
        ds = pydicom.dcmread(source)
        ds.compress(syntax, encoding_plugin="pylibjpeg", generate_instance_uid=False, **kwargs)
        ds.save_as(out, enforce_file_format=True)

    return encode


def _openjph(syntax: UID, *options: str) -> Encoder:
    """HTJ2K by OpenJPH's ``ojph_compress`` (the reader decodes it with pylibjpeg-openjpeg, i.e. OpenJPEG)."""

    def encode(source: Path, out: Path) -> None:
        ds = pydicom.dcmread(source)
        raw, codestream = out.with_suffix(".yuv"), out.with_suffix(".j2c")
        ds.pixel_array.astype("<u2").tofile(raw)  # the Philips slice: unsigned 12-bit
        _run(
            "ojph_compress", "-i", raw, "-o", codestream, "-num_comps", "1", "-signed", "false",
            "-dims", f"{{{ds.Columns},{ds.Rows}}}", "-bit_depth", str(ds.BitsStored), "-downsamp", "{1,1}",
            *options,
        )  # fmt: skip
        ds.PixelData = encapsulate([codestream.read_bytes()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
        if syntax == HTJ2K:
            ds.ImageType = ["DERIVED", "PRIMARY", "AXIAL"]
            ds.LossyImageCompression = "01"
        ds.save_as(out, enforce_file_format=True)

    return encode


# --- lossless: exactly the original --------------------------------------------------------------------

LOSSLESS = [
    pytest.param(ImplicitVRLittleEndian, _dcmtk("dcmconv", "+ti"), id="implicit-LE"),
    pytest.param(ExplicitVRBigEndian, _dcmtk("dcmconv", "+tb"), id="big-endian"),
    pytest.param(DeflatedExplicitVRLittleEndian, _dcmtk("dcmconv", "+td"), id="deflate"),
    pytest.param(RLELossless, _dcmtk("dcmcrle"), id="RLE"),
    pytest.param(JPEGLossless, _dcmtk("dcmcjpeg", "+el"), id="JPEG-lossless-.57"),
    pytest.param(JPEGLosslessSV1, _dcmtk("dcmcjpeg", "+e1"), id="JPEG-lossless-SV1-.70"),
    pytest.param(JPEGLSLossless, _dcmtk("dcmcjpls", "+el"), id="JPEG-LS-lossless"),
    pytest.param(JPEG2000Lossless, _openjpeg(JPEG2000Lossless), id="JPEG2000-lossless"),
    pytest.param(HTJ2KLossless, _openjph(HTJ2KLossless, "-reversible", "true"), id="HTJ2K-lossless"),
]


@pytest.mark.parametrize(("syntax", "encode"), LOSSLESS)
def test_lossless_syntax_gives_the_original_hounsfield_units(
    philips_ct: Path, tmp_path: Path, syntax: UID, encode: Encoder
) -> None:
    encoded = tmp_path / "ct.dcm"
    encode(philips_ct, encoded)
    assert _syntax(encoded) == syntax
    original, decoded = read_volume(philips_ct), _read(encoded)
    np.testing.assert_array_equal(decoded.array, original.array)
    np.testing.assert_array_equal(decoded.affine, original.affine)


def test_uncompressed_original_matches_simpleitk(philips_ct: Path) -> None:
    """The reference of the lossless tests, itself checked against ITK/GDCM (an independent reader)."""
    volume = read_volume(philips_ct)
    assert volume.array.min() == -1024.0  # HU: stored 0 with RescaleIntercept -1024
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(sitk.ReadImage(str(philips_ct))))


REAL_MR = ["MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_RLE.dcm"]
REAL_MR += ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"]


@pytest.mark.parametrize("name", REAL_MR)
def test_real_mr_files_in_six_syntaxes_equal_the_uncompressed_file(name: str) -> None:
    reference = Path(get_testdata_file("MR_small.dcm"))  # explicit VR little endian
    expected = _read(reference).array
    np.testing.assert_array_equal(expected, sitk.GetArrayFromImage(sitk.ReadImage(str(reference))))
    np.testing.assert_array_equal(_read(Path(get_testdata_file(name))).array, expected)


# --- lossy: agrees with the encoder family's own decoder, close to the original --------------------------

LOSSY = [
    # syntax, encoder, reference decoder (compressed -> uncompressed), largest difference from it in stored
    # values, largest mean |HU| error against the original
    pytest.param(JPEGBaseline8Bit, _dcmtk("dcmcjpeg", "+eb"), "dcmdjpeg", 0, 8.0, id="JPEG-baseline-.50"),
    pytest.param(JPEGExtended12Bit, _dcmtk("dcmcjpeg", "+ee"), "dcmdjpeg", 0, 2.0, id="JPEG-extended-.51"),
    pytest.param(
        JPEGLSNearLossless, _dcmtk("dcmcjpls", "+en", "+md", "2"), "dcmdjpls", 0, 2.0, id="JPEG-LS-near-.81"
    ),
    pytest.param(HTJ2K, _openjph(HTJ2K, "-qstep", "0.001"), "ojph_expand", 1, 2.0, id="HTJ2K-lossy"),
]


def _reference_decode(decoder: str, encoded: Path, tmp_path: Path) -> npt.NDArray[np.float64]:
    """Stored values as the independent decoder gives them."""
    if decoder == "ojph_expand":
        codestream, raw = encoded.with_suffix(".j2c"), tmp_path / "expanded.yuv"
        _run("ojph_expand", "-i", codestream, "-o", raw)
        ds = pydicom.dcmread(encoded, stop_before_pixels=True)
        return np.fromfile(raw, dtype="<u2").reshape(1, ds.Rows, ds.Columns).astype(np.float64)
    out = tmp_path / "decoded.dcm"
    _run(decoder, encoded, out)
    assert _syntax(out) == ExplicitVRLittleEndian  # read back by pydicom's plain (native) decoder
    return pydicom.dcmread(out).pixel_array[np.newaxis].astype(np.float64)


@pytest.mark.parametrize(("syntax", "encode", "decoder", "stored_tolerance", "mean_hu_error"), LOSSY)
def test_lossy_syntax_matches_an_independent_decoder(
    philips_ct: Path,
    tmp_path: Path,
    syntax: UID,
    encode: Encoder,
    decoder: str,
    stored_tolerance: int,
    mean_hu_error: float,
) -> None:
    encoded = tmp_path / "ct.dcm"
    encode(philips_ct, encoded)
    assert _syntax(encoded) == syntax
    volume = _read(encoded)
    reference = _reference_decode(decoder, encoded, tmp_path)
    assert float(np.abs(_stored(volume, encoded) - reference).max()) <= stored_tolerance + 1e-3
    error = np.abs(volume.array - read_volume(philips_ct).array)
    assert float(error.mean()) <= mean_hu_error, error.mean()


def test_real_lossy_jpeg2000_ct_matches_openjpeg_itk_and_the_original(shared_data: Path) -> None:
    """CT 693 as JPEG 2000 at 340:1 (.91): read (GDCM) vs pylibjpeg-openjpeg and ITK, and vs the original."""
    lossy = Path(get_testdata_file("693_J2KI.dcm"))  # pydicom's copy of pydicom-data's file
    assert _syntax(lossy) == JPEG2000
    volume = _read(lossy)
    other = pydicom.pixels.pixel_array(lossy, decoding_plugin="pylibjpeg").astype(np.float64)
    np.testing.assert_array_equal(_stored(volume, lossy)[0], other)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(sitk.ReadImage(str(lossy))))
    error = volume.array - read_volume(shared_data / CT_693 / "693_UNCR.dcm").array
    assert abs(float(np.median(error))) <= 5.0 and float(np.abs(error).mean()) < 80.0  # unbiased, very lossy


# --- real files of other SOP classes, decoded frame by frame --------------------------------------------


def _decode_first_frame(path: Path) -> npt.NDArray[np.generic]:
    [instance] = discover(path).instances
    return FrameDecoder().decode(frame_headers(instance)[0]).copy()


@pytest.mark.parametrize(
    ("name", "syntax", "decoder"),
    [
        ("JPEG-lossy.dcm", JPEGExtended12Bit, "dcmdjpeg"),  # NM, 12-bit: no pydicom plugin decodes it
        ("JPGExtended.dcm", JPEGExtended12Bit, "dcmdjpeg"),
        ("JPEGLSNearLossless_08.dcm", JPEGLSNearLossless, "dcmdjpls"),
        ("JPEGLSNearLossless_16.dcm", JPEGLSNearLossless, "dcmdjpls"),
        ("image_dfl.dcm", DeflatedExplicitVRLittleEndian, "dcmconv"),
    ],
)
def test_real_secondary_capture_frames_match_dcmtk(
    tmp_path: Path, name: str, syntax: UID, decoder: str
) -> None:
    """Volumes exclude secondary captures, but their pixels exercise the decoders on files made elsewhere."""
    path = Path(get_testdata_file(name))
    assert _syntax(path) == syntax
    out = tmp_path / "decoded.dcm"
    _run(decoder, *(["+te"] if decoder == "dcmconv" else []), path, out)
    np.testing.assert_array_equal(_decode_first_frame(path), pydicom.dcmread(out).pixel_array)


# --- syntaxes without a decoder here: refused by name -----------------------------------------------------


def _jpeg_xl_file(source: Path, out: Path) -> Path:
    """``source`` relabelled JPEG XL Lossless (1.2.840.10008.1.2.4.110), which pydicom 3.0 cannot decode.

    pydicom refuses to write a DICOM-rooted transfer syntax it does not know, so the file is written as
    MPEG2 (a UID of the same length) and the UID is replaced in the file meta afterwards.
    """
    ds = pydicom.dcmread(source)
    ds.PixelData = encapsulate([b"\xff\x0a" + bytes(64)])  # a JPEG XL codestream signature; never decoded
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    ds.save_as(out, enforce_file_format=True)
    data = out.read_bytes()
    assert data.count(b"1.2.840.10008.1.2.4.100") == 1
    out.write_bytes(data.replace(b"1.2.840.10008.1.2.4.100", b"1.2.840.10008.1.2.4.110"))
    return out


def test_jpeg_xl_is_refused_by_name(philips_ct: Path, tmp_path: Path) -> None:
    path = _jpeg_xl_file(philips_ct, tmp_path / "jxl.dcm")
    [refusal] = read_volumes(path).refusals
    assert isinstance(refusal.error, UnsupportedInputError)
    with pytest.raises(
        UnsupportedInputError,
        match=r"jxl\.dcm: transfer syntax 1\.2\.840\.10008\.1\.2\.4\.110 .*is not supported for pixel data: "
        r"no decoder exists for it here; convert the series to a supported syntax",
    ):
        read_volume(path)


def test_missing_decoder_plugin_is_named(
    philips_ct: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoded = tmp_path / "ct.dcm"
    _run("dcmcjpls", "+el", philips_ct, encoded)
    real = pydicom.pixels.get_decoder

    class Unavailable:
        is_available = False

    monkeypatch.setattr(
        pydicom.pixels, "get_decoder", lambda ts: Unavailable() if ts == JPEGLSLossless else real(ts)
    )
    with pytest.raises(
        UnsupportedInputError,
        match=r"no decoder installed for transfer syntax 1\.2\.840\.10008\.1\.2\.4\.80 \(JPEG-LS Lossless "
        r"Image Compression\); install the project's decoders",
    ):
        read_volume(encoded)


def test_signed_12_bit_jpeg_is_refused(philips_ct: Path, tmp_path: Path) -> None:
    encoded = tmp_path / "ct.dcm"
    _run("dcmcjpeg", "+ee", philips_ct, encoded)
    ds = pydicom.dcmread(encoded)
    ds.PixelRepresentation = 1
    ds.save_as(encoded)
    with pytest.raises(UnsupportedInputError, match=r"12-bit JPEG Extended with signed pixels .* dcmdjpeg"):
        _read(encoded)


# --- uncompressed files: the direct read equals pydicom's decoder ----------------------------------------


def _native_file(
    source: Path, out: Path, *, allocated: int, stored: int, signed: bool, syntax: UID, shape: tuple[int, int]
) -> Path:
    """A copy of a real CT header with awkward pixels: random bits everywhere, unused high bits included."""
    ds = pydicom.dcmread(source)
    rows, columns = shape
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    rng = np.random.default_rng(allocated * 100 + stored)
    raw = rng.integers(0, 256, size=rows * columns * dtype.itemsize, dtype=np.uint8).tobytes()
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, stored, stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = raw + (b"\0" if len(raw) % 2 else b"")
    ds["PixelData"].VR = "OB" if allocated == 8 else "OW"
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(out, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
    return out


@pytest.mark.parametrize(
    ("allocated", "stored", "signed", "syntax", "shape"),
    [
        (16, 12, True, ExplicitVRLittleEndian, (32, 24)),  # sign extension from bit 11
        (16, 12, False, ExplicitVRLittleEndian, (32, 24)),  # high bits masked off
        (16, 16, True, ImplicitVRLittleEndian, (32, 24)),
        (8, 8, False, ExplicitVRLittleEndian, (5, 7)),  # odd length: one pad byte
        (8, 6, True, ImplicitVRLittleEndian, (5, 7)),
        (32, 20, False, ExplicitVRLittleEndian, (8, 8)),
    ],
)
def test_direct_read_of_uncompressed_pixels_equals_pydicom(
    philips_ct: Path,
    tmp_path: Path,
    allocated: int,
    stored: int,
    signed: bool,
    syntax: UID,
    shape: tuple[int, int],
) -> None:
    path = _native_file(
        philips_ct,
        tmp_path / "x.dcm",
        allocated=allocated,
        stored=stored,
        signed=signed,
        syntax=syntax,
        shape=shape,
    )
    [instance] = discover(path).instances
    assert _native_layout(instance) is not None  # the direct route, not pydicom's
    expected = pydicom.pixels.pixel_array(path)
    decoded = FrameDecoder().decode(frame_headers(instance)[0])
    assert decoded.dtype == expected.dtype
    np.testing.assert_array_equal(decoded, expected)


def test_unusual_pixel_data_length_falls_back_to_pydicom(philips_ct: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(philips_ct)
    ds.PixelData = ds.PixelData + bytes(16)  # trailing padding: pydicom warns and ignores it
    path = tmp_path / "padded.dcm"
    ds.save_as(path)
    np.testing.assert_array_equal(read_volume(path).array, read_volume(philips_ct).array)


def test_truncated_pixel_data_is_a_decode_error(philips_ct: Path, tmp_path: Path) -> None:
    path = tmp_path / "truncated.dcm"
    data = philips_ct.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(PixelDecodeError, match=r"truncated\.dcm: pixel data cannot be decoded"):
        read_volume(path)


def test_zip_folder_and_memory_give_the_same_volume(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "dcmqi/data/segmentations/ct-3slice"
    files = sorted(folder.glob("*.dcm"))
    archive = tmp_path / "ct.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in files:
            zf.write(f, f.name)
    datasets: list[str | Path | Dataset] = [pydicom.dcmread(f) for f in files]
    expected = read_volume(folder)
    assert expected.shape == (3, 512, 512)
    sources: list[Path | list[str | Path | Dataset]] = [archive, datasets]
    for source in sources:
        np.testing.assert_array_equal(read_volume(source).array, expected.array)
