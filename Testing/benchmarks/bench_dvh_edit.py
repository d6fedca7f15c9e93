"""Benchmark of the DVH-conditioned model on held-out patients with generated Pareto plans.

Held-out plans: ``doseai train pareto --run RUN --split validation`` (OpenKBP validation patients: never
trained on). Per patient and plan, the model predicts from that plan's own DVH vector.

  accuracy        per structure, |mean dose| and |max dose| error between the prediction and the plan, in % of
                  the prescription (max dose = D0.1cc, OpenKBP's definition); the reference study's bar is
                  1.6 % (mean) / 1.8 % (max) on average; beside it, the D0.1cc read off the plan's DVH vector
                  itself (linear between its points) against the plan's: a plain reading of what the network's
                  condition tells (the vectors come from the case-grid plan, the reference is the model-grid plan
                  on the case grid: their offset is part of this error, and a network can learn it)
  responsiveness  per patient and OAR: the desired DVH of the middle sweep plan with that OAR's curve moved
                  to 80 % of its doses; the predicted OAR mean must go down by more than 0.1 % of the
                  prescription (vs the prediction from the plan's own DVH) while PTV_70 D95 stays within 2 %
                  of the prescription; beside it, how often the training target of that edit (its projection
                  onto the patient's plans: nearest plan, or nearest mix of two) lowers the OAR at all
  latency         one DVH edit -> dose on the case grid (the conditioned half of the network + resampling)
  spread          the spread of the training Pareto sets: per structure, the range across a patient's plans of
                  the mean dose (from the DVH vectors), averaged over patients; and a plot of one patient's plans

The plan doses are stored on the model grid; they are resampled to the case grid for the comparison.
Prints a table and writes JSON (and the spread plot next to it). Run:
    python Testing/benchmarks/bench_dvh_edit.py --pareto-run RUN [--weights PATH] [--limit N] [--record]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from doseai.dvh import dose_at_volume_cc, dose_at_volume_cc_from_row, dose_at_volume_pct, mean_from_row
from doseai.io import openkbp
from doseai.models.features import DEFAULT_GRID, model_geometry
from doseai.paths import cache_root, openkbp_root
from doseai.predict import DEFAULT_DVH_MODEL, DVHDosePredictor
from doseai.resample import resample_to
from doseai.models.dvh_conditioned import DEFAULT_DVH_LAYOUT
from doseai.train.train_dvh import EDIT_EMPHASIS, nearest_mix, nearest_plan, stretch_curve

EDIT_FACTOR = 0.8
DOWN_PCT_RX = -0.1  # a change smaller than this is noise, not a response


def _mean_max(dose, mask, voxel_cc) -> tuple[float, float]:
    values = dose[mask]
    return float(values.mean()), dose_at_volume_cc(values, 0.1, voxel_cc)


def _mean_from_curve(curve: np.ndarray) -> float:
    """Mean dose in % of the prescription from a DVH-vector row (cumulative, 0..max_relative_dose x Rx)."""
    return 100.0 * mean_from_row(curve, DEFAULT_DVH_LAYOUT["max_relative_dose"])


def _projection_changes(vectors: np.ndarray, middle: int, desired: np.ndarray, row: int) -> dict[str, float]:
    """What the training targets ask for this edit: the OAR's mean-dose change (% Rx, from the DVH vectors) of
    the projection onto the patient's plans, as nearest plan and as nearest mix of two plans."""
    weights = np.ones(vectors.shape[1], np.float32)
    weights[row] = EDIT_EMPHASIS
    before = _mean_from_curve(vectors[middle, row])
    i, j, a = nearest_mix(vectors, desired, weights)
    return {"plans": _mean_from_curve(vectors[nearest_plan(vectors, desired, weights), row]) - before,
            "mixes": _mean_from_curve(a * vectors[i, row] + (1 - a) * vectors[j, row]) - before}


