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
           "dose_description", "existing_outputs", "export_paths", "instance_uids", "safe_file_stem",
           "write_dose_export"]


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


def dose_description(dose_node, conditions=None) -> str:
    """Series description of the RTDOSE (DICOM LO: at most 64 characters): the model and how it was steered (a
    desired DVH, or the sliders' values by ``conditions``, the model card's), else the node's name."""
    model = dose_node.GetAttribute("DoseAI.Model")
    if not model:
        return dose_node.GetName()[:64]
    if dose_node.GetAttribute("DoseAI.DesiredDVH"):
        return f"DoseAI {model} DVH {dose_node.GetAttribute('DoseAI.DesiredDVH')}"[:64]
    if conditions is None:
        return f"DoseAI {model}"[:64]
    values = {c.name: float(dose_node.GetAttribute(c.attribute) or 0) for c in conditions}
    return f"DoseAI {model} {conditions.describe_short(values)}"[:64]


def write_dose_export(case, dose_node, paths: dict[str, Path], reference: dict, bin_width_gy: float,
                      force: bool = False) -> None:
    """Write the dose node as RTDOSE (with its RTPLAN, referring to ``reference``: the CT's study and frame of
    reference) and ``case``'s DVH and metrics of that dose as CSV to ``paths`` (:func:`export_paths`)."""
    from doseai.io.dicom import write_rtdose
    from doseai.io.rtplan import PlanDescription
    from doseai.mrml import geometry_from_volume_node, volume_array
    from doseai.report import case_dvhs, case_metrics, write_dvh_csv, write_metrics_csv

    write_rtdose(volume_array(dose_node), geometry_from_volume_node(dose_node), paths["rtdose"], reference,
                 force=force, plan=PlanDescription(prescriptions=dict(case.prescriptions)))
    write_dvh_csv(case_dvhs(case, case.dose, bin_width_gy=bin_width_gy), paths["dvh"], force=force)
    write_metrics_csv(case_metrics(case, case.dose), paths["metrics"], force=force)
