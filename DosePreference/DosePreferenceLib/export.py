"""Export helpers without Qt: the DICOM study a CT came from, output file names, the overwrite check."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path

# DICOM keyword -> tag as Slicer's DICOM database spells it (ctkDICOMDatabase.instanceValue)
REFERENCE_TAGS: dict[str, str] = {
    "StudyInstanceUID": "0020,000D",
    "FrameOfReferenceUID": "0020,0052",
    "PatientID": "0010,0020",
    "PatientName": "0010,0010",
    "PatientBirthDate": "0010,0030",
    "PatientSex": "0010,0040",
    "StudyDate": "0008,0020",
    "StudyTime": "0008,0030",
    "StudyID": "0020,0010",
    "StudyDescription": "0008,1030",
    "AccessionNumber": "0008,0050",
    "ReferringPhysicianName": "0008,0090",
}
SOP_INSTANCE_UID_TAG = "0008,0018"
INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"  # set by Slicer's DICOM plugins on loaded nodes

# (instance UID, tag "gggg,eeee") -> value, "" when unknown; e.g. slicer.dicomDatabase.instanceValue
Lookup = Callable[[str, str], str]


def instance_uids(node) -> list[str]:
    """The DICOM instance UIDs a node was loaded from (none for data that did not come from DICOM)."""
    value = node.GetAttribute(INSTANCE_UIDS_ATTRIBUTE) if node is not None else None
    return value.split() if value else []


def dicom_reference(ctNode, lookup: Lookup | None, segNode=None) -> dict[str, str]:
    """Patient, study and frame of reference of the CT's DICOM series, for ``write_rtdose``'s
    ``reference_meta``, so the exported RTDOSE lands in the CT's study on the CT's frame of reference.

    Empty when the CT did not come from DICOM or no lookup is available: the RTDOSE then gets fresh
    UIDs. The first CT instance answers (a series shares study and frame of reference). A
    segmentation loaded from an RTSTRUCT is referenced too.
    """
    uids = instance_uids(ctNode)
    if not uids or lookup is None:
        return {}
    reference = {}
    for keyword, tag in REFERENCE_TAGS.items():
        value = (lookup(uids[0], tag) or "").strip()
        if value:
            reference[keyword] = value
    structure_uids = instance_uids(segNode)
    if structure_uids:
        reference["RTStructSOPInstanceUID"] = structure_uids[0]
    return reference


def safe_file_stem(name: str) -> str:
    """A node name as a portable file name stem ("pt 1 predicted dose" -> "pt_1_predicted_dose")."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return stem or "dose"


def export_paths(folder: str | Path, stem: str) -> dict[str, Path]:
    """Where an export of a dose named ``stem`` goes: RTDOSE, DVH CSV and metrics CSV."""
    folder = Path(folder)
    return {"rtdose": folder / f"{stem}_RTDOSE.dcm", "dvh": folder / f"{stem}_dvh.csv",
            "metrics": folder / f"{stem}_metrics.csv"}


def existing_outputs(paths: Iterable[Path]) -> list[Path]:
    return [path for path in paths if path.exists()]
