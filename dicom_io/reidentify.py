"""Opt-in repair for series exported without Study/Series Instance UIDs (e.g. anonymisers that blank them).

Derived objects must reference a study and a series (PS3.3 C.7.2.1, C.7.3.1, Type 1), so results for
such a series cannot be written as they are. ``assign_missing_uids`` gives the in-memory volume
deterministic UIDs (a function of the Frame of Reference, description and number, so reruns agree) and
returns what it changed, for the caller to log and report. Files on disk are never touched; the results
then belong to a study that exists only in the output folder, which the caller must say.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

from dicom_io.image_writer import deterministic_uid
from dicom_io.volume import ImageVolume

log = logging.getLogger(__name__)


def assign_missing_uids(volume: ImageVolume) -> tuple[ImageVolume, tuple[str, ...]]:
    """A copy of ``volume`` with empty Study/Series Instance UIDs assigned; unchanged when none is empty."""
    series = volume.series
    if series.study_instance_uid and series.series_instance_uid:
        return volume, ()
    anchor = (series.frame_of_reference_uid or "", series.series_description, str(series.series_number))
    study_uid = series.study_instance_uid or deterministic_uid("assigned-study", *anchor)
    series_uid = series.series_instance_uid or deterministic_uid("assigned-series", *anchor)
    changes = []
    if not series.study_instance_uid:
        changes.append(f"StudyInstanceUID was empty: assigned {study_uid}")
    if not series.series_instance_uid:
        changes.append(f"SeriesInstanceUID was empty: assigned {series_uid}")
    headers = []
    for header in volume.source_headers:
        fixed = copy.deepcopy(header)
        fixed.StudyInstanceUID = study_uid
        fixed.SeriesInstanceUID = series_uid
        headers.append(fixed)
    for change in changes:
        log.warning("series %r: %s (opt-in repair, files unchanged)", series.series_description, change)
    repaired = dataclasses.replace(
        volume,
        series=dataclasses.replace(series, study_instance_uid=study_uid, series_instance_uid=series_uid),
        source_headers=tuple(headers),
    )
    return repaired, tuple(changes)
