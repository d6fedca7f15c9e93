"""Planning objectives derived from a (predicted) 3D dose.

Following the approach of Gao et al. 2025 (the dose-preference paper: a predicted dose is turned into
DVH point objectives sampled along each structure's predicted DVH, with rule-based margins, which a
planner enters in a TPS or an optimizer uses directly), with these rules (every number is a field of
:class:`FromDoseRules`):

Targets (structures with a prescription Rx):
  * min DVH  ``D95 >= coverage[95] * Rx`` and ``D98 >= coverage[98] * Rx``   (defaults 1.00 and 1.00)
  * max DVH  ``D2 <= hotspot * Rx``                                           (default 1.07)
    For a target that is not the highest-dose one, its hottest 2 % may lie next to a higher target,
    so the limit is the larger of that and its predicted D2 + the OAR margin.
  * max      ``Dmax <= target_max * Rx`` when ``target_max`` is set           (default: not set)
OARs (every other non-empty structure except the body outline, ``body_names``):
  * for each volume level v of ``volume_levels`` (2, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 98 %),
    with the predicted dose-at-volume D_v:  max DVH  ``V(D_v + margin(D_v)) <= v %``,
    margin(d) = max(``oar_margin_gy``, ``oar_margin_fraction`` * d)           (defaults 1 Gy, 3 %)
    A level applies when v % of the structure is at least one voxel and D_v >= ``oar_min_dose_gy``
    (default 1 Gy: nothing to spare below); a level whose dose is within ``merge_gy`` (0.1 Gy) of
    the previous (smaller-volume, stricter) one is dropped.
  * max mean ``mean <= predicted mean + margin(predicted mean)`` when the predicted mean >= ``oar_min_dose_gy``
  * max      for serial organs (``serial_oars``: spinal cord, brainstem, optic structures):
    ``Dmax <= predicted Dmax + margin(predicted Dmax)``
Priorities: ``target_min_priority`` (100), ``target_max_priority`` (50), ``oar_dvh_priority`` (5),
``oar_mean_priority`` (10), ``serial_max_priority`` (20).

:func:`objectives_to_json` / :func:`objectives_to_csv` write them for a planner (CSV columns: structure,
type, dose_gy, volume_pct, priority, note); :func:`objectives_to_terms` makes the torch terms of
:mod:`doseai.optimize.objectives` from working-grid masks; :func:`mimicking_terms` builds a dose-mimicking
objective set instead (voxel-wise: two-sided in targets and the rest of the body, one-sided in OARs).
"""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from doseai.dvh import dose_at_volume_pct
from doseai.errors import GeometryMismatchError, MissingStructureError, refuse_overwrite
from doseai.optimize.objectives import (
    DoseMimicking, MaxDVH, MeanDose, MinDVH, ObjectiveTerm, SquaredOverdose, SquaredUnderdose, voxel_indices,
)
from doseai.structures import is_target

__all__ = [
    "FromDoseRules", "PlanObjective", "OBJECTIVE_TYPES", "CSV_COLUMNS", "objectives_from_dose", "objectives_from_case",
    "objectives_to_json", "objectives_from_json", "objectives_to_csv", "objectives_to_terms", "mimicking_terms",
]

OBJECTIVE_TYPES = ("min DVH", "max DVH", "max mean", "max", "min")
CSV_COLUMNS = ("structure", "type", "dose_gy", "volume_pct", "priority", "note")
DEFAULT_VOLUME_LEVELS = (2.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 98.0)
DEFAULT_SERIAL_OARS = ("SpinalCord", "Brainstem", "OpticChiasm", "OpticNrv_L", "OpticNrv_R")
DEFAULT_BODY_NAMES = ("External", "Body", "BODY")


