"""Dose mimicking on the OpenKBP validation split: for each patient, optimize a 9-beam plan (its CT, its
structures, pyRadPlan's 6 MV pencil beam) that mimics the clinical reference dose, and score the plan's
dose against that reference with the OpenKBP dose score and DVH score.

The per-patient time is the dose engine (stf + influence matrix) plus the optimization; pyRadPlan's
import (once per process) is reported apart. Results are appended to the JSON after every patient, and a
rerun with the same --json skips the patients already there (the whole split takes about half an hour on
2 cores). Run:
    python Testing/benchmarks/bench_mimic.py [--limit N] [--bixel-mm 10] [--json PATH] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path


from doseai.io import openkbp
from doseai.paths import openkbp_root
from doseai.scoring import Evaluation, PatientScore, score_patient


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"patients": {}}


def run(args) -> dict:
    import torch

    from doseai.optimize.plan import PlanSettings, plan_from_dose

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.json)
    results = _load(out)
    settings = PlanSettings(mode="mimic", n_beams=9, bixel_width_mm=args.bixel_mm,
                            lateral_cutoff_mm=args.lateral_cutoff_mm, max_iterations=args.max_iterations)
    results["settings"] = {"bixel_width_mm": args.bixel_mm, "lateral_cutoff_mm": args.lateral_cutoff_mm,
                           "max_iterations": args.max_iterations, "beams": 9, "engine": "pyradplan",
                           "working_spacing_mm": settings.working_spacing_mm, "threads": args.threads,
                           "machine": platform.processor() or platform.machine()}
    start = time.perf_counter()
    import pyRadPlan  # noqa: F401 - once per process, not per patient

    results["import_s"] = time.perf_counter() - start
    patients = list(openkbp.list_patients(openkbp_root() / "validation").items())[:args.limit]
    for index, (pid, path) in enumerate(patients):
        if pid in results["patients"]:
            continue
        case = openkbp.load_npz(path)
        start = time.perf_counter()
        plan = plan_from_dose(case, case.dose, settings, progress=False)
        seconds = time.perf_counter() - start
        score = score_patient(case, plan.dose)
        results["patients"][pid] = {
            "seconds": seconds, "engine_s": plan.timings_s["engine_s"], "optimize_s": plan.timings_s["optimize_s"],
            "bixels": int(plan.fluence.weights.size), "iterations": plan.fluence.iterations,
            "stop_reason": plan.fluence.stop_reason, "has_ct": case.ct is not None,
            "dose_score": score.dose_score,
            "dvh_errors": {f"{s}|{m}": v for (s, m), v in score.dvh_errors.items()},
            "reference_metrics": {f"{s}|{m}": v for (s, m), v in score.reference_metrics.items()},
            "plan_metrics": {f"{s}|{m}": v for (s, m), v in score.predicted_metrics.items()},
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        print(f"[{index + 1}/{len(patients)}] {pid}: dose score {score.dose_score:.2f} Gy, "
              f"{seconds:.1f} s (engine {plan.timings_s['engine_s']:.1f}, optimization "
              f"{plan.timings_s['optimize_s']:.1f}; {plan.fluence.weights.size} bixels)", flush=True)
    return results


def summarize(results: dict) -> dict:
    rows = list(results["patients"].values())
    evaluation = Evaluation()
    for pid, row in results["patients"].items():
        def unpack(d):
            return {tuple(k.split("|")): v for k, v in d.items()}
        evaluation.patients.append(PatientScore(pid, row["dose_score"], unpack(row["reference_metrics"]),
                                                unpack(row["plan_metrics"])))
    seconds = [r["seconds"] for r in rows]
    return {
        "patients": len(rows),
        "dose_score_gy": evaluation.dose_score,
        "dvh_score_gy": evaluation.dvh_score,
        "seconds_per_patient_median": statistics.median(seconds),
        "seconds_per_patient_max": max(seconds),
        "engine_s_median": statistics.median(r["engine_s"] for r in rows),
        "optimize_s_median": statistics.median(r["optimize_s"] for r in rows),
        "bixels_median": statistics.median(r["bixels"] for r in rows),
        "import_s": results.get("import_s"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--bixel-mm", type=float, default=10.0)
    parser.add_argument("--lateral-cutoff-mm", type=float, default=50.0)
    parser.add_argument("--max-iterations", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="benchmark-results/mimic.json")
    args = parser.parse_args()
    results = run(args)
    summary = summarize(results)
    results["summary"] = summary
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\nDose mimicking on OpenKBP validation ({summary['patients']} patients, 9 beams, "
          f"{args.bixel_mm:g} mm bixels, pyRadPlan 6 MV)")
    print(f"{'dose score [Gy]':<34}{summary['dose_score_gy']:>8.2f}")
    print(f"{'DVH score [Gy]':<34}{summary['dvh_score_gy']:>8.2f}")
    print(f"{'time per patient, median [s]':<34}{summary['seconds_per_patient_median']:>8.1f}")
    print(f"{'time per patient, max [s]':<34}{summary['seconds_per_patient_max']:>8.1f}")
    print(f"{'  engine (stf + matrix), median':<34}{summary['engine_s_median']:>8.1f}")
    print(f"{'  optimization, median':<34}{summary['optimize_s_median']:>8.1f}")
    print(f"{'bixels, median':<34}{summary['bixels_median']:>8.0f}")
    print(f"{'pyRadPlan import (once) [s]':<34}{summary['import_s'] or 0:>8.1f}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
