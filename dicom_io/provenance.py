"""AI provenance shared by every result object (SEG, Parametric Map, SR), per IHE AI Results (DICOM.md 19).

One place decides how the model is named in the output: the Contributing Equipment item (PS3.3 C.12.1,
Contributing Equipment Sequence) with the IHE AIR purpose "Processing Algorithm" and the model's Device
UID, the SEG/SR algorithm identification (PS3.3 C.8.20.4, PS3.16 TID 4019), the SR device observer
(TID 1004) and the "not for clinical use" wording carried by the Series Description, Image Comments,
Content Qualification and the SR text whenever ``AlgorithmIdentity.for_clinical_use`` is False.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.sr.codedict import codes

from dicom_io.ai_result import AlgorithmIdentity
from dicom_io.coding import PROCESSING_ALGORITHM

NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"
_LO_MAX = 64  # Long String (PS3.5 6.2), e.g. Series Description


def usage_statement(algorithm: AlgorithmIdentity) -> str:
    """One sentence saying which model made the object and whether it may be used clinically."""
    who = f"{algorithm.name} {algorithm.version} ({algorithm.manufacturer})"
    if algorithm.for_clinical_use:
        return f"Generated automatically by {who}."
    return f"Generated automatically by {who}; research use only, {NOT_FOR_CLINICAL_USE}."


def series_description(what: str, algorithm: AlgorithmIdentity) -> str:
    """Series/Content Description (LO, 64 characters) that never loses the "not for clinical use" warning.

    The model name is shortened, never the warning: viewers list series by this text.
    """
    suffix = "" if algorithm.for_clinical_use else f" - {NOT_FOR_CLINICAL_USE}"
    head = f"{what} {algorithm.name}"
    return head[: _LO_MAX - len(suffix)].rstrip() + suffix


def content_qualification(algorithm: AlgorithmIdentity) -> hd.ContentQualificationValues:
    """Content Qualification (0018,9004) of the enhanced objects: RESEARCH unless cleared for clinic."""
    return (
        hd.ContentQualificationValues.PRODUCT
        if algorithm.for_clinical_use
        else hd.ContentQualificationValues.RESEARCH
    )


def contributing_equipment(algorithm: AlgorithmIdentity) -> hd.ContributingEquipment:
    """The model as an item of the Contributing Equipment Sequence, as IHE AI Results requires.

    highdicom only accepts DCM purposes of reference, so the item is built as "Processing Equipment" and
    its purpose then replaced by the IHE code (Newcode1, 99IHE, "Processing Algorithm"). Device UID
    (0018,1002) identifies the weights: a retrained or federated model has a new one.
    """
    item = hd.ContributingEquipment(
        manufacturer=algorithm.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm.name,
        software_versions=[algorithm.version, algorithm.software_version],
        contribution_description=usage_statement(algorithm),
    )
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(PROCESSING_ALGORITHM)]
    item.DeviceUID = algorithm.device_uid
    return item


def seg_algorithm_identification(algorithm: AlgorithmIdentity) -> hd.AlgorithmIdentificationSequence:
    """Segment Algorithm Identification (PS3.3 C.8.20.4): name, version and family (CID 7162)."""
    return hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm.version,
        source=algorithm.manufacturer,
    )


def sr_algorithm_identification(algorithm: AlgorithmIdentity) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification for SR measurement groups."""
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        family=codes.cid7162.ArtificialIntelligence,
        manufacturer=algorithm.manufacturer,
    )


def device_observer(algorithm: AlgorithmIdentity) -> hd.sr.ObserverContext:
    """TID 1002/1004 device observer whose Device Observer UID is the model's Device UID."""
    return hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=algorithm.device_uid,
            name=algorithm.name,
            manufacturer_name=algorithm.manufacturer,
            model_name=f"{algorithm.name} {algorithm.version}",
        ),
    )
