"""Export helpers without Qt: output file names and the overwrite check. The DICOM study a CT came
from (:func:`dicom_reference`) is shared with DoseOptimizer and lives in :mod:`doseai.mrml.dicom`."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from doseai.mrml.dicom import (
    INSTANCE_UIDS_ATTRIBUTE,
    REFERENCE_TAGS,
    SOP_INSTANCE_UID_TAG,
    Lookup,
    dicom_reference,
    instance_uids,
)

__all__ = ["INSTANCE_UIDS_ATTRIBUTE", "REFERENCE_TAGS", "SOP_INSTANCE_UID_TAG", "Lookup", "dicom_reference",
           "existing_outputs", "export_paths", "instance_uids", "safe_file_stem"]


def safe_file_stem(name: str) -> str:
    """A node name as a portable file name stem ("pt 1 predicted dose" -> "pt_1_predicted_dose")."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return stem or "dose"


def export_paths(folder: str | Path, stem: str) -> dict[str, Path]:
    """Where an export of a dose named ``stem`` goes: RTDOSE, its RTPLAN (see doseai.io.rtplan), DVH CSV and
    metrics CSV."""
    folder = Path(folder)
    return {"rtdose": folder / f"{stem}_RTDOSE.dcm", "rtplan": folder / f"{stem}_RTPLAN.dcm",
            "dvh": folder / f"{stem}_dvh.csv",
            "metrics": folder / f"{stem}_metrics.csv"}


def existing_outputs(paths: Iterable[Path]) -> list[Path]:
    return [path for path in paths if path.exists()]
