"""Benchmark of the residual dose diffusion model on the OpenKBP validation split (never used for training),
beside its base preference model, from the case as the user loads it (the predictor's own path).

  accuracy     OpenKBP dose score and DVH score of the base model's dose, of the mean of 4 samples, of the mean
               of --samples samples, and of a single sample
  calibration  with --samples samples (seed 1): the fraction of body voxels (OpenKBP's possible-dose mask, where
               it scores), and of the OpenKBP DVH metrics, where the clinical dose lies inside the samples' 5-95 % band; the median band width; and
               whether the spread points at the error: the base's mean absolute error in the voxels of the
               widest and of the narrowest tenth of the band
  time         a new case (set_case) and 4 samples with their mean on the case grid, per patient (median)

Prints a table and writes JSON. Run:
    python Testing/benchmarks/bench_diffusion.py [--weights PATH] [--samples 16] [--limit N] [--json PATH]
        [--record] [--ablation WEIGHTS]
--record writes the results into the model card beside the weights (under validation; with --ablation the
ablation's results under ablation.without_clinical_metric_term.validation).
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

from doseai.diffusion_predict import DiffusionDosePredictor
from doseai.io import openkbp
from doseai.paths import openkbp_root
from doseai.predict import DEFAULT_DIFFUSION_MODEL
from doseai.scoring import Evaluation, metric_kind, score_patient

TIMED_SAMPLES = 4


def _inside(value, low, high) -> np.ndarray:
    return (value >= low) & (value <= high)


def _spread_points_at_error(spread: np.ndarray, error: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """The base's mean absolute error in the widest and in the narrowest tenth of the band (voxels of ``mask``)."""
    s, e = spread[mask], error[mask]
    low, high = np.percentile(s, [10, 90])
    return float(e[s >= high].mean()), float(e[s <= low].mean())


def run(weights: Path, limit: int | None, samples: int, threads: int | None, steps: int) -> dict:
    predictor = DiffusionDosePredictor(weights, threads=threads)
    predictor.steps = steps
    patients = list(openkbp.list_patients(openkbp_root() / "validation").items())[:limit]
    base_eval, mean4_eval, mean_eval, single_eval = Evaluation(), Evaluation(), Evaluation(), Evaluation()
    voxel_inside, metric_inside, band_width, wide_error, narrow_error = [], [], [], [], []
    samples_only_inside, samples_only_width, metric_kinds = [], [], []
    case_s, sampling_s = [], []
    for pid, path in tqdm(patients, desc="validation patients", unit="patient"):
        case = openkbp.load_npz(path)
        start = time.perf_counter()
        predictor.set_case(case)
        prepared = time.perf_counter()
        timed = predictor.sample(TIMED_SAMPLES, seed=0)
        mean4 = timed.mean
        done = time.perf_counter()
        case_s.append(done - start)
        sampling_s.append(done - prepared)
        base = predictor.base.predict()
        base_score = score_patient(case, base)
        reference_metrics = base_score.reference_metrics
        base_eval.patients.append(base_score)
        mean4_eval.patients.append(score_patient(case, mean4, reference_metrics))
        drawn = predictor.sample(samples, seed=1)
        mean_eval.patients.append(score_patient(case, drawn.mean, reference_metrics))
        single_eval.patients.append(score_patient(case, drawn.doses[0], reference_metrics))
        low, high = drawn.band()
        possible = case.possible_dose_mask if case.possible_dose_mask is not None else np.ones(base.shape, bool)
        voxel_inside.append(float(_inside(case.dose, low, high)[possible].mean()))
        band_width.append(float(np.median((high - low)[possible])))
        samples_low, samples_high = drawn.band(fine_scale=False)
        samples_only_inside.append(float(_inside(case.dose, samples_low, samples_high)[possible].mean()))
        samples_only_width.append(float(np.median((samples_high - samples_low)[possible])))
        wide, narrow = _spread_points_at_error(high - low, np.abs(base - case.dose), possible)
        wide_error.append(wide)
        narrow_error.append(narrow)
        for key, (lo, hi) in drawn.metric_bands(case).items():
            metric_inside.append(bool(lo <= reference_metrics[key] <= hi))
            metric_kinds.append(metric_kind(key))

    def scores(evaluation: Evaluation) -> dict:
        return {"dose_score_gy": evaluation.dose_score, "dvh_score_gy": evaluation.dvh_score}

    return {
        "weights": str(weights), "base": predictor.card["base_model"], "patients": len(patients),
        "machine": platform.processor() or platform.machine(), "device": str(predictor.device),
        "threads": threads, "ddim_steps": steps, "samples_for_calibration": samples,
        "accuracy": {"base_model": scores(base_eval), f"mean_of_{TIMED_SAMPLES}": scores(mean4_eval),
                     f"mean_of_{samples}": scores(mean_eval), "single_sample": scores(single_eval)},
        "calibration": {"band": "voxels: the 5-95 % band of DiffusionDosePredictor (the samples' spread with the card's "
                                "fine-scale error added, when it has one) and the samples' own 5-95 % percentiles; "
                                "DVH metrics: DoseSamples.metric_bands (the samples' spread with the card's fine-scale "
                                "metric error added, when it has one)",
                        "fine_scale": predictor.card.get("fine_scale") is not None,
                        "voxels_inside_fraction": float(np.mean(voxel_inside)),
                        "voxels_inside_fraction_samples_only": float(np.mean(samples_only_inside)),
                        "median_band_width_gy_samples_only": float(np.median(samples_only_width)),
                        "dvh_metrics_inside_fraction": float(np.mean(metric_inside)),
                        "dvh_metrics": len(metric_inside),
                        "dvh_metrics_inside_by_kind": {
                            kind: float(np.mean([i for i, k in zip(metric_inside, metric_kinds) if k == kind]))
                            for kind in sorted(set(metric_kinds))},
                        "median_band_width_gy": float(np.median(band_width)),
                        "base_error_in_widest_tenth_gy": float(np.mean(wide_error)),
                        "base_error_in_narrowest_tenth_gy": float(np.mean(narrow_error)),
                        "per_patient_voxels_inside": dict(zip([p for p, _ in patients], voxel_inside))},
        "time_s": {f"new_case_and_{TIMED_SAMPLES}_samples_median": statistics.median(case_s),
                   f"{TIMED_SAMPLES}_samples_median": statistics.median(sampling_s),
                   "per_sample_median": statistics.median(sampling_s) / TIMED_SAMPLES},
    }


