"""DVH editing where the user stands: from the shipped preference model's dose at neutral sliders, on the OpenKBP
validation patients with a CT (never trained on), with the edit as the module, the CLI and the demo apply it
(``DVHDosePredictor.predict_edit``: the start dose changed by what the desired DVH asks).

  identity   no edit (the desired DVH is the start dose's own): mean |change| where the start dose exceeds 1 Gy,
             and each target's D95 change in % of its prescription. Bar: <= 0.5 Gy and within 1 % on >= 95 % of
             patients.
  locality   one OAR curve moved to 80 % of its doses (each parotid, the larynx, the mandible, the spinal cord):
             the share of the asked mean-dose change achieved (asked: the desired curve's mean minus the start
             curve's, both read off the DVH vector), the top target's D95 change (% Rx), every untouched OAR's mean
             and D0.1cc change, the body's mean change. Bar, on >= 90 % of edits: 50-150 % achieved, top PTV D95
             within 2 % Rx, every untouched OAR's mean within 1.5 Gy, the body mean within 1 Gy. An edit that asks
             for less than 1 % of the prescription (an OAR far from the dose) is too small to measure and is
             counted apart.
  latency    one edit (the conditioned half of the network, resampling, the difference), after the first.

Prints a table and writes JSON. Run:
    python Testing/benchmarks/bench_dvh_edit_user_path.py [--limit N] [--threads 2] [--json OUT] [--record]
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

from doseai.dvh import dose_at_volume_cc, dose_at_volume_pct
from doseai.io import openkbp
from doseai.paths import openkbp_root
from doseai.predict import DEFAULT_DVH_MODEL, DosePredictor, DVHDosePredictor
from doseai.train.train_dvh import one_curve_edit

EDITED = ("Parotid_L", "Parotid_R", "Larynx", "Mandible", "SpinalCord")
FACTOR = 0.8
MEASURABLE_PCT_RX = 1.0
BARS = {"identity_mean_gy": 0.5, "identity_d95_pct_rx": 1.0, "identity_share": 0.95,
        "achieved_low": 0.5, "achieved_high": 1.5, "ptv_d95_pct_rx": 2.0, "oar_mean_gy": 1.5, "body_mean_gy": 1.0,
        "locality_share": 0.90}


def _patient(case, preference: DosePredictor, dvh: DVHDosePredictor) -> dict:
    start = preference.predict_case(case)
    dvh.set_case(case)
    body = case.structures["External"] if "External" in case.structures else start > 0
    targets = sorted(case.prescriptions, key=case.prescriptions.get, reverse=True)
    top = targets[0]
    voxel_cc = case.geometry.voxel_volume_mm3 / 1000.0
    unedited = dvh.dvh_vector(start)
    same = dvh.predict_edit(start, unedited)
    identity = {"mean_abs_gy": float(np.abs(same - start)[start > 1.0].mean()),
                "d95_change_pct_rx": {t: 100 * (dose_at_volume_pct(same[case.structures[t]], 95)
                                                - dose_at_volume_pct(start[case.structures[t]], 95))
                                      / case.prescriptions[t] for t in targets}}
    oars = [n for n in dvh.structures if n not in targets and n in case.structures and case.structures[n].any()]
    edits, seconds = [], []
    for name in EDITED:
        if name not in oars:
            continue
        desired, asked = one_curve_edit(dvh, unedited, name, FACTOR)
        begin = time.perf_counter()
        edited = dvh.predict_edit(start, desired)
        seconds.append(time.perf_counter() - begin)
        mask = case.structures[name]
        achieved = float(edited[mask].mean() - start[mask].mean())
        others = {o: {"mean_gy": float(edited[case.structures[o]].mean() - start[case.structures[o]].mean()),
                      "d01cc_gy": dose_at_volume_cc(edited[case.structures[o]], 0.1, voxel_cc)
                      - dose_at_volume_cc(start[case.structures[o]], 0.1, voxel_cc)} for o in oars if o != name}
        edits.append({
            "structure": name, "asked_gy": asked, "achieved_gy": achieved,
            "measurable": abs(asked) >= MEASURABLE_PCT_RX / 100 * case.prescriptions[top],
            "achieved_share": achieved / asked if asked else float("nan"),
            "top_ptv_d95_change_pct_rx": 100 * (dose_at_volume_pct(edited[case.structures[top]], 95)
                                               - dose_at_volume_pct(start[case.structures[top]], 95))
            / case.prescriptions[top],
            "ptv_d95_change_pct_rx": {t: 100 * (dose_at_volume_pct(edited[case.structures[t]], 95)
                                                - dose_at_volume_pct(start[case.structures[t]], 95))
                                      / case.prescriptions[t] for t in targets},
            "other_oars": others, "body_mean_change_gy": float(edited[body].mean() - start[body].mean()),
        })
    return {"identity": identity, "edits": edits, "edit_seconds": seconds[1:]}


def _edit_passes(edit: dict) -> bool:
    return (BARS["achieved_low"] <= edit["achieved_share"] <= BARS["achieved_high"]
            and abs(edit["top_ptv_d95_change_pct_rx"]) <= BARS["ptv_d95_pct_rx"]
            and all(abs(o["mean_gy"]) <= BARS["oar_mean_gy"] for o in edit["other_oars"].values())
            and abs(edit["body_mean_change_gy"]) <= BARS["body_mean_gy"])


def run(limit: int | None, threads: int | None) -> dict:
    folder = openkbp_root() / "validation" / "128"
    if not folder.is_dir():
        raise SystemExit(f"OpenKBP validation data not found at {folder}")
    preference = DosePredictor(threads=threads)
    dvh = DVHDosePredictor(threads=threads)
    patients = {}
    for pid, path in tqdm(list(openkbp.list_patients(folder).items())[:limit], desc="patients", unit="patient"):
        case = openkbp.load_patient(path)
        if case.ct is None:
            continue  # the bars are for patients with a CT
        patients[pid] = _patient(case, preference, dvh)
    identity_ok = [p["identity"]["mean_abs_gy"] <= BARS["identity_mean_gy"]
                   and all(abs(v) <= BARS["identity_d95_pct_rx"] for v in p["identity"]["d95_change_pct_rx"].values())
                   for p in patients.values()]
    edits = [e for p in patients.values() for e in p["edits"]]
    measurable = [e for e in edits if e["measurable"]]
    passing = [_edit_passes(e) for e in measurable]
    seconds = [s for p in patients.values() for s in p["edit_seconds"]]
    summary = {
        "patients": len(patients), "edits": len(edits), "measurable_edits": len(measurable),
        "identity_share_passing": float(np.mean(identity_ok)) if identity_ok else float("nan"),
        "identity_mean_abs_gy_max": max(p["identity"]["mean_abs_gy"] for p in patients.values()),
        "locality_share_passing": float(np.mean(passing)) if passing else float("nan"),
        "achieved_share_median": statistics.median(e["achieved_share"] for e in measurable),
        "achieved_share_in_range": float(np.mean([BARS["achieved_low"] <= e["achieved_share"] <= BARS["achieved_high"]
                                                  for e in measurable])),
        "top_ptv_d95_change_pct_rx_max_abs": max(abs(e["top_ptv_d95_change_pct_rx"]) for e in measurable),
        "top_ptv_d95_within_bar": float(np.mean([abs(e["top_ptv_d95_change_pct_rx"]) <= BARS["ptv_d95_pct_rx"]
                                                 for e in measurable])),
        "other_oar_mean_change_gy_max_abs": max(abs(o["mean_gy"]) for e in measurable for o in e["other_oars"].values()),
        "other_oars_within_bar": float(np.mean([all(abs(o["mean_gy"]) <= BARS["oar_mean_gy"]
                                                    for o in e["other_oars"].values()) for e in measurable])),
        "body_mean_change_gy_max_abs": max(abs(e["body_mean_change_gy"]) for e in measurable),
        "edit_seconds_median": statistics.median(seconds) if seconds else float("nan"),
        "edit_seconds_p90": float(np.percentile(seconds, 90)) if seconds else float("nan"),
        "per_structure": {name: {"edits": sum(e["structure"] == name for e in measurable),
                                 "achieved_share_median": statistics.median(
                                     [e["achieved_share"] for e in measurable if e["structure"] == name] or [np.nan]),
                                 "passing": float(np.mean([_edit_passes(e) for e in measurable
                                                           if e["structure"] == name] or [np.nan]))}
                          for name in EDITED},
    }
    summary["meets_bars"] = bool(summary["identity_share_passing"] >= BARS["identity_share"]
                                 and summary["locality_share_passing"] >= BARS["locality_share"])
    return {"benchmark": "bench_dvh_edit_user_path", "weights": DEFAULT_DVH_MODEL.name,
            "start": f"{DosePredictor().card['name']} at neutral sliders", "bars": BARS, "summary": summary,
            "machine": {"cpu": platform.processor() or platform.machine(), "threads": threads},
            "patients": patients}


def _print(result: dict) -> None:
    s = result["summary"]
    print(f"DVH edit from the preference dose, {s['patients']} validation patients with a CT, "
          f"{s['measurable_edits']} measurable edits of {s['edits']}")
    rows = [("no edit: patients within the bars", f"{s['identity_share_passing']:.1%}", ">= 95 %"),
            ("no edit: max mean |change| [Gy]", f"{s['identity_mean_abs_gy_max']:.3f}", "<= 0.5"),
            ("one OAR to 80 %: edits within every bar", f"{s['locality_share_passing']:.1%}", ">= 90 %"),
            ("  asked mean change achieved, median", f"{s['achieved_share_median']:.0%}", "50-150 %"),
            ("  achieved within 50-150 %", f"{s['achieved_share_in_range']:.1%}", ""),
            ("  top PTV D95 within 2 % Rx", f"{s['top_ptv_d95_within_bar']:.1%}", ""),
            ("  top PTV D95 change, max |.| [% Rx]", f"{s['top_ptv_d95_change_pct_rx_max_abs']:.2f}", "<= 2"),
            ("  untouched OARs' means within 1.5 Gy", f"{s['other_oars_within_bar']:.1%}", ""),
            ("  untouched OAR mean change, max |.| [Gy]", f"{s['other_oar_mean_change_gy_max_abs']:.2f}", "<= 1.5"),
            ("  body mean change, max |.| [Gy]", f"{s['body_mean_change_gy_max_abs']:.2f}", "<= 1"),
            ("edit latency median / p90 [s]", f"{s['edit_seconds_median']:.2f} / {s['edit_seconds_p90']:.2f}", "<= 1")]
    for label, value, bar in rows:
        print(f"{label:<44}{value:>16}  {bar}")
    for name, row in s["per_structure"].items():
        print(f"  {name:<12} {row['edits']:3d} edits, achieved median {row['achieved_share_median']:.0%}, "
              f"passing {row['passing']:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="bench_dvh_edit_user_path.json")
    parser.add_argument("--record", action="store_true", help="write the summary into the DVH model's card")
    args = parser.parse_args()
    result = run(args.limit, args.threads)
    _print(result)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    if args.record:
        record(result)


def record(result: dict) -> None:
    """Write the benchmark's summary into the DVH model's card (``user_path_benchmark``)."""
    card_path = DEFAULT_DVH_MODEL.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card["user_path_benchmark"] = {
        "command": "python Testing/benchmarks/bench_dvh_edit_user_path.py --threads 2 --record",
        "start": result["start"], "machine": result["machine"],
        "edit": "DVHDosePredictor.predict_edit: start + gain x (f(desired) - f(DVH of start))",
        "bars": BARS, **result["summary"]}
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(f"recorded in {card_path}")


if __name__ == "__main__":
    main()
