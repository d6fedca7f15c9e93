"""OpenKBP patients on the model grid, cached once under the cache folder (never in the repository).

Each cached patient holds the input channels (float16), the dose on the model grid normalised by
``norm_gy`` (float16; absent when the patient has no dose), whether it has a CT, and the model grid origin.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from doseai.io import openkbp
from doseai.models.features import GridSpec, case_features
from doseai.paths import cache_root, openkbp_root
from doseai.resample import resample_to


def _tag(spec: GridSpec, norm_gy: float) -> str:
    snapped = {"snap_to_case": True} if spec.snap_to_case else {}  # unsnapped caches keep their old tag
    key = json.dumps({"shape": spec.shape, "spacing": spec.spacing, "norm": norm_gy, "version": 1, **snapped})
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def cache_folder(split: str, spec: GridSpec, norm_gy: float) -> Path:
    """Where :func:`prepare_split` keeps ``split`` on the model grid: one folder per grid and dose scale."""
    return cache_root() / "openkbp_model_grid" / _tag(spec, norm_gy) / split


def prepare_split(split: str, spec: GridSpec, norm_gy: float = 70.0, source: Path | None = None) -> Path:
    """Write (once) every patient of ``split`` on the model grid; returns the cache folder."""
    folder = cache_folder(split, spec, norm_gy)
    folder.mkdir(parents=True, exist_ok=True)
    patients = openkbp.list_patients((source or openkbp_root()) / split)
    todo = {pid: path for pid, path in patients.items() if not (folder / f"{pid}.npz").is_file()}
    for pid, path in tqdm(todo.items(), desc=f"preparing {split} on the model grid", unit="patient"):
        case = openkbp.load_npz(path)
        features, grid = case_features(case, spec, norm_gy)
        arrays = {"features": features.astype(np.float16), "has_ct": np.array(case.ct is not None),
                  "origin": np.array(grid.origin)}
        if case.dose is not None:
            arrays["dose"] = (resample_to(case.dose, case.geometry, grid) / norm_gy).astype(np.float16)
        tmp = folder / f"{pid}.tmp.npz"
        np.savez(tmp, **arrays)
        tmp.rename(folder / f"{pid}.npz")  # atomic: an interrupted run never leaves a half-written patient
    return folder


@dataclass
class ModelGridData:
    """A split held in memory: features [N, C, z, y, x] and doses [N, 1, z, y, x] (float16)."""

    ids: list[str]
    features: np.ndarray
    doses: np.ndarray
    has_ct: np.ndarray


def load_split(split: str, spec: GridSpec, norm_gy: float = 70.0, need_dose: bool = True,
               need_ct: bool = False) -> ModelGridData:
    """``split`` on the model grid (prepared first if need be), patients in id order; ``need_dose`` /
    ``need_ct`` leave out those without a dose / a CT (a patient without a dose gets zeros otherwise)."""
    folder = prepare_split(split, spec, norm_gy)
    ids, features, doses, has_ct = [], [], [], []
    for path in sorted(folder.glob("pt_*.npz"), key=lambda p: int(p.stem.split("_")[1])):
        data = np.load(path)
        if (need_dose and "dose" not in data.files) or (need_ct and not bool(data["has_ct"])):
            continue
        ids.append(path.stem)
        features.append(data["features"])
        doses.append(data["dose"][np.newaxis] if "dose" in data.files else np.zeros((1,) + spec.shape, np.float16))
        has_ct.append(bool(data["has_ct"]))
    return ModelGridData(ids, np.stack(features), np.stack(doses), np.array(has_ct))