@dataclass(frozen=True)
class FromDoseRules:
    """The margins and priorities of :func:`objectives_from_dose` (see the module docstring)."""

    coverage: tuple[tuple[float, float], ...] = ((95.0, 1.0), (98.0, 1.0))  # (volume %, fraction of Rx)
    hotspot: float = 1.07
    hotspot_volume_pct: float = 2.0
    target_max: float | None = None
    volume_levels: tuple[float, ...] = DEFAULT_VOLUME_LEVELS
    oar_margin_gy: float = 1.0
    oar_margin_fraction: float = 0.03
    oar_min_dose_gy: float = 1.0
    merge_gy: float = 0.1
    serial_oars: tuple[str, ...] = DEFAULT_SERIAL_OARS
    body_names: tuple[str, ...] = DEFAULT_BODY_NAMES
    target_min_priority: float = 100.0
    target_max_priority: float = 50.0
    oar_dvh_priority: float = 5.0
    oar_mean_priority: float = 10.0
    serial_max_priority: float = 20.0

    def __post_init__(self) -> None:
        if self.hotspot < 1.0:
            raise ValueError(f"the target hotspot limit must be >= 1 x prescription, got {self.hotspot}")
        if self.oar_margin_gy < 0 or self.oar_margin_fraction < 0:
            raise ValueError("OAR margins must be >= 0")
        if any(not 0 < v < 100 for v in self.volume_levels):
            raise ValueError(f"volume levels must lie in (0, 100) %, got {self.volume_levels}")

    def margin(self, dose_gy: float) -> float:
        """The OAR margin (Gy) below a dose: the larger of the fixed and the proportional one."""
        return max(self.oar_margin_gy, self.oar_margin_fraction * dose_gy)


@dataclass
class PlanObjective:
    """One objective as a planner types it into a TPS. ``volume_pct``: the DVH volume (max: 0, min: 100,
    max mean: None)."""

    structure: str
    type: str
    dose_gy: float
    volume_pct: float | None
    priority: float
    note: str = ""

    def __post_init__(self) -> None:
        if self.type not in OBJECTIVE_TYPES:
            raise ValueError(f"objective type {self.type!r} is not one of {OBJECTIVE_TYPES}")
        self.dose_gy = float(self.dose_gy)
        self.priority = float(self.priority)
        if self.volume_pct is not None:
            self.volume_pct = float(self.volume_pct)


def _round(value: float) -> float:
    return float(round(value, 2))


def objectives_from_dose(
    dose: np.ndarray,
    structures: Mapping[str, np.ndarray],
    prescriptions: Mapping[str, float],
    rules: FromDoseRules | None = None,
) -> list[PlanObjective]:
    """DVH objectives from ``dose`` (Gy, [z, y, x]) for every non-empty structure (see module docstring).
    ``prescriptions`` maps target names to Gy. Empty structures are left out with a warning."""
    rules = rules or FromDoseRules()
    dose = np.asarray(dose, dtype=np.float32)
    if not prescriptions:
        raise MissingStructureError("no target with a prescription: give prescriptions (target name -> Gy)")
    out: list[PlanObjective] = []
    top_rx = max(prescriptions.values())
    for name, mask in structures.items():
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != dose.shape:
            raise GeometryMismatchError(f"structure '{name}' has shape {mask.shape}, the dose {dose.shape}")
        values = dose[mask].astype(np.float64)
        if values.size == 0:
            warnings.warn(f"structure '{name}' is empty: no objectives for it", stacklevel=2)
            continue
        if name in prescriptions:
            out.extend(_target_objectives(name, values, float(prescriptions[name]), top_rx, rules))
        elif name in rules.body_names:
            continue
        elif is_target(name):
            warnings.warn(f"target '{name}' has no prescription: no objectives for it", stacklevel=2)
        else:
            out.extend(_oar_objectives(name, values, rules))
    for name in prescriptions:
        if name not in structures or not np.any(structures[name]):
            raise MissingStructureError(f"target '{name}' has a prescription but its mask is missing or empty")
    return out


def objectives_from_case(case, dose: np.ndarray | None = None,
                         rules: FromDoseRules | None = None) -> list[PlanObjective]:
    """:func:`objectives_from_dose` for a :class:`~doseai.case.PlanningCase` (its own dose unless given)."""
    dose = case.dose if dose is None else dose
    if dose is None:
        raise ValueError("the case holds no dose: pass dose=")
    case.require_target()
    return objectives_from_dose(dose, case.structures, case.prescriptions, rules)


