"""Output paths checked before any computation: a prediction or a plan should never run for seconds or minutes
and then fail to write (a wrong extension, a folder that cannot be made, a file that exists)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from doseai.errors import DoseAIError, refuse_overwrite

DOSE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd", ".dcm")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _writable_folder(folder: Path) -> None:
    """``folder`` exists and is writable, or can be made: its nearest existing ancestor is a writable folder."""
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise DoseAIError(f"cannot write into {folder}: {existing} is a file, not a folder")
    try:  # a real probe: permissions alone say yes to root, and to /proc
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise DoseAIError(f"cannot write into {folder}: {existing} is not writable ({error.strerror})") from None


def check_output_file(path: str | os.PathLike, suffixes: Iterable[str], force: bool, what: str = "output") -> Path:
    """Refuse (one line) an output file with another extension than ``suffixes``, in a folder that cannot be
    written, or that exists without ``force``."""
    path = Path(path)
    suffixes = tuple(suffixes)
    if _suffix(path) not in suffixes:
        raise DoseAIError(f"{what} {path}: the extension must be one of {', '.join(suffixes)}")
    if path.is_dir():
        raise DoseAIError(f"{what} {path} is a folder; give a file name")
    refuse_overwrite(path, force)
    _writable_folder(path.parent)
    if path.exists() and not os.access(path, os.W_OK):
        raise DoseAIError(f"{what} {path} exists and is not writable")
    return path


def check_output_folder(folder: str | os.PathLike, names: Iterable[str], force: bool, what: str = "output folder"
                        ) -> Path:
    """Refuse (one line) an output folder that is a file or cannot be written, or that holds any of ``names``
    without ``force``."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DoseAIError(f"{what} {folder} is a file, not a folder")
    _writable_folder(folder)
    for name in names:
        refuse_overwrite(folder / name, force)
    return folder
