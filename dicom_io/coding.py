"""Codes the result writers need that no standard terminology defines, in one declared private scheme.

Standard codes come from ``pydicom.sr.codedict`` (SNOMED CT, DCM, UCUM). For the Monte-Carlo uncertainty
quantities (predictive entropy, mutual information, spread across samples) and the lesion box coordinates
no DICOM, SNOMED CT or LOINC concept exists, so they are coded in the private scheme ``99MEDSEG``
(PS3.16 Section 8: private coding scheme designators begin with "99") and every object that uses them
declares the scheme in its Coding Scheme Identification Sequence (PS3.3 C.12.1.1.2). The IHE AI Results
profile's "Processing Algorithm" purpose code lives in the IHE's own private scheme ``99IHE``.
"""

from __future__ import annotations

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.coding import Code

SCHEME = "99MEDSEG"

# IHE AI Results (AIR) Rev 1.1, 6.5.3.1: purpose of reference of the AI algorithm's Contributing Equipment.
PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm")

# UCUM has no unit for information content; a curly-brace annotation is valid UCUM and equals unity
# ("1"), so readers that only know UCUM still parse it, while people read "nats" (natural-log units).
NATS = Code("{nats}", "UCUM", "nats")
MILLILITER = Code("ml", "UCUM", "milliliter")  # not in pydicom's codedict; UCUM "ml" as DICOM uses it

PREDICTIVE_ENTROPY = Code("PRED_ENTROPY", SCHEME, "Predictive entropy")
MUTUAL_INFORMATION = Code("MUTUAL_INFO", SCHEME, "Mutual information between prediction and model")
BOUNDARY_ENTROPY = Code("BOUNDARY_ENTROPY", SCHEME, "Mean predictive entropy on segment boundary")
VOLUME_SPREAD = Code("VOLUME_SD_MC", SCHEME, "Volume standard deviation across Monte-Carlo samples")
SAMPLE_AGREEMENT = Code("SAMPLE_DICE", SCHEME, "Mean pairwise Dice between Monte-Carlo samples")
NEEDS_REVIEW = Code("NEEDS_REVIEW", SCHEME, "Needs review by a radiologist")
SCORE_SPREAD = Code("SCORE_SD_MC", SCHEME, "Detection score standard deviation across samples")
DETECTION_RATE = Code("DETECTION_RATE", SCHEME, "Fraction of Monte-Carlo samples detecting finding")
BOX_SPREAD = Code("BOX_SD_MC", SCHEME, "Mean bounding box corner standard deviation across samples")
CENTRE_LPS = tuple(Code(f"CENTRE_{a}", SCHEME, f"Finding centre {a} coordinate (LPS)") for a in "LPS")
BOX_MIN_LPS = tuple(Code(f"BOX_MIN_{a}", SCHEME, f"Bounding box minimum {a} coordinate (LPS)") for a in "LPS")
BOX_MAX_LPS = tuple(Code(f"BOX_MAX_{a}", SCHEME, f"Bounding box maximum {a} coordinate (LPS)") for a in "LPS")


def coding_schemes() -> list[CodingSchemeIdentificationItem]:
    """Coding Scheme Identification items for the private schemes above (PS3.3 C.12.1.1.2)."""
    return [
        CodingSchemeIdentificationItem(
            designator=SCHEME,
            name="medseg private codes for Monte-Carlo uncertainty and detection quantities",
            responsible_organization="medseg project",
        ),
        CodingSchemeIdentificationItem(
            designator="99IHE",
            name="IHE private codes (AI Results profile)",
            responsible_organization="IHE International",
        ),
    ]