def _target_objectives(name, values, rx, top_rx, rules: FromDoseRules) -> list[PlanObjective]:
    out = []
    for volume, fraction in rules.coverage:
        out.append(PlanObjective(name, "min DVH", _round(fraction * rx), volume, rules.target_min_priority,
                                 f"D{volume:g} >= {fraction:g} x Rx {rx:g} Gy"))
    limit = rules.hotspot * rx
    note = f"D{rules.hotspot_volume_pct:g} <= {rules.hotspot:g} x Rx"
    if rx < top_rx:
        predicted = dose_at_volume_pct(values, rules.hotspot_volume_pct)
        relaxed = predicted + rules.margin(predicted)
        if relaxed > limit:
            limit = relaxed
            note = f"predicted D{rules.hotspot_volume_pct:g} {predicted:.2f} Gy + margin (beside a higher target)"
    out.append(PlanObjective(name, "max DVH", _round(limit), rules.hotspot_volume_pct, rules.target_max_priority, note))
    if rules.target_max is not None:
        out.append(PlanObjective(name, "max", _round(rules.target_max * rx), 0.0, rules.target_max_priority,
                                 f"Dmax <= {rules.target_max:g} x Rx"))
    return out


def _oar_objectives(name, values, rules: FromDoseRules) -> list[PlanObjective]:
    out = []
    previous = None
    for volume in sorted(rules.volume_levels):
        if volume / 100.0 * values.size < 1.0:
            continue
        predicted = dose_at_volume_pct(values, volume)
        if predicted < rules.oar_min_dose_gy:
            continue
        limit = _round(predicted + rules.margin(predicted))
        if previous is not None and previous - limit <= rules.merge_gy:
            continue
        previous = limit
        out.append(PlanObjective(name, "max DVH", limit, volume, rules.oar_dvh_priority,
                                 f"predicted D{volume:g} {predicted:.2f} Gy + {rules.margin(predicted):.2f} Gy"))
    mean = float(values.mean())
    if mean >= rules.oar_min_dose_gy:
        out.append(PlanObjective(name, "max mean", _round(mean + rules.margin(mean)), None, rules.oar_mean_priority,
                                 f"predicted mean {mean:.2f} Gy + {rules.margin(mean):.2f} Gy"))
    if name in rules.serial_oars:
        top = float(values.max())
        out.append(PlanObjective(name, "max", _round(top + rules.margin(top)), 0.0, rules.serial_max_priority,
                                 f"predicted max {top:.2f} Gy + {rules.margin(top):.2f} Gy"))
    return out


# --- export ----------------------------------------------------------------------------------------------
def objectives_to_json(objectives: Sequence[PlanObjective], path, force: bool = False,
                       rules: FromDoseRules | None = None, metadata: Mapping | None = None) -> Path:
    """Write the objectives (and the rules that made them) as JSON; refuses to overwrite unless ``force``."""
    path = Path(path)
    refuse_overwrite(path, force)
    document = {"objectives": [asdict(o) for o in objectives]}
    if rules is not None:
        document["rules"] = asdict(rules)
    if metadata:
        document["metadata"] = dict(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2))
    return path


def objectives_from_json(path) -> list[PlanObjective]:
    """The objectives of a file written by :func:`objectives_to_json`."""
    document = json.loads(Path(path).read_text())
    return [PlanObjective(**item) for item in document["objectives"]]


