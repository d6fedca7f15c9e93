"""Benchmark: DVH + metrics speed on a 128^3 dose with 10 structures, and OpenKBP scoring speed.

Prints a table and writes JSON (default: benchmark-results/dvh.json). Run:
    python Testing/benchmarks/bench_dvh.py [--json PATH] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from doseai.dvh import compute_dvhs
from doseai.report import case_metrics
from doseai.sample import make_sample_case
from doseai.scoring import score_patient


def _median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="benchmark-results/dvh.json")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    case = make_sample_case(seed=0, shape=(128, 128, 128), spacing_xyz=(3.9, 3.9, 2.5))
    masks = {name: mask for name, mask in case.structures.items() if name != "External"}
    voxel_cc = case.geometry.voxel_volume_mm3 / 1000
    rows = {
        "compute_dvhs, 10 structures, 128^3": _median_seconds(lambda: compute_dvhs(case.dose, masks, voxel_cc), args.repeats),
        "case_metrics (all metrics), 11 structures, 128^3": _median_seconds(lambda: case_metrics(case, case.dose), args.repeats),
        "score_patient (OpenKBP dose + DVH metrics), 128^3": _median_seconds(
            lambda: score_patient(case, case.dose * 0.97), args.repeats),
    }
    width = max(len(k) for k in rows)
    print(f"{'benchmark'.ljust(width)}  median [s]")
    for name, seconds in rows.items():
        print(f"{name.ljust(width)}  {seconds:10.4f}")
    result = {"machine": platform.processor() or platform.machine(), "repeats": args.repeats,
              "median_seconds": rows, "numpy": np.__version__}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
