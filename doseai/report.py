"""DVH reports: per-structure metrics, a text table, CSV files and a DVH plot (matplotlib, no display)."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from doseai.case import PlanningCase, validate_dose
from doseai.dvh import DVH, compute_dvhs, structure_metrics, volume_at_dose
from doseai.errors import UnreadableInputError, refuse_overwrite

OAR_V_LEVELS_GY = (20.0, 30.0, 50.0)
TABLE_COLUMNS = ("volume_cc", "Dmean", "Dmax", "D0.1cc", "D2", "D95", "D98", "HI", "CI_Paddick", "V95%")


def case_dvhs(case: PlanningCase, dose: np.ndarray, bin_width_gy: float = 0.1) -> dict[str, DVH]:
    """DVHs of the case's structures (by partial volume where the case has them, see PlanningCase)."""
    return compute_dvhs(dose, case.structures, case.geometry.voxel_volume_mm3 / 1000.0, bin_width_gy,
                        partial_volumes=case.partial_volumes)


@dataclass(frozen=True)
class DVHBand:
    """Where a structure's cumulative DVH lies across several doses (samples): at each ``dose_gy`` the
    ``low_pct``..``high_pct`` volume percentiles (e.g. 5 and 95 %) of the samples' curves."""

    dose_gy: np.ndarray
    low_pct: np.ndarray
    high_pct: np.ndarray


def dvh_bands(case: PlanningCase, doses, percentiles=(5.0, 95.0), bin_width_gy: float = 0.1) -> dict[str, DVHBand]:
    """Each structure's DVH band over ``doses`` (a list of doses of ``case``): the curves are read on one dose
    axis (0 to the highest dose of any sample) and their volume percentiles taken level by level."""
    per_sample = [case_dvhs(case, dose, bin_width_gy) for dose in doses]
    bands = {}
    for name in per_sample[0]:
        curves = [dvhs[name] for dvhs in per_sample if name in dvhs]
        top = max(float(c.dose_gy[-1]) if c.dose_gy.size else 0.0 for c in curves)
        axis = np.arange(0.0, top + bin_width_gy, bin_width_gy)
        volumes = np.stack([np.interp(axis, c.dose_gy, c.volume_pct, left=100.0, right=0.0) if c.dose_gy.size
                            else np.zeros_like(axis) for c in curves])
        low, high = np.percentile(volumes, percentiles, axis=0)
        bands[name] = DVHBand(axis, low, high)
    return bands


def case_metrics(case: PlanningCase, dose: np.ndarray) -> dict[str, dict[str, float]]:
    """Metrics of every non-empty structure; targets get prescription-relative ones (HI, CI, V95%)."""
    dose = validate_dose(dose)
    voxel_cc = case.geometry.voxel_volume_mm3 / 1000.0
    table: dict[str, dict[str, float]] = {}
    for name, mask in case.structures.items():
        if not mask.any():
            continue
        rx = case.prescriptions.get(name)
        partial = case.partial_volumes.get(name)
        metrics = structure_metrics(dose, mask, voxel_cc, name, prescription_gy=rx,
                                    v_levels_gy=() if rx else OAR_V_LEVELS_GY, partial_volume=partial)
        if rx and partial is None:
            metrics["V95%"] = volume_at_dose(dose[mask], 0.95 * rx)
        elif rx:
            values, weights = partial.sample(dose)
            metrics["V95%"] = 100.0 * float(weights[values >= 0.95 * rx].sum() / weights.sum())
        table[name] = metrics
    return table


def format_metrics_table(metrics: Mapping[str, Mapping[str, float]], columns=TABLE_COLUMNS) -> str:
    """A fixed-width text table; empty cells where a metric does not apply."""
    extra = sorted({key for row in metrics.values() for key in row if key.startswith("V") and key.endswith("Gy")})
    columns = [c for c in columns if any(c in row for row in metrics.values())] + extra
    name_width = max([len("structure")] + [len(n) for n in metrics])
    header = "structure".ljust(name_width) + "".join(f"{c:>11}" for c in columns)
    lines = [header, "-" * len(header)]
    for name, row in metrics.items():
        cells = "".join(f"{row[c]:>11.2f}" if c in row else " " * 11 for c in columns)
        lines.append(name.ljust(name_width) + cells)
    return "\n".join(lines)


def _check_writable(path: Path, force: bool) -> None:
    refuse_overwrite(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)


def write_dvh_csv(dvhs: Mapping[str, DVH], path: str | os.PathLike, force: bool = False) -> Path:
    """One row per dose bin: dose_gy, then volume [%] of each structure (cumulative)."""
    path = Path(path)
    _check_writable(path, force)
    longest = max(dvhs.values(), key=lambda d: d.dose_gy.size)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dose_gy"] + [f"{name}_volume_pct" for name in dvhs])
        columns = [np.pad(d.volume_pct, (0, longest.dose_gy.size - d.volume_pct.size)) for d in dvhs.values()]
        for i, dose in enumerate(longest.dose_gy):
            writer.writerow([f"{dose:.2f}"] + [f"{column[i]:.4f}" for column in columns])
    return path


