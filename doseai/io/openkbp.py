"""OpenKBP data: the ``.npz`` layout of ``../shared/data/openkbp`` and the challenge's sparse-CSV folders.

OpenKBP arrays are indexed [anterior->posterior, right->left, superior->inferior] with no origin.
We place them on an LPS grid with origin 0 and identity direction, as [z, y, x] with z running
inferior->superior: ``to_itk_order`` / ``from_itk_order`` do that permutation and flip exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from doseai.case import PlanningCase
from doseai.errors import UnreadableInputError, refuse_nonempty_folder, refuse_overwrite
from doseai.geometry import ImageGeometry

ROI_NAMES = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible",
             "PTV56", "PTV63", "PTV70")
CANONICAL = {"Brainstem": "Brainstem", "SpinalCord": "SpinalCord", "RightParotid": "Parotid_R",
             "LeftParotid": "Parotid_L", "Esophagus": "Esophagus", "Larynx": "Larynx", "Mandible": "Mandible",
             "PTV56": "PTV_56", "PTV63": "PTV_63", "PTV70": "PTV_70"}
PRESCRIPTIONS = {"PTV_56": 56.0, "PTV_63": 63.0, "PTV_70": 70.0}
POSSIBLE_DOSE_BIT = 10
CT_OFFSET = 1024  # OpenKBP stores HU + 1024
OPENKBP_SHAPE = (128, 128, 128)


def to_itk_order(array: np.ndarray) -> np.ndarray:
    """OpenKBP [ap, rl, si] -> [z, y, x] (z inferior->superior, y anterior->posterior, x right->left)."""
    return np.ascontiguousarray(np.transpose(array, (2, 0, 1))[::-1])


def from_itk_order(array: np.ndarray) -> np.ndarray:
    """[z, y, x] -> OpenKBP [ap, rl, si]: the inverse of :func:`to_itk_order`."""
    return np.ascontiguousarray(np.transpose(array[::-1], (1, 2, 0)))


def _geometry(shape_openkbp: tuple[int, ...], voxel_mm: np.ndarray) -> ImageGeometry:
    ap, rl, si = shape_openkbp
    v = [float(x) for x in voxel_mm]
    return ImageGeometry(shape=(si, ap, rl), spacing=(v[1], v[0], v[2]))


def _voxel_mm(geometry: ImageGeometry) -> np.ndarray:
    sx, sy, sz = geometry.spacing
    return np.array([sy, sx, sz], dtype=np.float32)


def _build_case(patient_id, voxel_mm, masks_openkbp: dict[str, np.ndarray], possible, ct=None, dose=None):
    shape = next(iter(masks_openkbp.values())).shape if masks_openkbp else possible.shape
    structures = {CANONICAL[raw]: to_itk_order(mask) for raw, mask in masks_openkbp.items() if mask.any()}
    return PlanningCase(
        geometry=_geometry(shape, voxel_mm),
        ct=None if ct is None else to_itk_order(ct),
        structures=structures,
        prescriptions={name: gy for name, gy in PRESCRIPTIONS.items() if name in structures},
        dose=None if dose is None else to_itk_order(dose),
        possible_dose_mask=to_itk_order(possible),
        patient_id=patient_id,
        metadata={"source": "OpenKBP"},
    )


def load_npz(path: str | os.PathLike) -> PlanningCase:
    """One patient of ``../shared/data/openkbp/<split>/<grid>/pt_N.npz``."""
    path = Path(path)
    try:
        data = np.load(path)
        bits = data["masks"]
        present = data["roi_present"]
        voxel_mm = data["voxel_mm"]
    except (OSError, KeyError, ValueError) as error:
        raise UnreadableInputError(f"{path}: not an OpenKBP .npz patient file ({error})") from error
    masks = {raw: (bits >> i) & 1 == 1 for i, raw in enumerate(ROI_NAMES) if present[i]}
    possible = (bits >> POSSIBLE_DOSE_BIT) & 1 == 1
    ct = data["ct"].astype(np.float32) - CT_OFFSET if "ct" in data.files else None
    dose = data["dose_cgy"].astype(np.float32) / 100.0 if "dose_cgy" in data.files else None
    return _build_case(path.stem, voxel_mm, masks, possible, ct=ct, dose=dose)


def load_npz_dose(path: str | os.PathLike) -> np.ndarray:
    """The dose (Gy, [z, y, x]) of an OpenKBP-ordered ``.npz`` holding ``dose_cgy`` or ``dose_gy``
    (a full patient file or a prediction file with just the dose)."""
    path = Path(path)
    try:
        data = np.load(path)
        if "dose_cgy" in data.files:
            dose = data["dose_cgy"].astype(np.float32) / 100.0
        elif "dose_gy" in data.files:
            dose = data["dose_gy"].astype(np.float32)
        else:
            raise UnreadableInputError(f"{path}: holds no dose (expected key 'dose_cgy' or 'dose_gy')")
    except (OSError, ValueError) as error:
        raise UnreadableInputError(f"{path}: not a readable .npz ({error})") from error
    return to_itk_order(dose)


def save_npz_dose(dose: np.ndarray, path: str | os.PathLike, force: bool = False) -> Path:
    """A prediction file: the dose (Gy, [z, y, x]) stored OpenKBP-ordered as ``dose_gy``."""
    path = Path(path)
    refuse_overwrite(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, dose_gy=from_itk_order(np.asarray(dose, dtype=np.float32)))
    return path


def save_npz(case: PlanningCase, path: str | os.PathLike, force: bool = False) -> Path:
    """Write a case in the ``.npz`` layout (structures not among the OpenKBP ROIs are left out)."""
    path = Path(path)
    refuse_overwrite(path, force)
    bits = np.zeros(case.geometry.shape, dtype=np.uint16)
    present = np.zeros(len(ROI_NAMES), dtype=bool)
    for i, raw in enumerate(ROI_NAMES):
        mask = case.structures.get(CANONICAL[raw])
        if mask is not None and mask.any():
            bits |= mask.astype(np.uint16) << i
            present[i] = True
    possible = case.possible_dose_mask if case.possible_dose_mask is not None else np.ones(bits.shape, bool)
    bits |= possible.astype(np.uint16) << POSSIBLE_DOSE_BIT
    arrays = {"masks": from_itk_order(bits), "roi_present": present, "roi_names": np.array(ROI_NAMES + ("possible_dose_mask",)),
              "voxel_mm": _voxel_mm(case.geometry)}
    if case.ct is not None:
        arrays["ct"] = from_itk_order(np.clip(np.round(case.ct + CT_OFFSET), 0, 4095).astype(np.int16))
    if case.dose is not None:
        arrays["dose_cgy"] = from_itk_order(np.round(case.dose * 100).astype(np.uint16))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


# --- the challenge's sparse CSV patient folders -------------------------------------------------
def _read_sparse_csv(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(flat indices, values or None for a mask) of a CSV with header ',data' (rows 'index,value' or 'index,').

    Parsed in bulk with numpy: a 128^3 CT file has ~2M rows, too many for a per-row Python loop.
    """
    with open(path) as handle:
        handle.readline()  # header ",data"
        text = handle.read()
    first = text.split("\n", 1)[0].split(",")
    is_mask = len(first) < 2 or not first[1].strip()
    tokens = text.replace(",", " ").split()
    if is_mask:
        return np.asarray(tokens, dtype=np.float64).astype(np.int64), None
    pairs = np.asarray(tokens, dtype=np.float64).reshape(-1, 2)
    return pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.float32)


