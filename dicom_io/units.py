"""Turn stored pixel values into physical or presentation units: HU, SUVbw, P-values.

Pure compute (STYLE.md 2): arrays plus the instance's header in, new float32 arrays out; the reader
(``dicom_io.reader``) decodes the frames and calls these functions, so every unit rule lives here once.

- ``rescale`` / ``hounsfield``: the linear Modality LUT of CT and MR (PS3.3 C.11.1), per slice.
- ``projection_presentation``: CR/DX grey levels as a viewer shows them: Modality LUT (C.11.1), then VOI
  (C.11.2), then the polarity of the Presentation LUT (C.11.6) or MONOCHROME1 (C.7.6.3.1.2), inverted
  *after* VOI (the order cornerstone3D#2215 got wrong).
- ``suv_body_weight_factor`` / ``suv_body_weight``: PET Bq/ml to SUVbw following the QIBA FDG-PET/CT
  profile's "Vendor-neutral pseudo-code for SUV calculation" (Appendix G), with full date-times.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing
from pydicom.tag import Tag
from pydicom.valuerep import DA, DT, TM

from dicom_io.errors import InconsistentSeriesError, UnsupportedInputError

logger = logging.getLogger(__name__)

__all__ = [
    "hounsfield",
    "projection_presentation",
    "rescale",
    "suv_body_weight",
    "suv_body_weight_factor",
]

# Longest plausible gap between injection and scan when only a time of day is known (see _injection_time).
_MAX_TIME_ONLY_UPTAKE = timedelta(hours=24)


def _attr(keyword: str) -> str:
    """``'PatientWeight (0010,1030)'``: how every message names an attribute."""
    tag = tag_for_keyword(keyword)
    return f"{keyword} {Tag(tag)}" if tag is not None else keyword


# ---------------------------------------------------------------------------------------------------------
# Linear rescale (CT, MR, PET per slice)
# ---------------------------------------------------------------------------------------------------------


def rescale(
    raw: npt.ArrayLike, slope: float, intercept: float, *, out: npt.NDArray[np.float32] | None = None
) -> npt.NDArray[np.float32]:
    """Apply the linear Modality LUT ``slope * raw + intercept`` (PS3.3 C.11.1.1.2).

    Computed in float64 and returned as float32, so that 16-bit stored values with a non-integer slope
    lose no precision before the final cast. Slope and intercept are per instance (GE and Philips vary
    them per slice), so the reader calls this once per frame, writing into its slice of the volume
    (``out``). Where every intermediate value is an integer below 2**24 (8/16-bit stored values, integer
    slope and intercept: the usual CT), float32 arithmetic is exact and gives the same values faster.

    Raises
    ------
    InconsistentSeriesError
        If the slope is zero or either value is not finite: the frame would carry no information.
    """
    if not math.isfinite(slope) or slope == 0.0:
        raise InconsistentSeriesError(
            f"{_attr('RescaleSlope')} is {slope!r}: it must be a finite, non-zero number"
        )
    if not math.isfinite(intercept):
        raise InconsistentSeriesError(f"{_attr('RescaleIntercept')} is {intercept!r}: it must be finite")
    values = np.asarray(raw)
    if out is None:
        out = np.empty(values.shape, dtype=np.float32)
    slope, intercept = float(slope), float(intercept)
    if _exact_in_float32(values.dtype, slope, intercept):
        np.copyto(out, values, casting="unsafe")
        if slope != 1.0:
            np.multiply(out, np.float32(slope), out=out)
        if intercept != 0.0:
            np.add(out, np.float32(intercept), out=out)
    else:
        wide = np.multiply(values, slope, dtype=np.float64)
        np.add(wide, intercept, out=wide)
        np.copyto(out, wide, casting="same_kind")
    return out


def _exact_in_float32(dtype: np.dtype[Any], slope: float, intercept: float) -> bool:
    """Whether ``slope * v + intercept`` is an exact float32 integer for every value of ``dtype``."""
    if dtype.kind not in "iu" or dtype.itemsize > 2 or not (slope.is_integer() and intercept.is_integer()):
        return False
    largest = float(max(abs(int(np.iinfo(dtype).min)), int(np.iinfo(dtype).max)))
    return largest * abs(slope) + abs(intercept) < 2.0**24


def hounsfield(raw: npt.ArrayLike, slope: float, intercept: float) -> npt.NDArray[np.float32]:
    """CT stored values to Hounsfield units with the slice's own RescaleSlope/Intercept.

    CT requires the linear rescale with RescaleType HU (PS3.3 C.8.2.1.1.6); this is ``rescale`` under the
    name of the unit it produces, so callers say what they mean.
    """
    return rescale(raw, slope, intercept)


# ---------------------------------------------------------------------------------------------------------
# CR / DX presentation
# ---------------------------------------------------------------------------------------------------------


def _stored_range(ds: Dataset) -> tuple[int, int]:
    """Smallest and largest storable value from BitsStored and PixelRepresentation (PS3.3 C.7.6.3)."""
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 0:
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _modality_range_endpoints(ds: Dataset) -> tuple[float, float]:
    """Modality-LUT images of the smallest and largest stored values, in that order (not sorted).

    This is the range pydicom's ``apply_windowing`` maps a window onto (its ``y_min``/``y_max``): the
    Modality LUT Sequence's ``0 .. 2**n - 1`` (PS3.3 C.11.1.1.1, unsigned), else the stored range passed
    through RescaleSlope/Intercept. With a negative slope the first value is the larger one.
    """
    if ds.get("ModalityLUTSequence"):
        bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    lo, hi = _stored_range(ds)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        return lo * slope + intercept, hi * slope + intercept
    return float(lo), float(hi)


def _has_window(ds: Dataset) -> bool:
    return ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None


def _has_voi_lut(ds: Dataset) -> bool:
    seq = ds.get("VOILUTSequence")
    return bool(seq) and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None


def _inverts(ds: Dataset) -> bool:
    """Whether the last grey-scale step inverts, so that higher output means brighter.

    Presentation LUT Shape (2050,0020), where present, defines the P-values (PS3.3 C.11.6.1; for DX
    C.8.11.7 says INVERSE goes with MONOCHROME1, IDENTITY with MONOCHROME2): INVERSE inverts once, it
    does not add a second inversion to MONOCHROME1. Without it, MONOCHROME1 means the minimum value is
    shown white (C.7.6.3.1.2), i.e. invert.
    """
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    if not shape:
        return photometric == "MONOCHROME1"
    if shape not in ("IDENTITY", "INVERSE"):
        raise UnsupportedInputError(
            f"{_attr('PresentationLUTShape')} is {shape!r}: only IDENTITY and INVERSE are supported "
            "for projection images"
        )
    expected = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    if shape != expected:
        logger.warning(
            "%s is %s with PhotometricInterpretation %s (PS3.3 C.8.11.7 expects %s); following the "
            "Presentation LUT Shape, which defines the P-values",
            _attr("PresentationLUTShape"),
            shape,
            photometric,
            expected,
        )
    return shape == "INVERSE"


def _apply_voi_lut_sequence(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray, float, float]:
    """First VOI LUT Sequence item (PS3.3 C.11.2.1.1); output range ``0 .. 2**n - 1``, n = 3rd descriptor."""
    if np.issubdtype(values.dtype, np.floating):
        # The LUT is indexed by integer modality values; floor a non-integer rescale output explicitly
        # instead of letting pydicom truncate it with a warning.
        values = np.floor(values).astype(np.int64)
    try:
        out = apply_voi(values, ds, index=0)
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
    except (NotImplementedError, ValueError, AttributeError, IndexError) as err:
        raise UnsupportedInputError(f"{_attr('VOILUTSequence')} cannot be applied: {err}") from err
    return out, 0.0, float(2**bits - 1)


def _apply_window(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray, float, float]:
    """First Window Center/Width with VOILUTFunction LINEAR, LINEAR_EXACT or SIGMOID (PS3.3 C.11.2.1.2-3).

    pydicom's ``apply_windowing`` maps the window onto the modality output range
    (``_modality_range_endpoints``): below the window gives its first value, above its second.
    """
    y_first, y_last = _modality_range_endpoints(ds)
    try:
        out = apply_windowing(values, ds, index=0)
    except ValueError as err:
        raise InconsistentSeriesError(
            f"{_attr('WindowCenter')}/{_attr('WindowWidth')} with {_attr('VOILUTFunction')} "
            f"{ds.get('VOILUTFunction', 'LINEAR')!r} cannot be applied: {err}"
        ) from err
    return out, y_first, y_last


def projection_presentation(
    raw: npt.NDArray[Any], ds: Dataset, *, prefer_voi_lut: bool = False
) -> npt.NDArray[np.float32]:
    """Grey levels of one projection frame (CR, DX) as displayed: 0.0 darkest, 1.0 brightest.

    The grey-scale pipeline of PS3.4 N.2.1 in its standard order:

    1. Modality LUT (PS3.3 C.11.1): ModalityLUTSequence or RescaleSlope/Intercept
       (``pydicom.pixels.apply_modality_lut``).
    2. VOI (PS3.3 C.11.2): the first WindowCenter/WindowWidth with its VOILUTFunction
       (``apply_windowing``), or the first VOILUTSequence item (``apply_voi``). When a file has both,
       the window is used unless ``prefer_voi_lut`` (the standard leaves the choice to the application).
       Without any VOI the whole modality-LUT output range is shown: the range that BitsStored and
       PixelRepresentation allow, passed through the Modality LUT, not the frame's own min/max, so the
       result does not depend on image content.
    3. Polarity (PS3.3 C.11.6, C.7.6.3.1.2): inverted *after* VOI for MONOCHROME1, or as
       PresentationLUTShape INVERSE/IDENTITY says when present (see ``_inverts``).

    pydicom's functions return values on their own scales (windowing: the modality output range; a VOI
    LUT: ``0 .. 2**n - 1``) and none of them handles MONOCHROME1; ``apply_presentation_lut`` inverts
    about the frame maximum, which depends on content. Each VOI output is therefore rescaled here by its
    own declared range to [0, 1] and inverted as ``1 - v``. The output is a normalised P-value
    (PS3.14 perceptual linearisation is the display's job), not a physical quantity.

    Parameters
    ----------
    raw
        Stored pixel values of one 2-D frame, as decoded (no inversion applied).
    ds
        The instance's header (the Pixel Data element is not used).
    prefer_voi_lut
        Use the VOI LUT Sequence rather than the window when both are present.

    Raises
    ------
    UnsupportedInputError
        Not a single-sample 2-D MONOCHROME frame, a Presentation LUT Sequence, or a VOI LUT pydicom
        cannot apply.
    InconsistentSeriesError
        An invalid window (e.g. width < 1 for LINEAR) or VOILUTFunction.
    """
    frame = np.asarray(raw)
    if frame.ndim != 2:
        raise UnsupportedInputError(
            f"projection presentation needs one 2-D frame (rows, columns), got shape {frame.shape}"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnsupportedInputError(
            f"{_attr('PhotometricInterpretation')} is {photometric or 'missing'!r}: projection "
            "presentation needs MONOCHROME1 or MONOCHROME2"
        )
    if ds.get("PresentationLUTSequence"):
        raise UnsupportedInputError(
            f"{_attr('PresentationLUTSequence')} is present: arbitrary Presentation LUTs are not "
            "supported, only PresentationLUTShape IDENTITY/INVERSE"
        )
    if "BitsStored" not in ds:
        raise InconsistentSeriesError(f"{_attr('BitsStored')} is missing: it defines the value range")
    invert = _inverts(ds)

    modality = apply_modality_lut(frame, ds)
    use_lut = _has_voi_lut(ds) and (prefer_voi_lut or not _has_window(ds))
    if use_lut:
        out, y_first, y_last = _apply_voi_lut_sequence(modality, ds)
        voi = "VOILUTSequence[0]"
    elif _has_window(ds):
        out, y_first, y_last = _apply_window(modality, ds)
        voi = "window"
    else:
        first, last = _modality_range_endpoints(ds)
        out, y_first, y_last = modality, min(first, last), max(first, last)
        voi = "none (full modality-LUT output range)"

    scaled = (np.asarray(out, dtype=np.float64) - y_first) / (y_last - y_first)
    outside = np.count_nonzero((scaled < -1e-9) | (scaled > 1 + 1e-9))
    if outside:
        logger.warning(
            "%d pixel values lie outside the declared output range [%g, %g] (BitsStored %s); clipped",
            outside,
            y_first,
            y_last,
            ds.get("BitsStored"),
        )
    np.clip(scaled, 0.0, 1.0, out=scaled)
    if invert:
        scaled = 1.0 - scaled
    logger.debug("projection presentation: VOI %s, inverted %s", voi, invert)
    return scaled.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# PET SUVbw (QIBA vendor-neutral pseudo-code)
# ---------------------------------------------------------------------------------------------------------


def _where(ds: Dataset) -> str:
    uid = ds.get("SOPInstanceUID")
    return f"PET instance {uid}: " if uid else ""


def _missing(ds: Dataset, keyword: str, why: str, parent: str | None = None) -> InconsistentSeriesError:
    inside = f" in {_attr(parent)}" if parent else ""
    return InconsistentSeriesError(f"{_where(ds)}{_attr(keyword)}{inside} is missing: {why}")


def _positive(ds: Dataset, item: Dataset, keyword: str, why: str, parent: str | None = None) -> float:
    """A required positive number, or an error naming the attribute and its bad value."""
    value = item.get(keyword)
    if value is None or str(value).strip() == "":
        raise _missing(ds, keyword, why, parent)
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise InconsistentSeriesError(
            f"{_where(ds)}{_attr(keyword)} is {value!r}, not a number: {why}"
        ) from err
    if not math.isfinite(number) or number <= 0:
        raise InconsistentSeriesError(f"{_where(ds)}{_attr(keyword)} is {value!r}; it must be > 0: {why}")
    return number


def _parse(ds: Dataset, item: Dataset, keyword: str, kind: type[DA] | type[TM] | type[DT]) -> Any:
    """DA/TM/DT value of ``keyword`` as date/time/datetime, None if absent or empty."""
    value = item.get(keyword)
    if value is None or str(value).strip() == "":
        return None
    try:
        return kind(str(value).strip())
    except ValueError as err:
        raise InconsistentSeriesError(
            f"{_where(ds)}{_attr(keyword)} is {value!r}, not a valid {kind.__name__} value"
        ) from err


def _tz_offset(ds: Dataset) -> timezone | None:
    """TimezoneOffsetFromUTC (0008,0201), '+HHMM' / '-HHMM', which applies to naive date-times."""
    value = str(ds.get("TimezoneOffsetFromUTC", "") or "").strip()
    if len(value) != 5 or value[0] not in "+-" or not value[1:].isdigit():
        return None
    sign = 1 if value[0] == "+" else -1
    return timezone(sign * timedelta(hours=int(value[1:3]), minutes=int(value[3:5])))


def _local(moment: datetime, ds: Dataset) -> datetime:
    """Naive local date-time, so that a DT with an offset can be compared with DA + TM values."""
    # Rebuild as a plain datetime: pydicom's DT subclass carries its original string along.
    moment = datetime(
        moment.year,
        moment.month,
        moment.day,
        moment.hour,
        moment.minute,
        moment.second,
        moment.microsecond,
        moment.tzinfo,
    )
    if moment.tzinfo is None:
        return moment
    offset = _tz_offset(ds)
    if offset is not None:
        return moment.astimezone(offset).replace(tzinfo=None)
    logger.warning(
        "%s%s carries a UTC offset but %s is absent; comparing it as local time",
        _where(ds),
        moment.isoformat(),
        _attr("TimezoneOffsetFromUTC"),
    )
    return moment.replace(tzinfo=None)


def _combine(d: date, t: time) -> datetime:
    return datetime.combine(date(d.year, d.month, d.day), time(t.hour, t.minute, t.second, t.microsecond))


def _date_time(ds: Dataset, date_kw: str, time_kw: str, why: str) -> datetime | None:
    """``date_kw`` + ``time_kw`` as one datetime; None if both are absent, an error if only one is."""
    d, t = _parse(ds, ds, date_kw, DA), _parse(ds, ds, time_kw, TM)
    if d is None and t is None:
        return None
    if d is None:
        raise _missing(ds, date_kw, why)
    if t is None:
        raise _missing(ds, time_kw, why)
    return _combine(d, t)


def _acquisition_datetime(ds: Dataset) -> datetime | None:
    moment = _date_time(ds, "AcquisitionDate", "AcquisitionTime", "it dates the start of this frame")
    if moment is None:
        dt = _parse(ds, ds, "AcquisitionDateTime", DT)
        moment = _local(dt, ds) if dt is not None else None
    return moment


def _ge_scan_datetime(ds: Dataset) -> datetime | None:
    """GE's private scan date-time (0009,xx0D, creator GEMS_PETD_01), which QIBA prefers when present."""
    try:
        elem = ds.get_private_item(0x0009, 0x0D, "GEMS_PETD_01")
    except KeyError:
        return None
    text = elem.value.decode("ascii", "replace") if isinstance(elem.value, bytes) else str(elem.value)
    text = text.strip().rstrip("\x00").strip()
    if not text:
        return None
    try:
        return _local(DT(text), ds)
    except ValueError as err:
        raise InconsistentSeriesError(
            f"{_where(ds)}GE private scan date-time (0009,xx0D, GEMS_PETD_01) is {text!r}, not a DT value"
        ) from err


def _scan_datetime(ds: Dataset, scan_start: datetime | None) -> datetime:
    """The time the dose is decay-corrected to for DecayCorrection START (QIBA Appendix G).

    QIBA: SeriesDate/SeriesTime, unless it is after the acquisition (a post-processed series, where GE
    stamps the processing time); then GE's private scan date-time, else the earliest AcquisitionDate/Time
    of the series. The comparison uses ``scan_start`` (the series' earliest acquisition) when given rather
    than this instance's own acquisition time, so that every slice of a series gets the same factor.
    """
    why = "SUVbw decay-corrects the dose to the scan start"
    series = _date_time(ds, "SeriesDate", "SeriesTime", why)
    if series is None:
        raise _missing(ds, "SeriesTime", why)
    earliest = _local(scan_start, ds) if scan_start is not None else None
    acquisition = earliest if earliest is not None else _acquisition_datetime(ds)
    if acquisition is None:
        raise InconsistentSeriesError(
            f"{_where(ds)}{_attr('AcquisitionDate')}/{_attr('AcquisitionTime')} are missing: QIBA needs "
            "them to check that SeriesTime is the scan start; pass scan_start (the earliest acquisition "
            "date-time of the series)"
        )
    if series <= acquisition:
        return series
    ge = _ge_scan_datetime(ds)
    if ge is not None:
        logger.info(
            "%sseries time %s is after acquisition; using GE private scan time %s", _where(ds), series, ge
        )
        return ge
    if earliest is not None:
        logger.info(
            "%sseries time %s is after the acquisition (post-processed series); using the earliest "
            "acquisition time %s",
            _where(ds),
            series,
            earliest,
        )
        return earliest
    raise InconsistentSeriesError(
        f"{_where(ds)}{_attr('SeriesTime')} {series.isoformat()} is after {_attr('AcquisitionTime')} "
        f"{acquisition.isoformat()} (a post-processed series): QIBA then uses the earliest acquisition "
        "time of the series; pass scan_start"
    )


def _injection_datetime(ds: Dataset, item: Dataset, scan: datetime) -> tuple[datetime, bool]:
    """Injection date-time and whether it came from a full DT (False: a time of day on the scan's date)."""
    parent = "RadiopharmaceuticalInformationSequence"
    full = _parse(ds, item, "RadiopharmaceuticalStartDateTime", DT)
    if full is not None:
        return _local(full, ds), True
    start_time = _parse(ds, item, "RadiopharmaceuticalStartTime", TM)
    if start_time is None:
        raise _missing(
            ds,
            "RadiopharmaceuticalStartDateTime",
            f"SUVbw needs the injection time (nor is {_attr('RadiopharmaceuticalStartTime')} present)",
            parent,
        )
    # QIBA: the start date is not explicit, assume the scan's date (the SeriesDate in the usual case).
    return _combine(scan.date(), start_time), False


def suv_body_weight_factor(ds: Dataset, scan_start: datetime | None = None) -> float:
    """Factor that turns PET activity concentration (Bq/ml, after rescale) into SUVbw (g/ml).

    Follows the QIBA FDG-PET/CT profile, Appendix G "Vendor-neutral pseudo-code for SUV calculation":
    ``weight[g] / (injected dose[Bq] * 2 ** (-decay time / half-life))``.

    - Units (0054,1001) BQML is converted; GML is already SUVbw (factor 1.0); CNTS (Philips private SUV
      factor) and others are refused.
    - CorrectedImage (0028,0051) must contain ATTN and DECY.
    - DecayCorrection (0054,1102) START decays the dose from injection to the scan start
      (``_scan_datetime``); ADMIN images are corrected to the injection time, so the dose is used as is.
    - Injection: RadiopharmaceuticalStartDateTime (0018,1078) when present; else
      RadiopharmaceuticalStartTime (0018,1072) on the scan's date. With only a time, an injection after
      the scan (e.g. just before midnight) cannot be told from bad data, so it is refused, not guessed.

    Parameters
    ----------
    ds
        Header of one PET instance.
    scan_start
        Earliest acquisition date-time across the series' instances (the reader supplies it); used by the
        QIBA rule for post-processed series, whose SeriesTime is after the acquisition.

    Raises
    ------
    InconsistentSeriesError
        A required attribute is missing or invalid; the message names it and its tag.
    UnsupportedInputError
        Units other than BQML or GML.
    """
    units = str(ds.get("Units", "") or "").strip().upper()
    if not units:
        raise _missing(ds, "Units", "SUVbw needs activity concentration in BQML")
    if units == "GML":
        logger.info("%sUnits GML: values are already SUVbw (QIBA assumes bw, not lbm)", _where(ds))
        return 1.0
    if units == "CNTS":
        raise UnsupportedInputError(
            f"{_where(ds)}{_attr('Units')} is CNTS: converting counts needs the Philips private SUV scale "
            "factor (7053,1000), which is not supported; export the series in BQML"
        )
    if units != "BQML":
        raise UnsupportedInputError(
            f"{_where(ds)}{_attr('Units')} is {units!r}: SUVbw is computed only from BQML (Bq/ml) or GML"
        )

    corrected = ds.get("CorrectedImage")
    corrections: Iterable[str] = (
        [] if corrected is None else [corrected] if isinstance(corrected, str) else list(corrected)
    )
    flags = {str(c).strip().upper() for c in corrections}
    for needed in ("ATTN", "DECY"):
        if needed not in flags:
            raise InconsistentSeriesError(
                f"{_where(ds)}{_attr('CorrectedImage')} is {sorted(flags)}, without {needed}: SUVbw "
                "needs attenuation- and decay-corrected images (QIBA)"
            )

    weight_kg = _positive(ds, ds, "PatientWeight", "SUVbw needs the patient's weight")
    seq = ds.get("RadiopharmaceuticalInformationSequence")
    if not seq:
        raise _missing(
            ds, "RadiopharmaceuticalInformationSequence", "SUVbw needs the injected dose and its time"
        )
    item = seq[0]
    parent = "RadiopharmaceuticalInformationSequence"
    dose_bq = _positive(ds, item, "RadionuclideTotalDose", "SUVbw needs the injected dose in Bq", parent)
    if dose_bq < 1e6:
        logger.warning("%sRadionuclideTotalDose %g Bq is below 1 MBq; is it in MBq?", _where(ds), dose_bq)

    decay_correction = str(ds.get("DecayCorrection", "") or "").strip().upper()
    if not decay_correction:
        raise _missing(ds, "DecayCorrection", "SUVbw needs the time the images are decay-corrected to")
    if decay_correction == "ADMIN":
        return weight_kg * 1000.0 / dose_bq
    if decay_correction != "START":
        raise InconsistentSeriesError(
            f"{_where(ds)}{_attr('DecayCorrection')} is {decay_correction!r}: SUVbw needs START or ADMIN"
        )

    half_life_s = _positive(
        ds, item, "RadionuclideHalfLife", "SUVbw decay-corrects the dose with the half-life", parent
    )
    scan = _scan_datetime(ds, scan_start)
    injection, from_full_datetime = _injection_datetime(ds, item, scan)
    uptake = scan - injection
    if from_full_datetime and uptake < timedelta(0):
        raise InconsistentSeriesError(
            f"{_where(ds)}{_attr('RadiopharmaceuticalStartDateTime')} {injection.isoformat()} is after the "
            f"scan start {scan.isoformat()}"
        )
    if not from_full_datetime and not timedelta(0) <= uptake <= _MAX_TIME_ONLY_UPTAKE:
        raise InconsistentSeriesError(
            f"{_where(ds)}{_attr('RadiopharmaceuticalStartTime')} {injection.time().isoformat()} is after "
            f"the scan start {scan.isoformat()}: the injection was probably the day before, but without "
            f"{_attr('RadiopharmaceuticalStartDateTime')} its date is unknown; refusing to guess"
        )
    decayed_dose = dose_bq * 2.0 ** (-uptake.total_seconds() / half_life_s)
    return weight_kg * 1000.0 / decayed_dose


def suv_body_weight(
    activity_bqml: npt.ArrayLike, ds: Dataset, scan_start: datetime | None = None
) -> npt.NDArray[np.float32]:
    """Activity concentration (Bq/ml, already rescaled per slice) to SUVbw (g/ml); see the factor."""
    factor = suv_body_weight_factor(ds, scan_start)
    return (np.asarray(activity_bqml, dtype=np.float64) * factor).astype(np.float32)
