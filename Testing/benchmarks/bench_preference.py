"""Benchmark of the DosePreference model on the OpenKBP validation split (never used for training).

  accuracy      OpenKBP dose score and DVH score at neutral sliders (all patients; and those with a CT); with
                the card's case-grid calibration (doseai/calibration.py), as predictions use, and the network alone
  steerability  per patient, sweeps of each slider over -1, -0.5, 0, 0.5, 1: monotonic fraction, size of
                the change (mean OAR dose / PTV homogeneity index), PTV D95 drift
  latency       slider change -> dose on the case grid (median), and a full prediction from a new case

Prints a table and writes JSON. Run:
    python Testing/benchmarks/bench_preference.py [--weights PATH] [--json PATH] [--record] [--limit N]
        [--record-latency]
--record writes the results into the model card next to the weights; --record-latency only the latency, under
the device's name (a lent GPU measures it on a few patients).
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

from doseai.dvh import homogeneity_index, dose_at_volume_pct
from doseai.io import openkbp
from doseai.paths import openkbp_root
from doseai.predict import DEFAULT_MODEL, DosePredictor
from doseai.scoring import Evaluation, score_patient
from doseai.structures import is_target

SWEEP = (-1.0, -0.5, 0.0, 0.5, 1.0)


def _mean_oar_dose(case, dose) -> float:
    means = [dose[case.structures[name]].mean() for name in case.oars if case.structures[name].any()]
    return float(np.mean(means))


def _top_ptv(case):
    return case.mask(case.targets[0])


def _strictly_monotonic(values, decreasing: bool) -> bool:
    steps = np.diff(values)
    return bool(np.all(steps < 0) if decreasing else np.all(steps > 0))


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads ({platform.processor() or platform.machine()})"


def run(weights: Path, limit: int | None, threads: int | None) -> dict:
    predictor = DosePredictor(weights, threads=threads)
    predictor.calibrated = False  # the network's dose, then predictor.calibrate: both without a second network run
    patients = list(openkbp.list_patients(openkbp_root() / "validation").items())[:limit]
    everyone, with_ct, network_alone = Evaluation(), Evaluation(), Evaluation()
    oar_rows, hom_rows, slider_latency, full_latency = [], [], [], []
    level_scaled, case_warnings = {}, {}  # where the plan level scale acted; DosePredictor.case_warnings
    for pid, path in tqdm(patients, desc="validation patients", unit="patient"):
        case = openkbp.load_npz(path)
        start = time.perf_counter()
        predictor.set_case(case)
        network_dose = predictor.predict()
        neutral = predictor.calibrate(network_dose)
        full_latency.append(time.perf_counter() - start)
        if predictor.timings.get("plan_level_scale", 1.0) != 1.0:
            level_scaled[pid] = predictor.timings["plan_level_scale"]
        if predictor.case_warnings:
            case_warnings[pid] = predictor.case_warnings
        score = score_patient(case, neutral)
        network_alone.patients.append(score_patient(case, network_dose, score.reference_metrics))
        everyone.patients.append(score)
        if case.ct is not None:
            with_ct.patients.append(score)
        ptv = _top_ptv(case)
        oar_doses, oar_d95, hom_hi, hom_d95 = [], [], [], []
        for value in SWEEP:
            start = time.perf_counter()
            dose = neutral if value == 0 else predictor.calibrate(predictor.predict(oar_sparing=value))
            if value != 0:
                slider_latency.append(time.perf_counter() - start)
            oar_doses.append(_mean_oar_dose(case, dose))
            oar_d95.append(dose_at_volume_pct(dose[ptv], 95))
            dose = neutral if value == 0 else predictor.calibrate(predictor.predict(homogeneity=value))
            hom_hi.append(homogeneity_index(dose[ptv].astype(np.float64)))
            hom_d95.append(dose_at_volume_pct(dose[ptv], 95))
        oar_rows.append({"patient": pid, "mean_oar_gy": oar_doses, "ptv_d95_gy": oar_d95})
        hom_rows.append({"patient": pid, "hi": hom_hi, "ptv_d95_gy": hom_d95})

    def summary(rows, key, decreasing=True):
        monotonic = [_strictly_monotonic(r[key], decreasing) for r in rows]
        change = [(r[key][0] - r[key][-1]) / r[key][2] for r in rows]
        drift = [max(abs(d - r["ptv_d95_gy"][2]) for d in r["ptv_d95_gy"]) for r in rows]
        return {"monotonic_fraction": float(np.mean(monotonic)),
                "mean_relative_range": float(np.mean(change)),  # (value at -1 - value at +1) / neutral value
                "mean_max_ptv_d95_drift_gy": float(np.mean(drift)), "max_ptv_d95_drift_gy": float(np.max(drift))}

    return {
        "weights": str(weights), "machine": platform.processor() or platform.machine(),
        "device": str(predictor.device), "device_name": _device_name(predictor.device), "patients": len(patients),
        "network_mode": predictor.network_mode,
        "accuracy": {"dose_score_gy": everyone.dose_score, "dvh_score_gy": everyone.dvh_score,
                     "with_ct": {"patients": len(with_ct.patients), "dose_score_gy": with_ct.dose_score,
                                 "dvh_score_gy": with_ct.dvh_score},
                     "network_alone": {"dose_score_gy": network_alone.dose_score,
                                       "dvh_score_gy": network_alone.dvh_score},
                     "calibration": predictor.calibration.as_dict() if predictor.calibration else None,
                     "plan_level_scaled": level_scaled, "case_warnings": case_warnings,
                     # what the DVH score is made of: each metric's error, targets and OARs pooled
                     "per_metric": everyone.errors_by(lambda structure, metric:
                                                      f"{'target' if is_target(structure) else 'OAR'} {metric}")},
        "steerability": {"oar_sparing": summary(oar_rows, "mean_oar_gy"), "homogeneity": summary(hom_rows, "hi"),
                         "sweep": list(SWEEP)},
        "latency_s": {"slider_change_median": statistics.median(slider_latency),
                      "slider_change_p90": float(np.percentile(slider_latency, 90)),
                      "new_case_median": statistics.median(full_latency)},
        "per_patient": {"oar_sparing": oar_rows, "homogeneity": hom_rows},
    }


def print_table(result: dict) -> None:
    a, s, t = result["accuracy"], result["steerability"], result["latency_s"]
    rows = [
        ("dose score [Gy] (all / with CT)", f"{a['dose_score_gy']:.3f} / {a['with_ct']['dose_score_gy']:.3f}"),
        ("DVH score [Gy] (all / with CT)", f"{a['dvh_score_gy']:.3f} / {a['with_ct']['dvh_score_gy']:.3f}"),
        (f"network alone ({result['network_mode']}), no calibration: dose / DVH score [Gy]",
         f"{a['network_alone']['dose_score_gy']:.3f} / {a['network_alone']['dvh_score_gy']:.3f}"),
        *((f"  {key}: MAE / bias [Gy]", f"{v['mae']:.2f} / {v['bias']:+.2f}") for key, v in a["per_metric"].items()),
        ("plan level scaled by the calibration (patients)", f"{len(a['plan_level_scaled'])}: "
         + ", ".join(f"{pid} x{scale:.3f}" for pid, scale in a["plan_level_scaled"].items())),
        ("case warnings, e.g. structures unlike training (patients)",  # the warnings themselves are in the JSON
         f"{len(a['case_warnings'])}: " + ", ".join(a["case_warnings"])),
        ("OAR sparing: monotonic fraction", f"{s['oar_sparing']['monotonic_fraction']:.1%}"),
        ("OAR sparing: mean OAR dose range / neutral", f"{s['oar_sparing']['mean_relative_range']:.1%}"),
        ("OAR sparing: PTV D95 drift mean / max [Gy]",
         f"{s['oar_sparing']['mean_max_ptv_d95_drift_gy']:.2f} / {s['oar_sparing']['max_ptv_d95_drift_gy']:.2f}"),
        ("homogeneity: monotonic fraction", f"{s['homogeneity']['monotonic_fraction']:.1%}"),
        ("homogeneity: HI range / neutral", f"{s['homogeneity']['mean_relative_range']:.1%}"),
        ("homogeneity: PTV D95 drift mean / max [Gy]",
         f"{s['homogeneity']['mean_max_ptv_d95_drift_gy']:.2f} / {s['homogeneity']['max_ptv_d95_drift_gy']:.2f}"),
        (f"latency, slider change [s] ({result['device']})", f"{t['slider_change_median']:.3f} (p90 {t['slider_change_p90']:.3f})"),
        ("latency, new case (features + full network) [s]", f"{t['new_case_median']:.3f}"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{'metric'.ljust(width)}  value   ({result['patients']} validation patients)")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--json", default="benchmark-results/preference.json")
    parser.add_argument("--limit", type=int, help="only the first N validation patients (quick look)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--record", action="store_true",
                        help="write the results into the model card (all validation patients only)")
    parser.add_argument("--record-latency", action="store_true",
                        help="write only the latency into the card, under validation.latency_by_device and the "
                             "device's name (any --limit: e.g. on a lent GPU)")
    args = parser.parse_args()
    result = run(args.weights, args.limit, args.threads)
    print_table(result)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    if args.record and args.limit:
        print("not recorded: --record needs every validation patient (no --limit)")
    elif args.record:
        from doseai.train.export import record_validation

        record_validation(args.weights, {k: result[k] for k in ("accuracy", "steerability", "latency_s", "device",
                                                                 "network_mode")}
                          | {"benchmark": "Testing/benchmarks/bench_preference.py"})
    if args.record_latency:
        from doseai.train.export import update_card

        entry = {**result["latency_s"], "patients": result["patients"],
                 "benchmark": "Testing/benchmarks/bench_preference.py --record-latency"}
        update_card(args.weights, lambda card: card["validation"].setdefault("latency_by_device", {})
                    .update({result["device_name"]: entry}))


if __name__ == "__main__":
    main()
