"""Training data that travels: the OpenKBP splits packed into a size budget, for a lent GPU machine that receives
only the working tree (at most 64 MiB there, the repository included) and nothing from ``../shared``.

Each patient's arrays are stored raw and compressed with LZMA (about 23 % smaller than the ``.npz`` files'
deflate), one tar member per patient, so that the budget is checked patient by patient. The validation split
goes first and whole (the benchmark needs it), then the training patients in their order until the budget is
spent; ``manifest.json`` lists what was packed and what was left out. A further part continues with the
training patients the earlier parts left out (the device machine keeps what one call brought while it stays warm,
so parts travel in calls back to back). Unpacking restores the
``openkbp/<split>/128/pt_N.npz`` layout under a data root (``DOSEAI_DATA``) with the arrays unchanged.
"""

from __future__ import annotations

import io
import json
import lzma
import tarfile
from pathlib import Path

import numpy as np

from doseai.errors import DoseAIError, UnreadableInputError
from doseai.io import openkbp

GRID_FOLDER = "128"  # the OpenKBP grid the training reads (openkbp/<split>/128)
MANIFEST = "manifest.json"


def _packed_patient(path: Path) -> bytes:
    """The arrays of one ``pt_N.npz``, uncompressed in an .npz, then LZMA-compressed."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return lzma.compress(buffer.getvalue(), preset=6)


def _add_member(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    archive.addfile(info, io.BytesIO(payload))


def pack_openkbp(source: Path, out: Path, budget_bytes: int, splits: tuple[str, ...] = ("validation", "train"),
                 limits: dict[str, int] | None = None, exclude: dict[str, set[str]] | None = None,
                 whole_first: bool = True) -> dict:
    """Pack the OpenKBP ``splits`` of ``source`` (the ``openkbp`` folder) into ``out`` (``<split>.tar`` and the
    manifest) within ``budget_bytes`` in all; ``limits``: at most this many patients of a split; ``exclude``: per
    split, patients packed already (by an earlier part, see :func:`packed_patients`). With ``whole_first`` the
    first split must fit whole. Returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"budget_bytes": int(budget_bytes), "splits": {}}
    used = 0
    for index, split in enumerate(splits):
        patients = {pid: path for pid, path in openkbp.list_patients(Path(source) / split).items()
                    if pid not in (exclude or {}).get(split, set())}
        if not patients:
            raise UnreadableInputError(f"{Path(source) / split}: no OpenKBP patients to pack" +
                                       (" (the earlier parts hold every one)" if exclude else ""))
        limit = (limits or {}).get(split)
        packed, left_out = [], []
        full = False  # once a patient does not fit, the rest of the split is left out (the order is kept)
        with tarfile.open(out / f"{split}.tar", "w") as archive:
            for number, (pid, path) in enumerate(patients.items()):
                if path.suffix != ".npz":
                    raise UnreadableInputError(f"{path}: only .npz patients are packed (not the challenge CSVs)")
                payload = None if full or (limit is not None and number >= limit) else _packed_patient(path)
                if payload is not None and used + len(payload) > budget_bytes:
                    payload, full = None, True
                if payload is None:
                    left_out.append(pid)
                    continue
                _add_member(archive, f"{pid}.npz.xz", payload)
                packed.append(pid)
                used += len(payload)
        if whole_first and index == 0 and left_out and limit is None:
            raise DoseAIError(f"the {split} split alone needs more than {budget_bytes / 1e6:.1f} MB: raise the budget")
        manifest["splits"][split] = {"packed": packed, "left_out": left_out}
    manifest["packed_bytes"] = used
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def packed_patients(folders) -> dict[str, set[str]]:
    """Per split, the patients the packs in ``folders`` hold (to continue with the next part)."""
    packed: dict[str, set[str]] = {}
    for folder in folders:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
        for split, listing in manifest["splits"].items():
            packed.setdefault(split, set()).update(listing["packed"])
    return packed


def unpack_openkbp(folder: Path, data_root: Path) -> dict:
    """Restore a pack made by :func:`pack_openkbp` as ``data_root/openkbp/<split>/128/pt_N.npz``; the manifest."""
    manifest_path = Path(folder) / MANIFEST
    if not manifest_path.is_file():
        raise UnreadableInputError(f"{folder}: no {MANIFEST}: not a training-data pack (doseai.train.travel)")
    manifest = json.loads(manifest_path.read_text())
    for split, listing in manifest["splits"].items():
        target = Path(data_root) / "openkbp" / split / GRID_FOLDER
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(Path(folder) / f"{split}.tar") as archive:
            for member in archive.getmembers():
                pid = member.name.removesuffix(".npz.xz")
                if pid not in listing["packed"] or "/" in member.name:
                    raise UnreadableInputError(f"{folder}/{split}.tar: unexpected member {member.name!r}")
                (target / f"{pid}.npz").write_bytes(lzma.decompress(archive.extractfile(member).read()))
    return manifest
