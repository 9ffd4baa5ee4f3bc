"""Synthetic studies with exactly known ground truth: torso phantoms, simulated sites, DICOM datasets.

No public labelled CT is reachable from hospital networks, so the project makes its own: anatomy-like
CT/MR phantoms rendered through simulated scanners (``configs/sites/*.yaml``) and written as real DICOM
series plus NIfTI label maps, lesion boxes and a manifest. Used to train the default model, run the demo
and the federated experiment (``medseg synth``).
"""

from medseg.synth.anatomy import ContrastPhase, Label, Lesion, LesionKind, expected_hu_range
from medseg.synth.dataset import (
    CaseEntry,
    DatasetError,
    DatasetManifest,
    LesionBox,
    LesionList,
    Split,
    SynthCase,
    SynthDataset,
    generate_dataset,
    load_dataset,
    load_label_map,
    load_lesions,
    synthesize_case,
    write_case,
)
from medseg.synth.sites import PatientPosition, SiteConfigError, SiteProfile, list_sites, load_site

__all__ = [
    "CaseEntry",
    "ContrastPhase",
    "DatasetError",
    "DatasetManifest",
    "Label",
    "Lesion",
    "LesionBox",
    "LesionKind",
    "LesionList",
    "PatientPosition",
    "SiteConfigError",
    "SiteProfile",
    "Split",
    "SynthCase",
    "SynthDataset",
    "expected_hu_range",
    "generate_dataset",
    "list_sites",
    "load_dataset",
    "load_label_map",
    "load_lesions",
    "load_site",
    "synthesize_case",
    "write_case",
]
