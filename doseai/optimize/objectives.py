"""Objective terms of fluence optimization, evaluated on the flat dose of a working grid.

Every term names a structure, holds the indices of that structure's voxels on the working grid (a long
tensor; rows of the dose-influence matrix, C order of the grid shape), its parameters and a ``priority``
(its weight in the weighted sum). Values are normalised by the number of voxels of the term, so that
priorities of structures of different size are comparable; all doses are in Gy.

==================  ==========================================================================  ============
kind                value f(d) over the n voxels of the structure                               TPS type
==================  ==========================================================================  ============
squared_underdose   sum(min(d - D, 0)^2) / n                                                    min
squared_overdose    sum(max(d - D, 0)^2) / n   (a "max dose" objective: :data:`MaxDose`)        max
squared_deviation   sum((d - D)^2) / n                                                          uniform
mean_dose           max(mean(d) - D, 0)^2   (two_sided: (mean(d) - D)^2)                        max mean
max_dvh             "V(D) <= v%": sum over voxels with D <= d_i <= q of (d_i - D)^2 / n,        max DVH
                    q = the dose at which the volume fraction is v (the (1 - v/100) quantile)
min_dvh             "V(D) >= v%": sum over voxels with q <= d_i <= D of (d_i - D)^2 / n         min DVH
dose_mimicking      sum((d - r)^2) / n with a voxel-wise reference dose r                       mimic
                    (one_sided: sum(max(d - r, 0)^2) / n, for OARs)
==================  ==========================================================================  ============

The squared under/overdose, deviation, DVH and mean (``two_sided=True``) definitions are those of
matRad/pyRadPlan (``SquaredUnderdosing``, ``SquaredOverdosing``, ``SquaredDeviation``, ``MinDVH``,
``MaxDVH``, ``MeanDose`` with quadratic difference); the DVH quantile uses linear interpolation as
numpy's default. The set of voxels penalised by a DVH term depends only on the ranks of the doses, so
the gradient that treats q as constant is the exact gradient wherever no two doses tie.

Each term has a differentiable :meth:`ObjectiveTerm.value` (torch autograd works through it) and a
hand-written :meth:`ObjectiveTerm.value_and_grad` that the optimizer uses. Both exclude the priority.
``to_dict``/``from_dict`` give a JSON-serialisable description.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np
import torch

__all__ = [
    "ObjectiveTerm",
    "SquaredUnderdose",
    "SquaredOverdose",
    "SquaredDeviation",
    "MaxDose",
    "MinDose",
    "MeanDose",
    "MaxDVH",
    "MinDVH",
    "DoseMimicking",
    "OBJECTIVE_KINDS",
    "objective_from_dict",
    "objectives_to_dicts",
    "objectives_from_dicts",
    "voxel_indices",
    "quantile_linear",
]


def voxel_indices(mask: np.ndarray | torch.Tensor, device: str | torch.device | None = None) -> torch.Tensor:
    """Indices (long) of the True voxels of a working-grid mask, C order: the rows of the influence matrix."""
    if isinstance(mask, torch.Tensor):
        return torch.nonzero(mask.reshape(-1), as_tuple=False).reshape(-1).to(device or mask.device)
    flat = np.flatnonzero(np.asarray(mask, dtype=bool).ravel())
    return torch.from_numpy(flat.astype(np.int64)).to(device or "cpu")


def quantile_linear(values: torch.Tensor, p: float) -> torch.Tensor:
    """The ``p`` quantile of a 1D tensor with linear interpolation (numpy's default), without autograd."""
    values = values.detach()
    n = values.numel()
    position = min(max(float(p), 0.0), 1.0) * (n - 1)
    lower = int(np.floor(position))
    upper = min(lower + 1, n - 1)
    low = torch.kthvalue(values, lower + 1).values
    if upper == lower or position == lower:
        return low
    high = torch.kthvalue(values, upper + 1).values
    return low + (high - low) * (position - lower)


@dataclass(eq=False)
class ObjectiveTerm:
    """Base class: ``structure`` name, ``voxels`` (long tensor of working-grid indices), ``priority``."""

    kind: ClassVar[str] = ""
    tps_type: ClassVar[str] = ""

    structure: str
    voxels: torch.Tensor
    priority: float = 1.0

    def __post_init__(self) -> None:
        voxels = torch.as_tensor(self.voxels)
        if voxels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"voxel indices of '{self.structure}' must be integers, got {voxels.dtype}")
        self.voxels = voxels.reshape(-1).long()
        if self.voxels.numel() == 0:
            raise ValueError(f"objective on '{self.structure}' has no voxels "
                             "(is the structure empty on the working grid?)")
        if not np.isfinite(self.priority) or self.priority < 0:
            raise ValueError(f"priority of the objective on '{self.structure}' must be >= 0, got {self.priority}")

    # --- evaluation -----------------------------------------------------------------------------
    def value(self, dose: torch.Tensor) -> torch.Tensor:
        """Objective value (without priority) for the doses ``dose`` of this term's voxels; differentiable."""
        raise NotImplementedError

    def value_and_grad(self, dose: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(value, d value / d dose) for the doses of this term's voxels, both without priority."""
        raise NotImplementedError

    @property
    def n_voxels(self) -> int:
        """The number of voxels the term reads."""
        return int(self.voxels.numel())

    def to(self, device: str | torch.device) -> "ObjectiveTerm":
        """A copy whose tensors live on ``device``."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, item in values.items():
            if isinstance(item, torch.Tensor):
                values[name] = item.to(device)
        return type(self)(**values)

    @property
    def label(self) -> str:
        """"structure: description", e.g. for a table of term values."""
        return f"{self.structure}: {self.describe()}"

    def describe(self) -> str:
        """The term's goal in a few words (e.g. "V30Gy <= 50%")."""
        return self.kind

    def inactive_below(self) -> float | torch.Tensor | None:
        """A dose (scalar or one per voxel) below which a voxel adds exactly nothing to this term's value
        and gradient, whatever the doses of the other voxels; None if every voxel always counts. The
        optimizer skips rows of the influence matrix that are provably below it."""
        return None

    # --- target hints for the initial weights -----------------------------------------------------
    def lower_dose_goal(self) -> float | None:
        """The dose this term asks its voxels to reach at least (targets), else None."""
        return None

    # --- serialisation ------------------------------------------------------------------------------
    def parameters(self) -> dict[str, Any]:
        """The term's own fields (beyond structure, voxels and priority) by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("structure", "voxels", "priority")}

    def to_dict(self, include_voxels: bool = True) -> dict[str, Any]:
        """JSON-serialisable description; tensors become lists. Without voxels, :func:`objective_from_dict`
        needs them given (e.g. from the structure's mask)."""
        out: dict[str, Any] = {"kind": self.kind, "structure": self.structure, "priority": float(self.priority)}
        for name, item in self.parameters().items():
            out[name] = item.detach().cpu().tolist() if isinstance(item, torch.Tensor) else item
        if include_voxels:
            out["voxels"] = self.voxels.detach().cpu().tolist()
        return out


def _normaliser(dose: torch.Tensor) -> float:
    return 1.0 / dose.numel()


def _squared(residual: torch.Tensor) -> torch.Tensor:
    """sum(residual^2)/n, accumulated in float64 for a value that does not jitter in float32."""
    r = residual.double() if residual.dtype == torch.float32 else residual
    return (r * r).sum() * _normaliser(residual)


@dataclass(eq=False)
class _SquaredResidualTerm(ObjectiveTerm):
    """sum(residual^2) / n over the term's voxels, for the residual a subclass defines."""

    def _residual(self, dose: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def value(self, dose: torch.Tensor) -> torch.Tensor:
        return _squared(self._residual(dose))

    def value_and_grad(self, dose):
        residual = self._residual(dose)
        return _squared(residual), residual * (2.0 * _normaliser(dose))


@dataclass(eq=False)
class _DoseLevelTerm(_SquaredResidualTerm):
    dose_gy: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.dose_gy = float(self.dose_gy)
        if not np.isfinite(self.dose_gy) or self.dose_gy < 0:
            raise ValueError(f"dose level of the objective on '{self.structure}' must be >= 0 Gy, got {self.dose_gy}")

    def describe(self) -> str:
        return f"{self.kind} {self.dose_gy:g} Gy"


@dataclass(eq=False)
class _SidedTerm(_DoseLevelTerm):
    """A term on the side(s) of ``dose_gy`` that ``penalised`` names: "below" (a dose to reach), "above" (a
    limit: voxels below it add nothing) or "both"."""

    penalised: ClassVar[str] = "both"

    def lower_dose_goal(self):
        return None if self.penalised == "above" else self.dose_gy

    def inactive_below(self):
        return self.dose_gy if self.penalised == "above" else None


@dataclass(eq=False)
class _SquaredLevelTerm(_SidedTerm):
    """The squared difference to ``dose_gy`` of the doses on the penalised side(s) of it."""

    def _residual(self, dose):
        residual = dose - self.dose_gy
        if self.penalised == "below":
            return torch.clamp(residual, max=0.0)
        return torch.clamp(residual, min=0.0) if self.penalised == "above" else residual


@dataclass(eq=False)
class SquaredUnderdose(_SquaredLevelTerm):
    """Penalise dose below ``dose_gy`` (a "min dose" objective)."""

    kind: ClassVar[str] = "squared_underdose"
    tps_type: ClassVar[str] = "min"
    penalised: ClassVar[str] = "below"


@dataclass(eq=False)
class SquaredOverdose(_SquaredLevelTerm):
    """Penalise dose above ``dose_gy`` (a "max dose" objective)."""

    kind: ClassVar[str] = "squared_overdose"
    tps_type: ClassVar[str] = "max"
    penalised: ClassVar[str] = "above"


@dataclass(eq=False)
class SquaredDeviation(_SquaredLevelTerm):
    """Penalise any deviation from ``dose_gy`` (uniform dose; TG-119's target objective in pyRadPlan)."""

    kind: ClassVar[str] = "squared_deviation"
    tps_type: ClassVar[str] = "uniform"


#: A maximum-dose objective is the squared overdose above the limit.
MaxDose = SquaredOverdose
#: A minimum-dose objective is the squared underdose below the limit.
MinDose = SquaredUnderdose


@dataclass(eq=False)
class MeanDose(_DoseLevelTerm):
    """Penalise a mean dose above ``dose_gy``: max(mean - D, 0)^2; ``two_sided``: (mean - D)^2."""

    kind: ClassVar[str] = "mean_dose"
    tps_type: ClassVar[str] = "max mean"
    two_sided: bool = False

    def _excess(self, dose):
        mean = dose.double().mean() if dose.dtype == torch.float32 else dose.mean()
        excess = mean - self.dose_gy
        return excess if self.two_sided else torch.clamp(excess, min=0.0)

    def value(self, dose):
        return self._excess(dose) ** 2

    def value_and_grad(self, dose):
        excess = self._excess(dose)
        grad = torch.ones_like(dose) * (excess.to(dose.dtype) * (2.0 * _normaliser(dose)))
        return excess**2, grad

    def describe(self):
        return f"mean {'=' if self.two_sided else '<='} {self.dose_gy:g} Gy"


@dataclass(eq=False)
class _DVHTerm(_SidedTerm):
    """A DVH point: the squared difference to ``dose_gy`` of the doses between it and the dose q at which the
    volume fraction is ``volume_pct``, on the penalised side ("above": at most, "below": at least that volume
    at ``dose_gy``). For "above", a voxel below ``dose_gy`` never counts, and the number of voxels below it
    fixes where the quantile falls among those above, so their doses do not change the value either."""

    volume_pct: float = 50.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.volume_pct = float(self.volume_pct)
        if not 0.0 <= self.volume_pct <= 100.0:
            raise ValueError(f"volume of the DVH objective on '{self.structure}' must be in [0, 100] %, "
                             f"got {self.volume_pct}")

    def _quantile(self, dose):
        return quantile_linear(dose, 1.0 - self.volume_pct / 100.0)

    def _residual(self, dose):
        q = self._quantile(dose)
        low, high = (self.dose_gy, q) if self.penalised == "above" else (q, self.dose_gy)
        deviation = dose - self.dose_gy
        return torch.where((dose < low) | (dose > high), torch.zeros_like(deviation), deviation)

    def describe(self):
        return f"V{self.dose_gy:g}Gy {'<=' if self.penalised == 'above' else '>='} {self.volume_pct:g}%"


@dataclass(eq=False)
class MaxDVH(_DVHTerm):
    """"At most ``volume_pct`` % of the structure above ``dose_gy``" (matRad MaxDVH)."""

    kind: ClassVar[str] = "max_dvh"
    tps_type: ClassVar[str] = "max DVH"
    penalised: ClassVar[str] = "above"


@dataclass(eq=False)
class MinDVH(_DVHTerm):
    """"At least ``volume_pct`` % of the structure at ``dose_gy`` or more" (matRad MinDVH)."""

    kind: ClassVar[str] = "min_dvh"
    tps_type: ClassVar[str] = "min DVH"
    penalised: ClassVar[str] = "below"


@dataclass(eq=False)
class DoseMimicking(_SquaredResidualTerm):
    """Voxel-wise squared difference to ``reference_gy`` (one value per voxel of the term);
    ``one_sided`` penalises only dose above the reference (OARs, as in the OpenKBP-Opt dose mimicking)."""

    kind: ClassVar[str] = "dose_mimicking"
    tps_type: ClassVar[str] = "mimic"
    reference_gy: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    one_sided: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        reference = torch.as_tensor(self.reference_gy, dtype=torch.float32).reshape(-1)
        if reference.numel() != self.voxels.numel():
            raise ValueError(f"dose mimicking on '{self.structure}' needs one reference dose per voxel "
                             f"({self.voxels.numel()}), got {reference.numel()}")
        if not torch.isfinite(reference).all():
            raise ValueError(f"reference dose of '{self.structure}' holds NaN or infinite values")
        self.reference_gy = reference.to(self.voxels.device)

    def _residual(self, dose):
        residual = dose - self.reference_gy.to(dose.dtype)
        return torch.clamp(residual, min=0.0) if self.one_sided else residual

    def describe(self):
        return "mimic (one-sided)" if self.one_sided else "mimic"

    def inactive_below(self):
        return self.reference_gy if self.one_sided else None

    def lower_dose_goal(self):
        return None if self.one_sided else float(self.reference_gy.double().mean())


OBJECTIVE_KINDS: dict[str, type[ObjectiveTerm]] = {
    cls.kind: cls
    for cls in (SquaredUnderdose, SquaredOverdose, SquaredDeviation, MeanDose, MaxDVH, MinDVH, DoseMimicking)
}


def objective_from_dict(
    description: Mapping[str, Any],
    voxels: torch.Tensor | np.ndarray | Mapping[str, torch.Tensor | np.ndarray] | None = None,
    device: str | torch.device = "cpu",
) -> ObjectiveTerm:
    """Rebuild a term from :meth:`ObjectiveTerm.to_dict`. ``voxels`` (indices, a working-grid bool mask,
    or a mapping structure name -> either) is needed when the description holds no voxels."""
    description = dict(description)
    kind = description.pop("kind", None)
    if kind not in OBJECTIVE_KINDS:
        raise ValueError(f"unknown objective kind {kind!r}; known: {sorted(OBJECTIVE_KINDS)}")
    cls = OBJECTIVE_KINDS[kind]
    stored = description.pop("voxels", None)
    structure = description.get("structure")
    if stored is None:
        if isinstance(voxels, Mapping):
            if structure not in voxels:
                raise ValueError(f"no voxels given for structure '{structure}'")
            voxels = voxels[structure]
        if voxels is None:
            raise ValueError(f"the description of the objective on '{structure}' holds no voxels; pass voxels=")
        stored = voxels
    stored_array = np.asarray(stored.cpu() if isinstance(stored, torch.Tensor) else stored)
    if stored_array.dtype == bool:
        index = voxel_indices(stored_array, device)
    else:
        index = torch.as_tensor(stored_array, dtype=torch.int64).to(device)
    if "reference_gy" in description:
        description["reference_gy"] = torch.as_tensor(description["reference_gy"], dtype=torch.float32).to(device)
    known = {f.name for f in fields(cls)}
    unknown = set(description) - known
    if unknown:
        raise ValueError(f"objective kind {kind!r} has no parameters {sorted(unknown)}")
    return cls(voxels=index, **description)


def objectives_to_dicts(terms: Iterable[ObjectiveTerm], include_voxels: bool = True) -> list[dict[str, Any]]:
    """:meth:`ObjectiveTerm.to_dict` of each term."""
    return [term.to_dict(include_voxels=include_voxels) for term in terms]


def objectives_from_dicts(
    descriptions: Sequence[Mapping[str, Any]],
    voxels: Mapping[str, torch.Tensor | np.ndarray] | None = None,
    device: str | torch.device = "cpu",
) -> list[ObjectiveTerm]:
    """:func:`objective_from_dict` of each description."""
    return [objective_from_dict(d, voxels, device) for d in descriptions]
