"""Whole planning cases as DICOM: a folder tree read as CT + RTSTRUCT (+ RTDOSE), and a case written as
CT series, RTSTRUCT, RTDOSE and RTPLAN that refer to one another."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from doseai.case import PlanningCase
from doseai.errors import DoseAIError, OutputExistsError, refuse_malformed
from doseai.io.dicom.ct import ct_series_groups, pick_ct_series, read_ct_entries, write_ct_series
from doseai.io.dicom.reading import Entry, PathLike, Scan, looks_like_dicom_file, scan_folder, text_of
from doseai.io.dicom.rtdose import read_rtdose, write_rtdose
from doseai.io.dicom.rtplan import PlanDescription
from doseai.io.dicom.rtstruct import read_rtstruct, write_rtstruct
from doseai.io.dicom.writing import PATIENT_STUDY_KEYS
from doseai.resample import resample_to


def _referenced_series(rtstruct: Entry) -> set[str]:
    uids = set()
    for frame in rtstruct.header.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                uids.add(text_of(series, "SeriesInstanceUID"))
    return uids


def _frames_of(rtstruct: Entry) -> set[str]:
    frames = {text_of(f, "FrameOfReferenceUID") for f in rtstruct.header.get("ReferencedFrameOfReferenceSequence", [])}
    return frames - {""}


def _newest(entries: list[Entry], what: str, folder: Path) -> Entry:
    """The most recently created of several candidates, with a warning saying which was taken."""
    def stamp(e: Entry) -> str:
        return (e.get("StructureSetDate") + e.get("StructureSetTime")) or (
            e.get("InstanceCreationDate") + e.get("InstanceCreationTime"))
    chosen = max(entries, key=stamp)
    if len(entries) > 1:
        warnings.warn(f"{folder} holds {len(entries)} {what}s for the CT; using {chosen.path.name}", stacklevel=3)
    return chosen


def _struct_ct_pairs(
    structs: list[Entry], groups: dict[str, list[Entry]], by_frame: bool
) -> list[tuple[str, Entry]]:
    """(CT series UID, RTSTRUCT) pairs where the RTSTRUCT names the series (or, by_frame, its frame of reference)."""
    pairs = []
    for struct in structs:
        references = _frames_of(struct) if by_frame else _referenced_series(struct)
        for uid, slices in groups.items():
            if (slices[0].get("FrameOfReferenceUID") if by_frame else uid) in references:
                pairs.append((uid, struct))
    return pairs


def _choose_ct_and_rtstruct(scan: Scan) -> tuple[list[Entry], Entry | None]:
    """The CT series an RTSTRUCT refers to (by series, else by frame of reference), and that RTSTRUCT."""
    groups = ct_series_groups(scan)
    structs = scan.of("RTSTRUCT")
    for by_frame in (False, True):
        pairs = _struct_ct_pairs(structs, groups, by_frame)
        if pairs:
            uid = max({u for u, _ in pairs}, key=lambda u: len(groups[u]))
            return groups[uid], _newest([s for u, s in pairs if u == uid], "RTSTRUCT", scan.folder)
    ct = pick_ct_series(scan)
    if structs:
        warnings.warn(f"no RTSTRUCT in {scan.folder} refers to its CT series; reading the CT without structures",
                      stacklevel=3)
    else:
        warnings.warn(f"no RTSTRUCT in {scan.folder}; the case has no structures", stacklevel=3)
    return ct, None


def _choose_rtdose(scan: Scan, frame_uid: str) -> Entry | None:
    doses = scan.of("RTDOSE")
    same_frame = [d for d in doses if d.get("FrameOfReferenceUID") == frame_uid]
    if doses and not same_frame:
        warnings.warn(f"RTDOSE in {scan.folder} is in another frame of reference than the CT; it is ignored",
                      stacklevel=3)
        return None
    if not same_frame:
        return None
    plans = [d for d in same_frame if d.get("DoseSummationType").upper() == "PLAN"] or same_frame
    if len(plans) > 1:
        warnings.warn(f"{scan.folder} holds {len(plans)} RTDOSE files for the CT; using {plans[0].path.name}",
                      stacklevel=3)
    return plans[0]


@refuse_malformed("DICOM case")
def read_dicom_case(
    folder: PathLike,
    overrides: Mapping[str, str | None] | None = None,
    prescriptions: Mapping[str, float] | None = None,
) -> PlanningCase:
    """A PlanningCase from a DICOM folder tree: the CT series, the RTSTRUCT that refers to it, and an RTDOSE
    in the same frame of reference (resampled linearly onto the CT grid when on another grid).

    Structure names are matched to canonical ones (``overrides``: raw -> canonical or None); prescriptions
    come from target names unless given. ``metadata`` keeps the DICOM UIDs for exporting an RTDOSE.
    """
    scan = scan_folder(folder)
    ct_entries, rtstruct = _choose_ct_and_rtstruct(scan)
    ct, geometry, ct_meta = read_ct_entries(ct_entries)
    masks = read_rtstruct(rtstruct.path, geometry, ct_meta) if rtstruct else {}
    metadata = {key: str(ct_meta[key]) for key in PATIENT_STUDY_KEYS + ("SeriesInstanceUID", "FrameOfReferenceUID")
                if ct_meta.get(key)}
    metadata["DicomFolder"] = str(Path(folder))
    if rtstruct:
        metadata["RTStructSOPInstanceUID"] = rtstruct.get("SOPInstanceUID")
    dose = None
    dose_entry = _choose_rtdose(scan, ct_meta["FrameOfReferenceUID"])
    if dose_entry is not None:
        dose_gy, dose_geometry, dose_meta = read_rtdose(dose_entry.path)
        dose = np.clip(resample_to(dose_gy, dose_geometry, geometry), 0.0, None)
        metadata["RTDoseSOPInstanceUID"] = dose_meta["SOPInstanceUID"]
    return PlanningCase.from_named_masks(
        geometry, masks, ct=ct, dose=dose, overrides=overrides, prescriptions=prescriptions,
        patient_id=ct_meta.get("PatientID") or "anonymous", metadata=metadata,
    )


def write_dicom_case(case: PlanningCase, folder: PathLike, force: bool = False) -> dict[str, Any]:
    """Write ``case`` as ``folder/CT/CT_*.dcm``, ``folder/RS.dcm`` (structures), ``folder/RD.dcm`` (dose) and
    ``folder/RP.dcm`` (the dose's plan, see :func:`write_rtdose`).

    A folder that already holds DICOM files is refused unless ``force`` (then those three are replaced, and
    an RS/RD left from an earlier write that this case has no counterpart for is removed).

    Patient, study and frame-of-reference UIDs in ``case.metadata`` are reused, so the RTSTRUCT and RTDOSE
    sit with the original study; the CT gets a new series (its instances are new files, and reusing the old
    series UID would mix two copies in a DICOM database). Returns the paths written and the UIDs used.
    """
    if case.ct is None:
        raise DoseAIError("the case has no CT; DICOM structures and dose need a CT series to refer to")
    folder = Path(folder)
    ct_folder, rs_path, rd_path, rp_path = folder / "CT", folder / "RS.dcm", folder / "RD.dcm", folder / "RP.dcm"
    if not force and folder.is_dir():  # checked first so that nothing is half written
        existing = [p for p in folder.rglob("*") if p.is_file() and looks_like_dicom_file(p)]
        if existing:
            raise OutputExistsError(
                f"{folder} already holds DICOM files ({existing[0].name}, ...); choose an empty folder or pass "
                "force=True (--force)"
            )
    reference = {**case.metadata, "PatientID": case.metadata.get("PatientID") or case.patient_id}
    reference.pop("SeriesInstanceUID", None)
    ct_meta = write_ct_series(case.ct, case.geometry, ct_folder, meta=reference, force=force)
    written: dict[str, Any] = {
        "ct_files": ct_meta["files"], "rtstruct": None, "rtdose": None,
        **{key: ct_meta[key] for key in PATIENT_STUDY_KEYS + ("FrameOfReferenceUID",) if ct_meta.get(key)},
        "CTSeriesInstanceUID": ct_meta["SeriesInstanceUID"],
    }
    for path, kept in ((rs_path, bool(case.structures)), (rd_path, case.dose is not None),
                       (rp_path, case.dose is not None)):
        if force and not kept and path.is_file():
            path.unlink()  # a stale RS/RD of an earlier write would otherwise be read with this CT
    if case.structures:
        written["RTStructSOPInstanceUID"] = write_rtstruct(
            case.structures, case.geometry, ct_meta, rs_path, force=force
        )
        written["rtstruct"] = str(rs_path)
    if case.dose is not None:
        dose_reference = {**ct_meta, "RTStructSOPInstanceUID": written.get("RTStructSOPInstanceUID", "")}
        plan = PlanDescription(prescriptions=dict(case.prescriptions))
        written["RTDoseSOPInstanceUID"] = write_rtdose(case.dose, case.geometry, rd_path, dose_reference, force=force,
                                                       plan=plan)
        written["rtdose"], written["rtplan"] = str(rd_path), str(rp_path)
    return written
