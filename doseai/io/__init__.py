"""Readers and writers: one ``load_case`` / ``save_case`` / ``load_dose`` over every supported format.

The formats are listed once, in :data:`FORMATS` (what ``doseai convert --to`` and ``doseai sample --format`` offer,
see :func:`case_format_names`): an OpenKBP ``.npz`` or sparse-CSV patient folder; a NRRD/NIfTI/MHA case folder
(``ct.<ext>``, ``structures.seg.nrrd`` or ``structures.<ext>`` labelmap, optional ``dose.<ext>``,
``case.json`` with prescriptions); a DICOM folder (CT series + RTSTRUCT, optional RTDOSE).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from doseai.case import PlanningCase, validate_dose
from doseai.errors import UnreadableInputError, refuse_malformed, refuse_nonempty_folder
from doseai.io import images, openkbp

Overrides = Mapping[str, str | None] | None  # raw structure name -> canonical name, or None to drop it


@dataclass(frozen=True)
class CaseFormat:
    """One way a planning case is stored: how :func:`load_case` recognises it, reads and writes it, and which
    dose files belong to it (for :func:`load_dose`)."""

    name: str
    description: str
    detect: Callable[[Path], bool]  # does this path (file or folder) hold a case of this format?
    load: Callable[[Path, Overrides], PlanningCase]
    save: Callable[[PlanningCase, Path, bool], Path]  # (case, out, force) -> the path written
    dose_suffixes: tuple[str, ...]  # lower-case endings of its dose files
    load_dose: Callable[[Path, PlanningCase], np.ndarray]  # a dose file onto the case's grid
    any_grid: bool = True  # False: it stores only its own grid (OpenKBP CSV: 128^3)


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


def load_image_case(folder: Path, overrides: Overrides = None) -> PlanningCase:
    """A case folder of images: ``ct.<ext>``, ``structures.seg.nrrd`` or a ``structures.<ext>`` labelmap (names
    in ``case.json``), optional ``dose.<ext>`` and ``possible_dose_mask.<ext>``, all on the CT's grid."""
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


def save_image_case(case: PlanningCase, folder: Path, ext: str = ".nrrd", force: bool = False) -> Path:
    """Write ``case`` as a case folder of images with extension ``ext`` (what :func:`load_image_case` reads);
    refuses a non-empty folder unless ``force``."""
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


# --- what each format does, for the registry below; DICOM is imported only when used (pydicom, matplotlib) ------
def _save_npz(case: PlanningCase, out: Path, force: bool) -> Path:
    return openkbp.save_npz(case, out if out.suffix == ".npz" else out.with_suffix(".npz"), force=force)


def _load_image_folder(path: Path, overrides: Overrides) -> PlanningCase:
    return load_image_case(path, overrides)  # looked up when called: doseai.io.load_image_case may be replaced


def _image_dose(path: Path, case: PlanningCase) -> np.ndarray:
    dose, geometry = images.read_image(path)
    case.geometry.require_match(geometry, f"dose {path.name}")
    return dose


def _image_format(name: str, suffixes: tuple[str, ...], description: str) -> CaseFormat:
    """An image case folder whose CT has one of ``suffixes`` (the first is what it is written with)."""
    def detect(path: Path) -> bool:
        ct = _find(path, "ct") if path.is_dir() else None
        return ct is not None and ct.name.lower().endswith(suffixes)

    return CaseFormat(name=name, description=description, detect=detect, load=_load_image_folder,
                      save=lambda case, out, force: save_image_case(case, out, ext=suffixes[0], force=force),
                      dose_suffixes=suffixes, load_dose=_image_dose)


def _load_dicom(path: Path, overrides: Overrides) -> PlanningCase:
    from doseai.io.dicom import read_dicom_case

    return read_dicom_case(path, overrides=overrides)


def _save_dicom(case: PlanningCase, out: Path, force: bool) -> Path:
    from doseai.io.dicom import write_dicom_case

    write_dicom_case(case, out, force=force)
    return out


def _dicom_dose(path: Path, case: PlanningCase) -> np.ndarray:
    """An RTDOSE resampled onto the case grid."""
    from doseai.io.dicom import read_rtdose
    from doseai.resample import resample_to

    dose_gy, dose_geometry, _ = read_rtdose(path)
    return resample_to(dose_gy, dose_geometry, case.geometry)