def print_table(result: dict) -> None:
    print(f"\n{result['patients']} validation patients, {result['samples_for_calibration']} samples, "
          f"{result['ddim_steps']} DDIM steps, {result['device']} ({result['threads']} threads)")
    print(f"{'dose':<16}{'dose score':>12}{'DVH score':>12}  [Gy]")
    for name, row in result["accuracy"].items():
        print(f"{name:<16}{row['dose_score_gy']:12.3f}{row['dvh_score_gy']:12.3f}")
    c = result["calibration"]
    print(f"clinical dose inside the 5-95 % band: {100 * c['voxels_inside_fraction']:.1f} % of voxels (median band "
          f"{c['median_band_width_gy']:.2f} Gy; the samples' own band: {100 * c['voxels_inside_fraction_samples_only']:.1f} "
          f"%, {c['median_band_width_gy_samples_only']:.2f} Gy), {100 * c['dvh_metrics_inside_fraction']:.1f} % of "
          f"{c['dvh_metrics']} DVH metrics")
    print("DVH metrics inside, by kind: " + ", ".join(f"{kind} {100 * value:.0f} %"
                                                      for kind, value in c["dvh_metrics_inside_by_kind"].items()))
    print(f"base error where the band is widest / narrowest tenth: {c['base_error_in_widest_tenth_gy']:.2f} / "
          f"{c['base_error_in_narrowest_tenth_gy']:.2f} Gy")
    t = result["time_s"]
    print(f"time: new case + {TIMED_SAMPLES} samples {t[f'new_case_and_{TIMED_SAMPLES}_samples_median']:.2f} s, "
          f"{TIMED_SAMPLES} samples {t[f'{TIMED_SAMPLES}_samples_median']:.2f} s (medians)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=DEFAULT_DIFFUSION_MODEL)
    parser.add_argument("--ablation", type=Path, help="the diffusion weights trained without the clinical-metric term")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("bench_diffusion.json"))
    parser.add_argument("--record", action="store_true", help="write the results into the model card")
    args = parser.parse_args()
    result = run(args.weights, args.limit, args.samples, args.threads, args.steps)
    print_table(result)
    if args.ablation:
        result["ablation"] = run(args.ablation, args.limit, args.samples, args.threads, args.steps)
        print("\nablation (without the clinical-metric term):")
        print_table(result["ablation"])
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    if args.record:
        from doseai.train.export import update_card

        def record(card: dict) -> None:
            card["validation"] = {k: v for k, v in result.items() if k not in ("ablation", "weights")}
            if "ablation" in result:
                card.setdefault("ablation", {}).setdefault("without_clinical_metric_term", {})["validation"] = {
                    k: v for k, v in result["ablation"].items() if k not in ("weights",)}
        update_card(args.weights, record)


if __name__ == "__main__":
    main()
