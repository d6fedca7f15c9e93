"""Cumulative dose-volume histograms and dose metrics, vectorized with numpy.

All structures are histogrammed in one ``np.bincount`` pass over the voxels that belong to any
structure (voxels in several structures are counted once per structure).
"""

from __future__ import annotations

import functools

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from doseai.errors import GeometryMismatchError, MissingStructureError


@dataclass(frozen=True)
class DVH:
    """Cumulative DVH: ``volume_cc[i]`` is the volume receiving at least ``dose_gy[i]``."""

    name: str
    dose_gy: np.ndarray
    volume_cc: np.ndarray
    total_cc: float

    @property
    def volume_pct(self) -> np.ndarray:
        return 100.0 * self.volume_cc / self.total_cc if self.total_cc > 0 else np.zeros_like(self.volume_cc)


@dataclass(frozen=True)
class PartialVolume:
    """A structure on a grid coarser than the one it was drawn on (a dose grid, see :mod:`doseai.dose_grid`), as a
    TPS weighs it in a DVH: the voxels wholly inside (``inside``, flat indices, weight 1), and the boundary voxels
    supersampled at the fine grid: each fine voxel of the structure inside a boundary voxel is a point (``points``,
    3 x n, (z, y, x) in this grid's voxel index units) of weight ``weights`` (its share of a coarse voxel) at which
    the dose is read trilinearly. The structure's edge then keeps the dose gradient across a coarse voxel."""

    shape: tuple[int, int, int]
    inside: np.ndarray
    points: np.ndarray
    weights: np.ndarray

    @property
    def volume_voxels(self) -> float:
        """The structure's volume in voxels of this grid (exact: whole voxels plus the boundary's fine voxels)."""
        return float(self.inside.size + self.weights.sum(dtype=np.float64))

    def sample(self, dose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dose values, weights) of the structure: 1 for the voxels inside, the fine share for boundary points
        (read trilinearly, the grid's edge value beyond it: ``scipy.ndimage.map_coordinates(order=1,
        mode="nearest")``, from corners and weights computed once per structure, as each slider change reads
        the same points again)."""
        dose = np.asarray(dose, np.float32)
        if dose.shape != tuple(self.shape):
            raise GeometryMismatchError(f"dose on a {dose.shape} grid, the partial volumes on {tuple(self.shape)}")
        flat = dose.ravel()
        corners, corner_weights = self._trilinear
        edge = (flat[corners] * corner_weights).sum(axis=0, dtype=np.float32)
        values = np.concatenate([flat[self.inside], edge])
        weights = np.concatenate([np.ones(self.inside.size, np.float32), self.weights.astype(np.float32)])
        return values, weights

    @functools.cached_property
    def _trilinear(self) -> tuple[np.ndarray, np.ndarray]:
        """For each point, the flat indices of its 8 neighbouring voxels and their trilinear weights (8 x n)."""
        n = self.points.shape[1]
        if n == 0:
            return np.zeros((8, 0), np.int64), np.zeros((8, 0), np.float32)
        low, high, share = [], [], []
        for axis, size in enumerate(self.shape):
            position = np.clip(self.points[axis].astype(np.float64), 0, size - 1)
            first = np.minimum(np.floor(position).astype(np.int64), max(size - 2, 0))
            low.append(first)
            high.append(np.minimum(first + 1, size - 1))
            share.append(position - first)
        corners = np.empty((8, n), np.int64)
        weights = np.empty((8, n), np.float32)
        for corner in range(8):
            pick = [(corner >> (2 - axis)) & 1 for axis in range(3)]
            index = [high[a] if pick[a] else low[a] for a in range(3)]
            corners[corner] = np.ravel_multi_index(index, self.shape)
            weight = np.ones(n)
            for a in range(3):
                weight *= share[a] if pick[a] else 1.0 - share[a]
            weights[corner] = weight
        return corners, weights


def compute_dvhs(
    dose: np.ndarray,
    masks: Mapping[str, np.ndarray],
    voxel_volume_cc: float,
    bin_width_gy: float = 0.1,
    max_dose_gy: float | None = None,
    partial_volumes: Mapping[str, PartialVolume] | None = None,
) -> dict[str, DVH]:
    """Cumulative DVH of every non-empty structure in ``masks`` (empty ones are left out). A structure with a
    :class:`PartialVolume` in ``partial_volumes`` (on a dose grid coarser than the structure) counts its boundary
    voxels by their fraction inside, as a TPS does; the others count whole voxels of their mask."""
    partial_volumes = partial_volumes or {}
    names = [name for name, mask in masks.items() if np.any(mask)]
    if not names:
        return {}
    dose = np.asarray(dose, dtype=np.float32)
    for name in names:
        if masks[name].shape != dose.shape:
            raise GeometryMismatchError(f"structure '{name}' has shape {masks[name].shape}, dose {dose.shape}")
    top = float(dose.max()) if max_dose_gy is None else float(max_dose_gy)
    n_bins = int(np.ceil(top / bin_width_gy)) + 2
    flat = dose.ravel()
    bins = np.minimum((flat / bin_width_gy).astype(np.int64), n_bins - 1)
    counts = np.empty((len(names), n_bins), dtype=np.float64)
    for row, name in enumerate(names):
        partial = partial_volumes.get(name)
        if partial is None:
            counts[row] = np.bincount(bins[np.asarray(masks[name]).ravel()], minlength=n_bins)
        else:
            values, weights = partial.sample(dose)
            counts[row] = np.bincount(np.minimum((values / bin_width_gy).astype(np.int64), n_bins - 1),
                                      weights=weights, minlength=n_bins)
    # cumulative from the top: voxels with dose >= lower edge of each bin
    cumulative = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1] * voxel_volume_cc
    edges = np.arange(n_bins) * bin_width_gy
    return {
        name: DVH(name=name, dose_gy=edges, volume_cc=cumulative[row].astype(np.float64),
                  total_cc=float(cumulative[row, 0]))
        for row, name in enumerate(names)
    }


def _values(dose: np.ndarray, mask: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(dose)[np.asarray(mask, dtype=bool)]
    if values.size == 0:
        raise MissingStructureError(f"structure '{name}' is empty")
    return values.astype(np.float64)


def dose_at_volume_pct(values: np.ndarray, volume_pct: float) -> float:
    """D_x%: the minimum dose received by the hottest x% of the structure (D98 = 2nd percentile)."""
    return float(np.percentile(values, 100.0 - volume_pct))


def dose_at_volume_cc(values: np.ndarray, volume_cc: float, voxel_volume_cc: float) -> float:
    """D_xcc: the dose exceeded by the hottest n voxels, n = max(1, round(x / voxel volume)),
    as the (100 - 100 n / N) percentile (the OpenKBP definition of D_0.1cc)."""
    n_voxels = max(1, int(round(volume_cc / voxel_volume_cc)))
    return float(np.percentile(values, max(0.0, 100.0 - 100.0 * n_voxels / values.size)))


def volume_at_dose(values: np.ndarray, dose_gy: float, voxel_volume_cc: float | None = None) -> float:
    """V_xGy in % of the structure (or in cc when ``voxel_volume_cc`` is given)."""
    n = float(np.count_nonzero(values >= dose_gy))
    return n * voxel_volume_cc if voxel_volume_cc is not None else 100.0 * n / values.size


def homogeneity_index(values: np.ndarray) -> float:
    """ICRU 83 homogeneity index (D2 - D98) / D50."""
    d50 = dose_at_volume_pct(values, 50.0)
    return (dose_at_volume_pct(values, 2.0) - dose_at_volume_pct(values, 98.0)) / d50 if d50 > 0 else float("nan")


def paddick_conformity_index(dose: np.ndarray, target: np.ndarray, prescription_gy: float) -> float:
    """Paddick CI = TV_PIV^2 / (TV x PIV): TV target volume, PIV volume inside the prescription isodose."""
    target = np.asarray(target, dtype=bool)
    piv = np.asarray(dose) >= prescription_gy
    tv, piv_n = int(target.sum()), int(piv.sum())
    if tv == 0 or piv_n == 0:
        return 0.0
    tv_piv = int(np.count_nonzero(piv & target))
    return tv_piv**2 / (tv * piv_n)


def weighted_dose_at_volume_pct(values: np.ndarray, weights: np.ndarray, volume_pct: float) -> float:
    """D_x% of voxels that count by ``weights`` (partial volumes): the dose where the weighted cumulative volume,
    voxel weights centred on their dose (midpoint rule), reaches x %. (numpy's weighted percentile needs numpy 2
    and gives only the inverted-CDF step; Slicer 5.10 bundles numpy 2.0, and a step would jump by whole voxels.)"""
    order = np.argsort(values)
    ordered, weight = values[order], weights[order]
    cumulative = (np.cumsum(weight) - 0.5 * weight) / weight.sum()
    return float(np.interp(1.0 - volume_pct / 100.0, cumulative, ordered))


def structure_metrics(
    dose: np.ndarray,
    mask: np.ndarray,
    voxel_volume_cc: float,
    name: str = "structure",
    prescription_gy: float | None = None,
    v_levels_gy: tuple[float, ...] = (),
    partial_volume: PartialVolume | None = None,
) -> dict[str, float]:
    """Standard metrics of one structure; target metrics (D95, D98, D2, HI, CI) when a prescription is given.
    ``partial_volume`` (see :func:`compute_dvhs`): the structure's voxels count by it instead of ``mask``'s."""
    if partial_volume is not None:
        return _partial_volume_metrics(dose, partial_volume, voxel_volume_cc, name, prescription_gy, v_levels_gy)
    values = _values(dose, mask, name)
    metrics = {
        "volume_cc": values.size * voxel_volume_cc,
        "Dmean": float(values.mean()),
        "Dmax": float(values.max()),
        "Dmin": float(values.min()),
        "D0.1cc": dose_at_volume_cc(values, 0.1, voxel_volume_cc),
        "D2": dose_at_volume_pct(values, 2.0),
        "D50": dose_at_volume_pct(values, 50.0),
        "D95": dose_at_volume_pct(values, 95.0),
        "D98": dose_at_volume_pct(values, 98.0),
    }
    for level in v_levels_gy:
        metrics[f"V{level:g}Gy"] = volume_at_dose(values, level)
    if prescription_gy is not None:
        metrics["prescription"] = float(prescription_gy)
        metrics["HI"] = homogeneity_index(values)
        metrics["CI_Paddick"] = paddick_conformity_index(dose, mask, prescription_gy)
        metrics["V100%"] = volume_at_dose(values, prescription_gy)
    return metrics


def _partial_volume_metrics(dose: np.ndarray, partial: PartialVolume, voxel_volume_cc: float, name: str,
                            prescription_gy: float | None, v_levels_gy: tuple[float, ...]) -> dict[str, float]:
    """:func:`structure_metrics` with the voxels counted as ``partial`` says."""
    values, weights = (a.astype(np.float64) for a in partial.sample(dose))
    if values.size == 0:
        raise MissingStructureError(f"structure '{name}' is empty")
    total = float(weights.sum())
    volume_cc = total * voxel_volume_cc

    order = np.argsort(values)  # once: every D_x% reads the same weighted cumulative volume
    ordered, ordered_weights = values[order], weights[order]
    cumulative = (np.cumsum(ordered_weights) - 0.5 * ordered_weights) / total

    def at_pct(pct: float) -> float:
        return float(np.interp(1.0 - pct / 100.0, cumulative, ordered))

    def volume_pct_at(dose_gy: float) -> float:
        return 100.0 * float(weights[values >= dose_gy].sum()) / total

    metrics = {
        "volume_cc": volume_cc,
        "Dmean": float((values * weights).sum() / total),
        "Dmax": float(values.max()),
        "Dmin": float(values.min()),
        "D0.1cc": at_pct(min(100.0, 100.0 * 0.1 / volume_cc)),
        "D2": at_pct(2.0),
        "D50": at_pct(50.0),
        "D95": at_pct(95.0),
        "D98": at_pct(98.0),
    }
    for level in v_levels_gy:
        metrics[f"V{level:g}Gy"] = volume_pct_at(level)
    if prescription_gy is not None:
        metrics["prescription"] = float(prescription_gy)
        metrics["HI"] = (metrics["D2"] - metrics["D98"]) / metrics["D50"] if metrics["D50"] > 0 else float("nan")
        covered = float(weights[values >= prescription_gy].sum())
        piv = int(np.count_nonzero(np.asarray(dose) >= prescription_gy))
        metrics["CI_Paddick"] = covered**2 / (total * piv) if piv else 0.0
        metrics["V100%"] = volume_pct_at(prescription_gy)
    return metrics


def dvh_vector(dose: np.ndarray, masks: Mapping[str, np.ndarray], names, prescription_gy: float,
               n_points: int = 32, max_relative_dose: float = 1.2) -> np.ndarray:
    """Each structure's cumulative DVH (volume fraction 0..1) at ``n_points`` doses evenly spaced from 0
    to ``max_relative_dose`` x ``prescription_gy``, stacked as (len(names), n_points) float32: the fixed-size
    description of a plan that a DVH-conditioned network reads. A missing or empty structure gives a row of
    zeros, so the layout never depends on the case."""
    if prescription_gy <= 0:
        raise ValueError("prescription_gy must be positive")
    levels = np.linspace(0.0, max_relative_dose * prescription_gy, n_points)
    rows = np.zeros((len(names), n_points), np.float32)
    for row, name in enumerate(names):
        mask = masks.get(name)
        if mask is None or not np.any(mask):
            continue
        values = np.sort(np.asarray(dose, np.float32)[np.asarray(mask, bool)])
        rows[row] = 1.0 - np.searchsorted(values, levels, side="left") / values.size  # fraction >= level
    return rows


def mean_from_row(row: np.ndarray, max_relative_dose: float = 1.2) -> float:
    """The mean dose (in units of the prescription) a DVH-vector row implies: the area under the cumulative curve
    (trapezoid rule over its evenly spaced doses from 0 to ``max_relative_dose``)."""
    row = np.asarray(row, np.float64)
    return float(np.trapezoid(row, dx=max_relative_dose / (row.size - 1)))


def dose_at_fraction_from_row(row: np.ndarray, fraction: float, max_relative_dose: float = 1.2) -> float:
    """The dose (in units of the prescription) at which a DVH-vector row (cumulative volume fraction at evenly
    spaced doses from 0 to ``max_relative_dose``) falls to ``fraction``, interpolated linearly between its two
    neighbouring points: what the vector itself says of e.g. D0.1cc (``fraction`` = 0.1 cc / volume)."""
    row = np.asarray(row, np.float64)
    levels = np.linspace(0.0, max_relative_dose, row.size)
    below = np.flatnonzero(row < fraction)
    if below.size == 0:
        return float(levels[-1])
    j = int(below[0])
    if j == 0:
        return 0.0
    t = (row[j - 1] - fraction) / max(row[j - 1] - row[j], 1e-12)
    return float(levels[j - 1] + t * (levels[j] - levels[j - 1]))


def dose_at_volume_cc_from_row(row: np.ndarray, volume_cc: float, structure_volume_cc: float,
                               max_relative_dose: float = 1.2) -> float:
    """:func:`dose_at_fraction_from_row` for the hottest ``volume_cc`` of a structure of ``structure_volume_cc``
    (e.g. D0.1cc), in units of the prescription."""
    return dose_at_fraction_from_row(row, min(1.0, volume_cc / structure_volume_cc), max_relative_dose)


def upper_tail_ramp(values: np.ndarray, voxel_volume_cc: float, volume_cc: float = 0.1
                    ) -> tuple[np.ndarray, float, float] | None:
    """(ramp, D``volume_cc``, median) of one structure's voxel doses: the ramp rises linearly from 0 at the median to
    1 at the D``volume_cc`` (1 above), the weights by which a change of the near-max dose is spread over the upper
    half of the structure so that its lower half stays. None for a flat dose (no upper tail to move)."""
    near_max = dose_at_volume_cc(values, volume_cc, voxel_volume_cc)
    median = float(np.median(values))
    if near_max - median <= 1e-3:
        return None
    return np.clip((values - median) / (near_max - median), 0.0, 1.0), near_max, median


def match_near_max(dose: np.ndarray, masks: Mapping[str, np.ndarray], names, vector: np.ndarray,
                   prescription_gy: float, voxel_volume_cc: float, offset_relative: float = 0.0,
                   max_relative_dose: float = 1.2, volume_cc: float = 0.1) -> np.ndarray:
    """A copy of ``dose`` in which each structure's D0.1cc is the one its row of the DVH ``vector`` gives (less
    ``offset_relative`` x the prescription). The difference is added to the structure's voxels above its median
    dose, ramped linearly from 0 at the median to 1 at the current D0.1cc, so the lower half of its DVH stays.
    Structures are taken in ``names`` order; a structure absent from the case or from the vector is left as is."""
    out = np.array(dose, np.float32, copy=True)
    for row, name in enumerate(names):
        mask = masks.get(name)
        if mask is None or not np.any(mask) or not vector[row, 0] > 0:
            continue
        mask = np.asarray(mask, bool)
        values = out[mask]
        structure_cc = np.count_nonzero(mask) * voxel_volume_cc
        tail = upper_tail_ramp(values, voxel_volume_cc, volume_cc)
        if tail is None:
            continue
        ramp, have, _ = tail
        wanted = prescription_gy * (dose_at_volume_cc_from_row(vector[row], volume_cc, structure_cc, max_relative_dose)
                                    - offset_relative)
        out[mask] = np.maximum(values + (wanted - have) * ramp, 0.0)
    return out


def dvh_vector_from_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], names, levels_gy: np.ndarray,
                           base: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """A DVH vector (rows in ``names`` order, volume fractions at ``levels_gy``) from cumulative curves
    {structure: (dose_gy, volume_pct)}, e.g. a user's edited DVH CSV. Each curve is interpolated linearly
    (0 % beyond its last dose) and made non-increasing; structures without a curve keep their ``base`` row.
    Returns the vector and the names taken from ``curves`` (curves for unknown structures are ignored)."""
    vector = np.array(base, dtype=np.float32, copy=True)
    used = []
    for row, name in enumerate(names):
        if name not in curves:
            continue
        dose, volume_pct = (np.asarray(values, np.float64) for values in curves[name])
        fraction = np.interp(levels_gy, dose, volume_pct, left=volume_pct[0], right=0.0) / 100.0
        vector[row] = np.clip(np.minimum.accumulate(fraction), 0.0, 1.0)
        used.append(name)
    return vector, used
