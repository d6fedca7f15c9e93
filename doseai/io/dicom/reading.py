"""Finding and reading DICOM files: the headers of a folder tree, whole RT objects, and the plane geometry that
CT slices and RTDOSE frames share."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from doseai.errors import UnreadableInputError
from doseai.io.dicom.writing import PATIENT_STUDY_KEYS

PathLike = str | os.PathLike

# What a reader returns of each object's header (patient, study, series, frame of reference), by keyword.
META_KEYS = PATIENT_STUDY_KEYS + (
    "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "FrameOfReferenceUID", "Modality",
    "Manufacturer", "PatientPosition",
)
POSITION_TOL_MM = 0.01


def text_of(ds: Dataset, keyword: str) -> str:
    """The attribute ``keyword`` of ``ds`` as text, "" when absent or empty."""
    value = ds.get(keyword, "")
    return "" if value is None else str(value)


def meta_of(ds: Dataset) -> dict[str, Any]:
    """The :data:`META_KEYS` attributes of ``ds`` as text."""
    return {key: text_of(ds, key) for key in META_KEYS}


def looks_like_dicom_file(path: Path) -> bool:
    """Whether ``path`` is named ``.dcm`` or has the DICM magic after the 128-byte preamble (unreadable: no)."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


@dataclass(frozen=True)
class Entry:
    """One DICOM file found by :func:`scan_folder`, with its header (no pixel data)."""

    path: Path
    header: Dataset

    @property
    def modality(self) -> str:
        """The file's Modality in upper case ("" when missing)."""
        return text_of(self.header, "Modality").upper()

    def get(self, keyword: str) -> str:
        """The header attribute ``keyword`` as text (see :func:`text_of`)."""
        return text_of(self.header, keyword)


@dataclass
class Scan:
    """The DICOM files under a folder (see :func:`scan_folder`) and the files that did not parse."""

    folder: Path
    entries: list[Entry]
    unreadable: list[Path]

    def of(self, modality: str) -> list[Entry]:
        """The entries of ``modality`` (upper case, e.g. "CT")."""
        return [e for e in self.entries if e.modality == modality]

    def describe(self) -> str:
        """What was found, for error messages: '3 MR files, 1 RTSTRUCT file, 2 unreadable files (a.dcm, ...)'."""
        counts: dict[str, int] = {}
        for entry in self.entries:
            key = entry.modality or "unknown-modality"
            counts[key] = counts.get(key, 0) + 1
        parts = [f"{n} {m} file{'s' * (n > 1)}" for m, n in sorted(counts.items())]
        if self.unreadable:
            names = ", ".join(p.name for p in self.unreadable[:3]) + (", ..." if len(self.unreadable) > 3 else "")
            plural = "s" * (len(self.unreadable) > 1)
            parts.append(f"{len(self.unreadable)} unreadable or non-DICOM file{plural} ({names})")
        return ", ".join(parts) or "no files"


def read_header(path: Path) -> Dataset | None:
    """The header of a DICOM file, or None when it is not DICOM or is corrupt."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        if path.suffix.lower() not in ("", ".dcm", ".ima"):
            return None  # other files (.nrrd, .txt, ...) are not worth a forced parse
        # old files without the 128-byte preamble still parse when forced; garbage yields no SOP class
    except Exception:  # noqa: BLE001 - pydicom raises many kinds on corrupt input
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        return ds if "SOPClassUID" in ds and "Modality" in ds else None
    except Exception:  # noqa: BLE001
        return None


def scan_folder(folder: PathLike) -> Scan:
    """Headers of all DICOM files under ``folder`` (recursively); files that do not parse are listed apart."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise UnreadableInputError(f"{folder} {what}; give the folder that holds the DICOM files")
    entries, unreadable = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        header = read_header(path)
        if header is None:
            unreadable.append(path)
        else:
            entries.append(Entry(path, header))
    return Scan(folder, entries, unreadable)


def read_rt_object(path: PathLike, modality: str) -> Dataset:
    """A whole DICOM file that must be of ``modality``; anything else is an UnreadableInputError."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableInputError(f"{path} does not exist; give the path of the {modality} file")
    if read_header(path) is None:
        raise UnreadableInputError(
            f"{path} is not a readable DICOM file (corrupt or not DICOM); give a valid {modality}"
        )
    ds = pydicom.dcmread(path, force=True)
    found = text_of(ds, "Modality") or "missing"
    if found.upper() != modality:
        raise UnreadableInputError(
            f"{path} is not an {modality} file (its Modality is {found}); give the {modality} file"
        )
    return ds


def uniform_step(positions: np.ndarray, what: str) -> float:
    """The common spacing of sorted ``positions`` (mm); unequal or repeated spacing is an error."""
    steps = np.diff(positions)
    if steps.size == 0:
        return 0.0
    if steps.min() < POSITION_TOL_MM:
        raise UnreadableInputError(f"{what} has two slices at the same position; remove the duplicate slices")
    if steps.max() - steps.min() > POSITION_TOL_MM + 1e-3 * steps.mean():
        raise UnreadableInputError(
            f"{what} has unequal slice spacing ({steps.min():.3g} to {steps.max():.3g} mm; a slice may be missing); "
            "give a complete series with equally spaced slices, or resample it first"
        )
    return float(steps.mean())


def plane_vectors(ds: Dataset, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit row, column and normal vectors from ImageOrientationPatient."""
    try:
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=float)
        row, col = iop[:3] / np.linalg.norm(iop[:3]), iop[3:6] / np.linalg.norm(iop[3:6])
    except (AttributeError, ValueError, TypeError, IndexError) as error:
        raise UnreadableInputError(
            f"{what} has no valid ImageOrientationPatient ({error}); it cannot be placed in space"
        ) from error
    return row, col, np.cross(row, col)


def pixel_spacing(ds: Dataset, what: str) -> tuple[float, float]:
    """(x, y) spacing: PixelSpacing is stored as (row spacing = y, column spacing = x)."""
    try:
        dy, dx = (float(v) for v in ds.PixelSpacing)
    except (AttributeError, ValueError, TypeError) as error:
        raise UnreadableInputError(f"{what} has no valid PixelSpacing; it cannot be placed in space") from error
    return dx, dy