def _sweep_middle(plans) -> int:
    """The middle plan of the uniform-weight sweep (plans whose OAR weights are all equal)."""
    weights = plans["oar_weights"][:, 3:]
    sweep = [i for i, row in enumerate(weights) if np.unique(row[row > 0]).size <= 1]
    return sweep[len(sweep) // 2] if sweep else len(weights) // 2


def run(weights: Path, pareto_run: str, limit: int | None, threads: int | None) -> dict:
    predictor = DVHDosePredictor(weights, threads=threads)
    folder = cache_root() / "pareto" / pareto_run / "validation"
    files = sorted(folder.glob("pt_*.npz"), key=lambda p: int(p.stem.split("_")[1]))[:limit]
    if not files:
        raise SystemExit(f"no held-out Pareto plans in {folder}: run `doseai train pareto --run {pareto_run} "
                         "--split validation --limit 10` first")
    cases = openkbp.list_patients(openkbp_root() / "validation")
    errors: dict[str, dict[str, list[float]]] = {}
    responses, latencies = [], []
    for path in tqdm(files, desc="held-out patients", unit="patient"):
        case = openkbp.load_npz(cases[path.stem])
        plans = np.load(path)
        grid = model_geometry(case, DEFAULT_GRID)
        rx = case.max_prescription
        voxel_cc = float(np.prod(case.geometry.spacing)) / 1000.0
        predictor.set_case(case)
        present = [n for n in predictor.structures if case.structures.get(n) is not None and case.structures[n].any()]
        for dose_model_grid, vector in zip(plans["doses"], plans["dvh_vectors"]):
            plan = resample_to(dose_model_grid.astype(np.float32), grid, case.geometry)
            start = time.perf_counter()
            predicted = predictor.predict(vector)
            latencies.append(time.perf_counter() - start)
            for name in present:
                mask = case.structures[name]
                (pm, px), (tm, tx) = _mean_max(predicted, mask, voxel_cc), _mean_max(plan, mask, voxel_cc)
                entry = errors.setdefault(name, {"mean": [], "max": [], "max_from_vector": []})
                entry["mean"].append(100 * abs(pm - tm) / rx)
                entry["max"].append(100 * abs(px - tx) / rx)
                row = predictor.structures.index(name)
                from_vector = rx * dose_at_volume_cc_from_row(vector[row], 0.1, np.count_nonzero(mask) * voxel_cc,
                                                              DEFAULT_DVH_LAYOUT["max_relative_dose"])
                entry["max_from_vector"].append(100 * abs(from_vector - tx) / rx)
        middle_index = _sweep_middle(plans)
        middle = plans["dvh_vectors"][middle_index]
        base = predictor.predict(middle)
        ptv = case.structures.get("PTV_70")
        base_d95 = dose_at_volume_pct(base[ptv], 95.0) if ptv is not None and ptv.any() else None
        for name in present:
            if name.startswith("PTV"):
                continue
            row = predictor.structures.index(name)
            desired = middle.copy()
            desired[row] = stretch_curve(desired[row], EDIT_FACTOR)
            edited = predictor.predict(desired)
            mask = case.structures[name]
            d95_change = (100 * abs(dose_at_volume_pct(edited[ptv], 95.0) - base_d95) / rx) if base_d95 else 0.0
            responses.append({"patient": path.stem, "oar": name,
                              "mean_change_pct_rx": 100 * float(edited[mask].mean() - base[mask].mean()) / rx,
                              "ptv_d95_change_pct_rx": d95_change,
                              "projection_change_pct_rx": _projection_changes(plans["dvh_vectors"], middle_index,
                                                                              desired, row)})
    per_structure = {name: {"mean_error_pct_rx": float(np.mean(e["mean"])), "max_error_pct_rx": float(np.mean(e["max"])),
                            "max_from_vector_error_pct_rx": float(np.mean(e["max_from_vector"])),
                            "cases": len(e["mean"])} for name, e in errors.items()}
    down = [r["mean_change_pct_rx"] < DOWN_PCT_RX for r in responses]
    held = [r["mean_change_pct_rx"] < DOWN_PCT_RX and r["ptv_d95_change_pct_rx"] <= 2.0 for r in responses]
    return {
        "weights": str(weights), "pareto_run": pareto_run, "patients": len(files), "device": str(predictor.device),
        "machine": platform.processor() or platform.machine(),
        "accuracy": {"per_structure": per_structure,
                     "mean_error_pct_rx": float(np.mean([v["mean_error_pct_rx"] for v in per_structure.values()])),
                     "max_error_pct_rx": float(np.mean([v["max_error_pct_rx"] for v in per_structure.values()])),
                     "max_from_vector_error_pct_rx": float(np.mean([v["max_from_vector_error_pct_rx"]
                                                                    for v in per_structure.values()]))},
        "responsiveness": {"edit": f"one OAR's curve moved to {EDIT_FACTOR:.0%} of its doses", "cases": len(responses),
                           "oar_mean_down_fraction": float(np.mean(down)) if down else float("nan"),
                           "down_and_ptv_d95_within_2pct_fraction": float(np.mean(held)) if held else float("nan"),
                           "median_oar_mean_change_pct_rx": float(np.median([r["mean_change_pct_rx"] for r in responses])),
                           "max_ptv_d95_change_pct_rx": float(max(r["ptv_d95_change_pct_rx"] for r in responses)),
                           "projection_down_fraction": {
                               kind: float(np.mean([r["projection_change_pct_rx"][kind] < DOWN_PCT_RX for r in responses]))
                               for kind in ("plans", "mixes")},
                           "rows": responses},
        "latency_s": {"dvh_edit_median": statistics.median(latencies),
                      "dvh_edit_p90": float(np.percentile(latencies, 90))},
    }


def pareto_spread(pareto_run: str, plot: Path | None) -> dict:
    """Range across each training patient's plans of every structure's mean dose (% of the prescription,
    from the DVH vectors), averaged over patients; optionally a plot of the first patient's plan DVHs."""
    from doseai.models.dvh_conditioned import DEFAULT_DVH_LAYOUT

    layout = DEFAULT_DVH_LAYOUT
    files = sorted((cache_root() / "pareto" / pareto_run / "train").glob("pt_*.npz"))
    step = layout["max_relative_dose"] / (layout["n_points"] - 1)
    ranges: dict[str, list[float]] = {}
    for path in files:
        vectors = np.load(path)["dvh_vectors"]
        means = 100 * step * vectors[:, :, 1:].sum(axis=2)  # mean dose = integral of the cumulative DVH
        for row, name in enumerate(layout["structures"]):
            if vectors[0, row, 0] > 0:
                ranges.setdefault(name, []).append(float(means[:, row].max() - means[:, row].min()))
    if plot and files:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        vectors = np.load(files[0])["dvh_vectors"]
        levels = 100 * np.linspace(0, layout["max_relative_dose"], layout["n_points"])
        figure, axes = plt.subplots(figsize=(9, 5.5), dpi=110)
        palette = plt.get_cmap("tab10")
        for row, name in enumerate(layout["structures"]):
            if vectors[0, row, 0] > 0:
                for index, vector in enumerate(vectors):
                    axes.plot(levels, 100 * vector[row], color=palette(row % 10), lw=1, alpha=0.7,
                              label=name if index == 0 else None)
        axes.set_xlabel("Dose [% of the prescription]")
        axes.set_ylabel("Volume [%]")
        axes.set_title(f"{files[0].stem}: DVHs of its {len(vectors)} Pareto plans")
        axes.legend(fontsize=8, frameon=False)
        axes.grid(alpha=0.3)
        figure.tight_layout()
        plot.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(plot)
        plt.close(figure)
    return {"patients": len(files),
            "mean_dose_range_pct_rx": {name: float(np.mean(values)) for name, values in ranges.items()}}


def print_table(result: dict) -> None:
    a, r, t = result["accuracy"], result["responsiveness"], result["latency_s"]
    print(f"{'structure':<12} {'mean err %Rx':>13} {'max err %Rx':>12} {'max read off the DVH vector':>28} {'cases':>6}")
    for name, row in a["per_structure"].items():
        print(f"{name:<12} {row['mean_error_pct_rx']:13.2f} {row['max_error_pct_rx']:12.2f} "
              f"{row['max_from_vector_error_pct_rx']:28.2f} {row['cases']:6d}")
    print(f"{'average':<12} {a['mean_error_pct_rx']:13.2f} {a['max_error_pct_rx']:12.2f} "
          f"{a['max_from_vector_error_pct_rx']:28.2f}   (bar 1.6 / 1.8)")
    print(f"responsiveness ({r['cases']} OAR edits): OAR mean down {r['oar_mean_down_fraction']:.1%}, "
          f"down with PTV D95 within 2 % {r['down_and_ptv_d95_within_2pct_fraction']:.1%} (bar 90 %), "
          f"median change {r['median_oar_mean_change_pct_rx']:+.2f} %Rx")
    projection = r["projection_down_fraction"]
    print(f"  what the training targets ask (OAR mean down in the projection onto the plans): nearest plan "
          f"{projection['plans']:.1%}, nearest mix of two plans {projection['mixes']:.1%}")
    print(f"latency of a DVH edit ({result['device']}): median {t['dvh_edit_median']:.3f} s, p90 {t['dvh_edit_p90']:.3f} s")
    if "spread" in result:
        spread = result["spread"]
        print(f"Pareto spread ({spread['patients']} training patients), range of mean dose across plans [%Rx]: "
              + ", ".join(f"{k} {v:.1f}" for k, v in spread["mean_dose_range_pct_rx"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=DEFAULT_DVH_MODEL)
    parser.add_argument("--pareto-run", required=True)
    parser.add_argument("--json", default="benchmark-results/dvh_edit.json")
    parser.add_argument("--limit", type=int, help="only the first N held-out patients")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--record", action="store_true", help="write the results into the model card")
    args = parser.parse_args()
    result = run(args.weights, args.pareto_run, args.limit, args.threads)
    result["spread"] = pareto_spread(args.pareto_run, Path(args.json).with_name("pareto_spread.png"))
    print_table(result)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json} and {Path(args.json).with_name('pareto_spread.png')}")
    if args.record and not args.limit:
        from doseai.train.export import record_validation

        record_validation(args.weights, {k: result[k] for k in ("accuracy", "responsiveness", "latency_s", "device")}
                          | {"pareto_spread": result["spread"],
                             "benchmark": f"Testing/benchmarks/bench_dvh_edit.py --pareto-run {args.pareto_run}"})


if __name__ == "__main__":
    main()