def _dense(path: Path, shape=OPENKBP_SHAPE, dtype=np.float32) -> np.ndarray:
    flat, values = _read_sparse_csv(path)
    array = np.zeros(int(np.prod(shape)), dtype=dtype)
    array[flat] = 1 if values is None else values
    return array.reshape(shape)


def load_csv_dose(path: str | os.PathLike) -> np.ndarray:
    """A dose (Gy) from a challenge sparse CSV (``dose.csv`` or a prediction ``pt_N.csv``), as [z, y, x] on 128^3."""
    return to_itk_order(_dense(Path(path)))


def write_sparse_csv(array: np.ndarray, path: str | os.PathLike, mask: bool = False, force: bool = False) -> Path:
    """Write a 128^3 OpenKBP-ordered array as the challenge's sparse CSV (non-zero voxels only)."""
    path = Path(path)
    refuse_overwrite(path, force)
    flat = np.asarray(array).ravel()
    nonzero = np.flatnonzero(flat)
    with open(path, "w", newline="") as handle:
        handle.write(",data\n")
        if mask:
            handle.writelines(f"{i},\n" for i in nonzero)
        else:
            handle.writelines(f"{i},{flat[i]:.6g}\n" for i in nonzero)
    return path


def is_csv_patient(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a challenge patient folder (it has the ``possible_dose_mask.csv`` every one has)."""
    return (Path(folder) / "possible_dose_mask.csv").is_file()


def load_csv_patient(folder: str | os.PathLike) -> PlanningCase:
    """A patient folder of the original challenge (ct.csv, dose.csv, <roi>.csv, possible_dose_mask.csv,
    voxel_dimensions.csv)."""
    folder = Path(folder)
    if not is_csv_patient(folder):
        raise UnreadableInputError(f"{folder}: not an OpenKBP patient folder (no possible_dose_mask.csv)")
    try:
        voxel_mm = np.loadtxt(folder / "voxel_dimensions.csv").ravel()
        masks = {raw: _dense(folder / f"{raw}.csv", dtype=bool) for raw in ROI_NAMES if (folder / f"{raw}.csv").is_file()}
        possible = _dense(folder / "possible_dose_mask.csv", dtype=bool)
        ct = _dense(folder / "ct.csv") - CT_OFFSET if (folder / "ct.csv").is_file() else None
        dose = _dense(folder / "dose.csv") if (folder / "dose.csv").is_file() else None
    except (OSError, ValueError, IndexError) as error:
        raise UnreadableInputError(f"{folder}: unreadable OpenKBP CSV file ({error})") from error
    return _build_case(folder.name, voxel_mm, masks, possible, ct=ct, dose=dose)


def save_csv_patient(case: PlanningCase, folder: str | os.PathLike, force: bool = False) -> Path:
    """Write a case on the 128^3 grid as a challenge patient folder (what :func:`load_csv_patient` reads);
    refuses a non-empty folder unless ``force``."""
    folder = Path(folder)
    if case.geometry.shape != OPENKBP_SHAPE:
        raise UnreadableInputError(f"the OpenKBP CSV layout needs a 128^3 grid, the case is {case.geometry.shape}")
    refuse_nonempty_folder(folder, force)
    folder.mkdir(parents=True, exist_ok=True)
    for raw in ROI_NAMES:
        mask = case.structures.get(CANONICAL[raw])
        if mask is not None and mask.any():
            write_sparse_csv(from_itk_order(mask), folder / f"{raw}.csv", mask=True, force=True)
    possible = case.possible_dose_mask if case.possible_dose_mask is not None else np.ones(OPENKBP_SHAPE, bool)
    write_sparse_csv(from_itk_order(possible), folder / "possible_dose_mask.csv", mask=True, force=True)
    if case.ct is not None:
        write_sparse_csv(from_itk_order(np.clip(case.ct + CT_OFFSET, 0, 4095)), folder / "ct.csv", force=True)
    if case.dose is not None:
        write_sparse_csv(from_itk_order(case.dose), folder / "dose.csv", force=True)
    np.savetxt(folder / "voxel_dimensions.csv", _voxel_mm(case.geometry))
    return folder


def list_patients(folder: str | os.PathLike) -> dict[str, Path]:
    """Patients in an OpenKBP split folder: ``pt_N.npz`` files (also under a ``128/`` subfolder) or CSV
    patient folders; keyed by patient id, sorted by number."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UnreadableInputError(f"{folder}: no such folder")
    if (folder / "128").is_dir() and not any(folder.glob("*.npz")):
        folder = folder / "128"
    found = {p.stem: p for p in folder.glob("*.npz")}
    found.update({p.name: p for p in folder.iterdir() if p.is_dir() and is_csv_patient(p)})
    return dict(sorted(found.items(), key=lambda item: _patient_number(item[0])))


def _patient_number(patient_id: str) -> tuple[int, str]:
    digits = "".join(ch for ch in patient_id if ch.isdigit())
    return (int(digits) if digits else 0, patient_id)


def load_patient(path: str | os.PathLike) -> PlanningCase:
    """A patient of :func:`list_patients`: a ``.npz`` file or a CSV patient folder."""
    path = Path(path)
    return load_npz(path) if path.suffix == ".npz" else load_csv_patient(path)