MAX_DVH_DOSE_GY = 200.0  # no DVH of a radiotherapy plan reaches this; beyond it a column is not in Gy
VOLUME_RISE_TOLERANCE_PCT = 0.01  # rounding in a written CSV


def read_dvh_csv(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Cumulative DVH curves from a CSV in ``write_dvh_csv``'s layout (``dose_gy``, then one
    ``<structure>_volume_pct`` column per structure; a bare structure name is accepted too):
    {structure: (dose_gy, volume_pct)}. Raises ``UnreadableInputError`` on anything else."""
    path = Path(path)
    try:
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
    except UnicodeDecodeError as error:
        raise UnreadableInputError(f"{path}: not a text CSV file") from error
    if len(rows) < 3 or not rows[0] or rows[0][0].strip().lower() != "dose_gy" or len(rows[0]) < 2:
        raise UnreadableInputError(f"{path}: expected a header 'dose_gy,<structure>_volume_pct,...' and at least "
                                   "two dose rows (the layout `doseai dvh --out` and `--report` write)")
    names = [name.strip().removesuffix("_volume_pct") for name in rows[0][1:]]
    try:
        table = np.array([[float(value) for value in row] for row in rows[1:] if row], dtype=np.float64)
    except ValueError as error:
        raise UnreadableInputError(f"{path}: non-numeric value ({error})") from error
    if table.shape[1] != len(names) + 1 or not np.all(np.isfinite(table)):
        raise UnreadableInputError(f"{path}: every row needs {len(names) + 1} finite numbers")
    dose = table[:, 0]
    if np.any(np.diff(dose) <= 0):
        raise UnreadableInputError(f"{path}: dose_gy must increase from row to row")
    if dose[0] < 0 or dose[-1] > MAX_DVH_DOSE_GY:
        raise UnreadableInputError(f"{path}: dose_gy runs from {dose[0]:g} to {dose[-1]:g} Gy; a DVH's doses lie "
                                   f"within 0-{MAX_DVH_DOSE_GY:g} Gy")
    volume = table[:, 1:]
    if volume.min() < 0 or volume.max() > 100.0001:
        raise UnreadableInputError(f"{path}: volumes must be percentages in [0, 100]")
    rises = np.diff(volume, axis=0) > VOLUME_RISE_TOLERANCE_PCT
    if rises.any():
        row, column = (int(i) for i in np.argwhere(rises)[0])
        raise UnreadableInputError(
            f"{path}: the curve of {names[column]} rises from {volume[row, column]:g} % at {dose[row]:g} Gy to "
            f"{volume[row + 1, column]:g} % at {dose[row + 1]:g} Gy; a cumulative DVH never rises with dose")
    return {name: (dose, volume[:, column]) for column, name in enumerate(names)}


def write_metrics_csv(metrics: Mapping[str, Mapping[str, float]], path: str | os.PathLike, force: bool = False) -> Path:
    path = Path(path)
    _check_writable(path, force)
    keys = list(dict.fromkeys(key for row in metrics.values() for key in row))
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["structure"] + keys)
        for name, row in metrics.items():
            writer.writerow([name] + [f"{row[k]:.4f}" if k in row else "" for k in keys])
    return path


def plot_dvhs(
    dvhs: Mapping[str, DVH],
    path: str | os.PathLike,
    reference: Mapping[str, DVH] | None = None,
    colors: Mapping[str, tuple[float, float, float]] | None = None,
    title: str = "Dose-volume histograms",
    force: bool = False,
    reference_label: str = "reference",
    bands: Mapping[str, DVHBand] | None = None,
) -> Path:
    """DVH curves (solid) with optional reference curves (dashed, same colour) and bands (shaded, e.g. the
    5-95 % range of sampled doses' curves) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    _check_writable(path, force)
    figure, axes = plt.subplots(figsize=(9, 5.5), dpi=110)
    palette = plt.get_cmap("tab20")
    for index, (name, dvh) in enumerate(dvhs.items()):
        color = (colors or {}).get(name) or palette(index % 20)
        axes.plot(dvh.dose_gy, dvh.volume_pct, color=color, lw=1.8, label=name)
        if bands and name in bands:
            band = bands[name]
            axes.fill_between(band.dose_gy, band.low_pct, band.high_pct, color=color, alpha=0.18, lw=0)
        if reference and name in reference:
            axes.plot(reference[name].dose_gy, reference[name].volume_pct, color=color, lw=1.2, ls="--")
    axes.set_xlabel("Dose [Gy]")
    axes.set_ylabel("Volume [%]")
    axes.set_ylim(0, 101)
    axes.set_xlim(left=0)
    axes.grid(alpha=0.3)
    notes = ([f"dashed: {reference_label}"] if reference else []) + (["shaded: 5-95 % of samples"] if bands else [])
    axes.set_title(title + (f" ({'; '.join(notes)})" if notes else ""))
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