def objectives_to_csv(objectives: Sequence[PlanObjective], path, force: bool = False) -> Path:
    """Write one row per objective with :data:`CSV_COLUMNS`; refuses to overwrite unless ``force``."""
    path = Path(path)
    refuse_overwrite(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for o in objectives:
            volume = "" if o.volume_pct is None else f"{o.volume_pct:g}"
            writer.writerow([o.structure, o.type, f"{o.dose_gy:.2f}", volume, f"{o.priority:g}", o.note])
    return path


# --- to torch terms --------------------------------------------------------------------------------------
def objectives_to_terms(objectives: Sequence[PlanObjective], masks: Mapping[str, np.ndarray],
                        device: str | torch.device = "cpu") -> list[ObjectiveTerm]:
    """Torch objective terms on the working grid whose structure ``masks`` ([z, y, x] bool, C order = rows of
    the influence matrix) are given. Objectives of structures that are missing or empty there are left out
    with a warning."""
    terms: list[ObjectiveTerm] = []
    cache: dict[str, torch.Tensor] = {}
    for o in objectives:
        if o.structure not in cache:
            mask = masks.get(o.structure)
            if mask is None or not np.any(mask):
                warnings.warn(f"structure '{o.structure}' is missing or empty on the working grid: its "
                              f"objectives are left out", stacklevel=2)
                cache[o.structure] = torch.zeros(0, dtype=torch.int64)
            else:
                cache[o.structure] = voxel_indices(mask, device)
        voxels = cache[o.structure]
        if voxels.numel() == 0:
            continue
        if o.type == "min DVH":
            terms.append(MinDVH(o.structure, voxels, o.priority, dose_gy=o.dose_gy, volume_pct=o.volume_pct))
        elif o.type == "max DVH":
            terms.append(MaxDVH(o.structure, voxels, o.priority, dose_gy=o.dose_gy, volume_pct=o.volume_pct))
        elif o.type == "max mean":
            terms.append(MeanDose(o.structure, voxels, o.priority, dose_gy=o.dose_gy))
        elif o.type == "max":
            terms.append(SquaredOverdose(o.structure, voxels, o.priority, dose_gy=o.dose_gy))
        else:
            terms.append(SquaredUnderdose(o.structure, voxels, o.priority, dose_gy=o.dose_gy))
    return terms


def mimicking_terms(
    reference_dose: np.ndarray,
    masks: Mapping[str, np.ndarray],
    prescriptions: Mapping[str, float],
    body: str | None = "External",
    target_priority: float = 100.0,
    oar_priority: float = 10.0,
    body_priority: float = 1.0,
    oar_one_sided: bool = True,
    body_one_sided: bool = False,
    device: str | torch.device = "cpu",
) -> list[DoseMimicking]:
    """A dose-mimicking objective set for ``reference_dose`` (e.g. a predicted dose on the working grid).

    Each voxel belongs to one class, the first that claims it: targets (highest prescription first;
    two-sided), OARs (one-sided unless ``oar_one_sided`` is False; a voxel in two OARs counts in both),
    then the rest of the body (``body`` mask, or where the reference dose is > 0 when that mask is absent;
    two-sided unless ``body_one_sided``)."""
    reference = np.asarray(reference_dose, dtype=np.float32)
    flat = reference.ravel()
    taken = np.zeros(reference.shape, dtype=bool)
    terms: list[DoseMimicking] = []

    def add(name, mask, priority, one_sided):
        index = voxel_indices(mask, device)
        if index.numel():
            terms.append(DoseMimicking(name, index, priority, reference_gy=torch.from_numpy(flat[index.cpu().numpy()]),
                                       one_sided=one_sided))

    for name, mask in masks.items():
        if np.asarray(mask).shape != reference.shape:
            raise GeometryMismatchError(f"structure '{name}' has shape {np.asarray(mask).shape}, the reference dose "
                                        f"{reference.shape}")
    targets = sorted((n for n in prescriptions if n in masks and np.any(masks[n])), key=lambda n: -prescriptions[n])
    if not targets:
        raise MissingStructureError("no target with a prescription has voxels on the working grid")
    for name in targets:
        own = np.asarray(masks[name], bool) & ~taken
        add(name, own, target_priority, False)
        taken |= own
    oar_union = np.zeros_like(taken)
    for name, mask in masks.items():
        if name in prescriptions or name == body or is_target(name):
            continue
        own = np.asarray(mask, bool) & ~taken
        add(name, own, oar_priority, oar_one_sided)
        oar_union |= own
    taken |= oar_union
    rest = np.asarray(masks[body], bool) if body is not None and body in masks else reference > 0
    add("body" if body is None or body not in masks else body, rest & ~taken, body_priority, body_one_sided)
    return terms
