"""Where the dose engine's time goes on OpenKBP validation patients (issue 29: the influence matrix is what keeps
a plan from a predicted dose above 10 s), and what the engine's short array text saves.

For each patient, pyRadPlan's influence matrix of the fluence set's 9-beam, 10 mm plan is computed twice, in
alternating order: as the engine runs it (with ``_short_array_text``: pyRadPlan's pydantic models no longer turn
every ray's arrays into text) and without it (numpy's full array text, as before). Both give the same matrix
(checked: same non-zeros and values). Printed and written as JSON: the stages' seconds (beam set-up ``stf``,
matrix ``dij``, conversion to torch), median over patients. Run:
    python Testing/benchmarks/bench_engine_time.py [--limit N] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

DEFAULT_SET = Path(__file__).resolve().parents[2] / "data" / "fluence_set" / "mimic_10mm" / "validation"
STAGES = ("prepare_s", "stf_s", "dij_s", "convert_s")


def timed(case, record, settings, short_text: bool):
    """(seconds, the engine's own stage timings, the matrix) of one influence matrix."""
    from unittest import mock

    from doseai.engine import pyradplan_engine
    from doseai.train.fluence_set import rebuild_influence

    switch = contextlib.nullcontext() if short_text else mock.patch.object(
        pyradplan_engine, "_short_array_text", contextlib.nullcontext)
    with switch:
        start = time.perf_counter()
        influence = rebuild_influence(case, record, settings)
        seconds = time.perf_counter() - start
    return seconds, influence.timings_s, influence.matrix


def run(args) -> dict:
    import torch

    from doseai.io import openkbp
    from doseai.paths import openkbp_root
    from doseai.train.fluence_set import load_fluence_set

    torch.set_num_threads(args.threads)
    settings, records = load_fluence_set(Path(args.fluence_set))
    paths = openkbp.list_patients(openkbp_root() / "validation")
    import pyRadPlan  # noqa: F401 - its first import (seconds) kept out of the timings

    results = {"machine": {"platform": platform.platform(), "threads": args.threads,
                           "numpy": np.__version__, "pyRadPlan": pyRadPlan.__version__}, "patients": {}}
    for index, pid in enumerate(list(records)[:args.limit]):
        case = openkbp.load_npz(paths[pid])
        runs, matrices = {}, {}
        for short_text in ((True, False) if index % 2 == 0 else (False, True)):
            seconds, stages, matrices[short_text] = timed(case, records[pid], settings, short_text)
            runs["short_text" if short_text else "full_text"] = {"total_s": seconds, **stages}
        same = (matrices[True].values().numel() == matrices[False].values().numel()
                and torch.equal(matrices[True].values(), matrices[False].values()))
        results["patients"][pid] = {**runs, "bixels": len(records[pid]["weights"]), "same_matrix": bool(same),
                                    "non_zeros": int(matrices[True].values().numel()),
                                    "on_water": bool(records[pid]["on_water"])}
        print(pid, {k: round(v["total_s"], 2) for k, v in runs.items()}, "same matrix:", same, flush=True)
    results["summary"] = summarise(results["patients"])
    return results


def summarise(patients: dict) -> dict:
    summary = {}
    for arm in ("full_text", "short_text"):
        summary[arm] = {key: statistics.median(p[arm][key] for p in patients.values())
                        for key in ("total_s", *STAGES)}
    summary["median_saved_s"] = statistics.median(p["full_text"]["total_s"] - p["short_text"]["total_s"]
                                                  for p in patients.values())
    summary["all_same_matrix"] = all(p["same_matrix"] for p in patients.values())
    summary["patients"] = len(patients)
    return summary


def print_table(results: dict) -> None:
    s = results["summary"]
    print(f"\n{s['patients']} validation patients, {results['machine']['threads']} thread(s), medians (s):")
    print(f"{'':22}{'total':>8}" + "".join(f"{k[:-2]:>10}" for k in STAGES))
    for arm, label in (("full_text", "full array text"), ("short_text", "short array text")):
        print(f"{label:22}{s[arm]['total_s']:8.2f}" + "".join(f"{s[arm][k]:10.2f}" for k in STAGES))
    print(f"saved per patient (median of differences): {s['median_saved_s']:.2f} s; "
          f"same matrices: {s['all_same_matrix']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fluence-set", default=str(DEFAULT_SET))
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="bench_engine_time.json")
    args = parser.parse_args()
    results = run(args)
    Path(args.json).write_text(json.dumps(results, indent=1))
    print_table(results)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
