"""Readers and writers: one ``load_case`` / ``save_case`` / ``load_dose`` over every supported format.

Formats: an OpenKBP ``.npz`` or sparse-CSV patient folder; a NRRD/NIfTI/MHA case folder
(``ct.<ext>``, ``structures.seg.nrrd`` or ``structures.<ext>`` labelmap, optional ``dose.<ext>``,
``case.json`` with prescriptions); a DICOM folder (CT series + RTSTRUCT, optional RTDOSE).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from doseai.case import PlanningCase, validate_dose
from doseai.errors import UnreadableInputError, refuse_malformed, refuse_nonempty_folder
from doseai.io import images, openkbp

CASE_FORMATS = ("nrrd", "nifti", "dicom", "openkbp-npz", "openkbp-csv")
_IMAGE_EXT = {"nrrd": ".nrrd", "nifti": ".nii.gz", "mha": ".mha"}


def _find(folder: Path, stem: str) -> Path | None:
    for suffix in images.IMAGE_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _looks_like_dicom(folder: Path) -> bool:
    for path in folder.rglob("*"):
        if path.is_file():
            if path.suffix.lower() == ".dcm":
                return True
            with open(path, "rb") as handle:
                if handle.read(132)[128:132] == b"DICM":
                    return True
    return False


@refuse_malformed("planning case")
def load_case(
    path: str | os.PathLike,
    overrides: Mapping[str, str | None] | None = None,
    prescriptions: Mapping[str, float] | None = None,
) -> PlanningCase:
    """Read a planning case from any supported format (see module docstring)."""
    path = Path(path)
    if not path.exists():
        raise UnreadableInputError(f"{path}: no such file or folder")
    if path.suffix == ".npz":
        case = openkbp.load_npz(path)
    elif path.is_dir() and openkbp.is_csv_patient(path):
        case = openkbp.load_csv_patient(path)
    elif path.is_dir() and _find(path, "ct") is not None:
        case = load_image_case(path, overrides)
    elif path.is_dir() and _looks_like_dicom(path):
        from doseai.io.dicom import read_dicom_case

        case = read_dicom_case(path, overrides=overrides)
    else:
        raise UnreadableInputError(
            f"{path}: not a planning case (expected an OpenKBP .npz or CSV folder, a folder with ct.nrrd and "
            "structures.seg.nrrd, or a DICOM folder with a CT series and an RTSTRUCT)"
        )
    if prescriptions:
        case.prescriptions.update(prescriptions)
    return case


def _case_info(path: Path) -> dict:
    """``case.json`` beside an image case (patient id, prescriptions, label names), checked."""
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnreadableInputError(f"{path}: not valid JSON ({error})") from None
    prescriptions = info.get("prescriptions", {}) if isinstance(info, dict) else None
    if not isinstance(prescriptions, dict) or not all(
            isinstance(gy, (int, float)) and not isinstance(gy, bool) for gy in prescriptions.values()):
        raise UnreadableInputError(f"{path}: expected an object whose 'prescriptions' map target names to doses in "
                                   'Gy, e.g. {"prescriptions": {"PTV_70": 70}}')
    if not isinstance(info.get("labels", {}), dict) or not isinstance(info.get("metadata", {}), dict):
        raise UnreadableInputError(f"{path}: 'labels' and 'metadata' must be objects")
    return info


def load_image_case(folder: Path, overrides: Mapping[str, str | None] | None = None) -> PlanningCase:
    ct, geometry = images.read_image(_find(folder, "ct"))
    info = _case_info(folder / "case.json")
    seg_path = folder / "structures.seg.nrrd"
    structures_path = seg_path if seg_path.is_file() else _find(folder, "structures")
    if structures_path is None:
        raise UnreadableInputError(f"{folder}: no structures.seg.nrrd or structures labelmap next to the CT")
    label_names = {int(k): v for k, v in info.get("labels", {}).items()}
    masks, mask_geometry = images.read_labelmap(structures_path, label_names)
    geometry.require_match(mask_geometry, f"structures ({structures_path.name})")
    dose = None
    dose_path = _find(folder, "dose")
    if dose_path is not None:
        dose, dose_geometry = images.read_image(dose_path)
        geometry.require_match(dose_geometry, f"dose ({dose_path.name})")
    possible = None
    possible_path = _find(folder, "possible_dose_mask")
    if possible_path is not None:
        possible = images.read_image(possible_path, dtype=np.uint8)[0] > 0
    return PlanningCase.from_named_masks(
        geometry, masks, ct=ct, dose=dose, overrides=overrides,
        prescriptions=info.get("prescriptions"), possible_dose_mask=possible,
        patient_id=info.get("patient_id", folder.name), metadata=info.get("metadata", {}),
    )


def save_case(case: PlanningCase, out: str | os.PathLike, fmt: str = "nrrd", force: bool = False) -> Path:
    """Write ``case`` in format ``fmt`` (one of CASE_FORMATS); refuses to overwrite unless ``force``."""
    out = Path(out)
    if fmt == "openkbp-npz":
        return openkbp.save_npz(case, out if out.suffix == ".npz" else out.with_suffix(".npz"), force=force)
    if fmt == "openkbp-csv":
        return openkbp.save_csv_patient(case, out, force=force)
    if fmt == "dicom":
        from doseai.io.dicom import write_dicom_case

        write_dicom_case(case, out, force=force)
        return out
    if fmt not in ("nrrd", "nifti", "mha"):
        raise UnreadableInputError(f"unknown case format '{fmt}'; use one of {', '.join(CASE_FORMATS)}")
    return save_image_case(case, out, ext=_IMAGE_EXT[fmt], force=force)


def save_image_case(case: PlanningCase, folder: Path, ext: str = ".nrrd", force: bool = False) -> Path:
    refuse_nonempty_folder(folder, force)
    folder.mkdir(parents=True, exist_ok=True)
    info = {"patient_id": case.patient_id, "prescriptions": case.prescriptions, "metadata": case.metadata}
    if case.ct is not None:
        images.write_image(case.ct.astype(np.int16), case.geometry, folder / f"ct{ext}", force=True)
    if ext == ".nrrd":
        images.write_seg_nrrd(case.structures, case.geometry, folder / "structures.seg.nrrd", force=True)
    else:  # NIfTI/MHA carry no segment names: a labelmap plus its names in case.json
        labels = images.write_labelmap(case.structures, case.geometry, folder / f"structures{ext}", force=True)
        info["labels"] = labels
    if case.dose is not None:
        images.write_image(case.dose, case.geometry, folder / f"dose{ext}", force=True)
    if case.possible_dose_mask is not None:
        images.write_image(case.possible_dose_mask.astype(np.uint8), case.geometry,
                           folder / f"possible_dose_mask{ext}", force=True)
    (folder / "case.json").write_text(json.dumps(info, indent=2))
    return folder


@refuse_malformed("dose file")
def load_dose(path: str | os.PathLike, case: PlanningCase) -> np.ndarray:
    """A dose for ``case`` from an image file (same grid), an RTDOSE (resampled onto the case grid),
    an OpenKBP ``.npz`` (``dose_cgy``) or an OpenKBP sparse ``.csv`` (Gy, 128^3)."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableInputError(f"{path}: no such dose file")
    name = path.name.lower()
    if name.endswith(".npz"):
        dose = openkbp.load_npz_dose(path)
    elif name.endswith(".csv"):
        dose = openkbp.to_itk_order(openkbp._dense(path))
    elif name.endswith(".dcm"):
        from doseai.io.dicom import read_rtdose
        from doseai.resample import resample_to

        dose_gy, dose_geometry, _ = read_rtdose(path)
        dose = resample_to(dose_gy, dose_geometry, case.geometry)
    else:
        dose, geometry = images.read_image(path)
        case.geometry.require_match(geometry, f"dose {path.name}")
    if dose.shape != case.geometry.shape:
        raise UnreadableInputError(f"{path}: dose shape {dose.shape} does not match the case grid {case.geometry.shape}")
    return validate_dose(dose, f"dose {path.name}")