# In the order load_case tries them: the OpenKBP layouts first, DICOM (any folder with a DICOM file) last.
FORMATS: tuple[CaseFormat, ...] = (
    CaseFormat(
        name="openkbp-npz", description="an OpenKBP pt_N.npz file (structures as bits, CT, dose in cGy, voxel size)",
        detect=lambda path: path.suffix == ".npz", load=lambda path, overrides: openkbp.load_npz(path),
        save=_save_npz, dose_suffixes=(".npz",), load_dose=lambda path, case: openkbp.load_npz_dose(path)),
    CaseFormat(
        name="openkbp-csv", description="an OpenKBP challenge patient folder of sparse CSV files on a 128^3 grid",
        detect=lambda path: path.is_dir() and openkbp.is_csv_patient(path),
        load=lambda path, overrides: openkbp.load_csv_patient(path),
        save=lambda case, out, force: openkbp.save_csv_patient(case, out, force=force),
        dose_suffixes=(".csv",), load_dose=lambda path, case: openkbp.load_csv_dose(path), any_grid=False),
    _image_format("nrrd", (".nrrd", ".nhdr"),
                  "a folder with ct.nrrd, structures.seg.nrrd (Slicer segments), optional dose.nrrd and case.json"),
    _image_format("nifti", (".nii.gz", ".nii"),
                  "a folder with ct.nii.gz, a structures.nii.gz labelmap named in case.json, optional dose.nii.gz"),
    _image_format("mha", (".mha", ".mhd"),
                  "a folder with ct.mha, a structures.mha labelmap named in case.json, optional dose.mha"),
    CaseFormat(
        name="dicom", description="a DICOM folder: a CT series, the RTSTRUCT that refers to it, optional RTDOSE and "
                                  "RTPLAN",
        detect=lambda path: path.is_dir() and _looks_like_dicom(path), load=_load_dicom, save=_save_dicom,
        dose_suffixes=(".dcm",), load_dose=_dicom_dose),
)


def case_format_names(any_grid: bool = False) -> tuple[str, ...]:
    """The names of the case formats (choices of ``--format`` / ``--to``); with ``any_grid`` only those that store
    a case on any grid (not the 128^3 OpenKBP CSV)."""
    return tuple(fmt.name for fmt in FORMATS if fmt.any_grid or not any_grid)


CASE_FORMATS = case_format_names()  # kept for callers of the name list; the formats themselves are FORMATS


def case_format(name: str) -> CaseFormat:
    """The format called ``name``; an unknown name is an UnreadableInputError that lists the known ones."""
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise UnreadableInputError(f"unknown case format '{name}'; use one of {', '.join(case_format_names())}")


def detect_case_format(path: str | os.PathLike) -> CaseFormat | None:
    """The first format of :data:`FORMATS` that recognises ``path``, or None."""
    path = Path(path)
    return next((fmt for fmt in FORMATS if fmt.detect(path)), None)


@refuse_malformed("planning case")
def load_case(
    path: str | os.PathLike,
    overrides: Overrides = None,
    prescriptions: Mapping[str, float] | None = None,
    fmt: str | None = None,
) -> PlanningCase:
    """Read a planning case of format ``fmt``, or of the format ``path`` is recognised as (see :data:`FORMATS`).

    ``overrides`` map raw structure names to canonical ones (None drops one); ``prescriptions`` (target -> Gy) are
    added to those the case brings.
    """
    path = Path(path)
    if not path.exists():
        raise UnreadableInputError(f"{path}: no such file or folder")
    case_fmt = case_format(fmt) if fmt is not None else detect_case_format(path)
    if case_fmt is None:
        raise UnreadableInputError(
            f"{path}: not a planning case (expected an OpenKBP .npz or CSV folder, a folder with ct.nrrd and "
            "structures.seg.nrrd, or a DICOM folder with a CT series and an RTSTRUCT)"
        )
    case = case_fmt.load(path, overrides)
    if prescriptions:
        case.prescriptions.update(prescriptions)
    return case


def save_case(case: PlanningCase, out: str | os.PathLike, fmt: str = "nrrd", force: bool = False) -> Path:
    """Write ``case`` in format ``fmt`` (one of :func:`case_format_names`); refuses to overwrite unless ``force``.
    Returns the path written (an OpenKBP ``.npz`` gets that suffix)."""
    return case_format(fmt).save(case, Path(out), force)


@refuse_malformed("dose file")
def load_dose(path: str | os.PathLike, case: PlanningCase) -> np.ndarray:
    """A dose for ``case`` from an image file (same grid), an RTDOSE (resampled onto the case grid),
    an OpenKBP ``.npz`` (``dose_cgy``) or an OpenKBP sparse ``.csv`` (Gy, 128^3)."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableInputError(f"{path}: no such dose file")
    name = path.name.lower()
    fmt = next((fmt for fmt in FORMATS if name.endswith(fmt.dose_suffixes)), None)
    dose = (fmt.load_dose if fmt is not None else _image_dose)(path, case)  # other endings: SimpleITK decides
    if dose.shape != case.geometry.shape:
        raise UnreadableInputError(f"{path}: dose shape {dose.shape} does not match the case grid {case.geometry.shape}")
    return validate_dose(dose, f"dose {path.name}")
