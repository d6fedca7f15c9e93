"""Interactive prediction on clinical-size CTs: what a slider change, a DVH edit and a new case cost where the
user stands, on the dose grid of its own (``doseai.dose_grid``), on the 2-core CPU (or the device given).

Cases: the sample phantom generated at clinical size (513 x 513 x 256 voxels of 0.73 x 0.73 x 0.625 mm, 67 M
voxels; and 512 x 512 x 300 of 0.75 x 0.75 x 1.0 mm), written once as NRRD under the cache folder, and the
OpenKBP validation patients (never trained on; there the CT is its own dose grid), so that nothing regresses.
Each case runs in a fresh process, so that its peak memory is its own. In that process the two models are
loaded first (the module keeps them loaded from case to case), then:

  read          the case from its files (NRRD; not part of "new case": Slicer has the CT and segmentation)
  new case      from the case in memory on the CT grid to the first dose with its DVH and metrics: the dose
                grid (CT averaged per block, structures' partial volumes), the model inputs and the condition-
                free half of the network (both models' share of it for the preference model; the DVH model's
                own preparation is timed apart), the first dose (with the mirror correction at neutral)
  slider change a new slider position to the dose, its DVH and its metrics (10 positions, fixed seed)
  DVH edit      one OAR curve moved to 80 % of its doses (each parotid, larynx, mandible, cord) to the dose
                changed as asked, its DVH and metrics; the DVH model's first preparation of the case apart
  display       the dose into a volume node (slicer-core; skipped without it)
  peak memory   the process's maximum resident set, with both models loaded

``--ct-grid`` also runs the first clinical case on its CT grid (the previous behaviour) and reports how far the
dose-grid prediction lies from it: mean |difference| in the body, and D95 / Dmean of each structure.

Bars (issue 32, 513 x 513 x 256): slider change median <= 0.3 s, DVH edit <= 0.5 s, new case <= 3 s, peak memory
<= 2 GB. Prints a table and writes JSON. Run:
    python Testing/benchmarks/bench_clinical_size.py [--openkbp-limit N] [--ct-grid] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLINICAL_CASES = {  # name: ((nz, ny, nx), (x, y, z) mm)
    "phantom_513x513x256": ((256, 513, 513), (0.73, 0.73, 0.625)),
    "phantom_512x512x300": ((300, 512, 512), (0.75, 0.75, 1.0)),
}
BARS = {"slider_change_s": 0.3, "dvh_edit_s": 0.5, "new_case_s": 3.0, "peak_memory_gb": 2.0}
EDITED = ("Parotid_L", "Parotid_R", "Larynx", "Mandible", "SpinalCord")
SLIDER_POSITIONS = 10


def clinical_case_folder(name: str) -> Path:
    """The NRRD folder of a clinical-size phantom, generated on first use (about 30 s and 5 GB of memory)."""
    from doseai.io import save_case
    from doseai.paths import cache_root
    from doseai.sample import make_sample_case

    folder = cache_root() / "clinical_size" / name
    if not (folder / "case.json").is_file():
        shape, spacing = CLINICAL_CASES[name]
        print(f"generating {name} in {folder} ...", flush=True)
        save_case(make_sample_case(0, shape=shape, spacing_xyz=spacing, with_dose=False), folder, "nrrd", force=True)
    return folder


def _peak_gb() -> float:
    """This process's peak resident memory: VmHWM (ru_maxrss would carry over the parent's peak through exec)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux, bytes on macOS


def _timed(function):
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def _display_seconds(case, dose) -> float | None:
    """The dose into a volume node of a scene (slicer-core), as the module shows it; None without slicer-core."""
    try:
        import slicer  # noqa: F401
        from slicer import vtkMRMLScene

        from doseai.mrml import create_or_update_dose_node
    except Exception:  # noqa: BLE001 - slicer-core is optional here
        return None
    scene = vtkMRMLScene()
    node = create_or_update_dose_node(scene, dose, case.geometry, "dose")
    _, seconds = _timed(lambda: create_or_update_dose_node(scene, dose * 0.99, case.geometry, "dose", node=node))
    return seconds


def measure_case(path: str, dose_grid_mm: float | None, device: str, threads: int) -> dict:
    """Everything of one case, in this process (see the module docstring)."""
    from doseai.dose_grid import on_dose_grid
    from doseai.io import load_case
    from doseai.predict import DosePredictor, DVHDosePredictor
    from doseai.report import case_dvhs, case_metrics
    from doseai.train.train_dvh import one_curve_edit

    preference = DosePredictor(device=device, threads=threads)
    dvh_model = DVHDosePredictor(device=device, threads=threads)
    ct_case, read_s = _timed(lambda: load_case(path))
    ct_shape, ct_spacing = ct_case.geometry.shape, ct_case.geometry.spacing
    peak_after_read = _peak_gb()

    def shown(dose):  # what every change updates besides the dose
        return case_dvhs(case, dose), case_metrics(case, dose)

    start = time.perf_counter()
    case, grid_s = _timed(lambda: on_dose_grid(ct_case, dose_grid_mm))
    del ct_case  # the module keeps only the case on the dose grid
    preference.set_case(case)
    neutral = preference.predict()
    shown(neutral)
    new_case_s = time.perf_counter() - start
    new_case_timings = preference.timings

    rng = np.random.default_rng(0)
    slider_s, parts = [], []
    for oar_sparing, homogeneity in rng.uniform(-1, 1, (SLIDER_POSITIONS, 2)).round(2):
        start = time.perf_counter()
        dose = preference.predict(float(oar_sparing), float(homogeneity))
        predicted = time.perf_counter()
        _, dvh_at = _timed(lambda: case_dvhs(case, dose))
        _, metrics_at = _timed(lambda: case_metrics(case, dose))
        slider_s.append(time.perf_counter() - start)
        timings = preference.timings
        parts.append({"network_s": timings["condition_network_s"], "resample_back_s": timings["resample_back_s"],
                      "calibration_s": timings.get("calibration_s", 0.0), "predict_s": predicted - start,
                      "dvh_s": dvh_at, "metrics_s": metrics_at})
    _, dvh_s = _timed(lambda: case_dvhs(case, neutral))
    _, metrics_s = _timed(lambda: case_metrics(case, neutral))

    _, dvh_prepare_s = _timed(lambda: dvh_model.set_case(case))
    start_vector = dvh_model.dvh_vector(neutral)
    edit_s = []
    for name in EDITED:
        if name not in case.structures or not case.structures[name].any():
            continue
        desired, _ = one_curve_edit(dvh_model, start_vector, name, 0.8)
        start = time.perf_counter()
        shown(dvh_model.predict_edit(neutral, desired))
        edit_s.append(time.perf_counter() - start)
    first_edit_s, edit_s = edit_s[0], edit_s[1:]  # the first also runs the network for the start's own DVH
    return {
        "ct_shape_zyx": list(ct_shape), "ct_spacing_mm": list(ct_spacing),
        "dose_grid_shape_zyx": list(case.geometry.shape), "dose_grid_spacing_mm": list(case.geometry.spacing),
        "read_s": read_s, "new_case_s": new_case_s, "dose_grid_s": grid_s,
        "new_case_parts_s": {key: new_case_timings[key] for key in
                             ("features_s", "encoder_s", "condition_network_s", "resample_back_s")
                             if key in new_case_timings},
        "slider_change_s": {"median": statistics.median(slider_s), "max": max(slider_s),
                            "parts_median": {key: statistics.median(p[key] for p in parts) for key in parts[0]}},
        "dvh_s": dvh_s, "metrics_s": metrics_s,
        "dvh_model_prepare_s": dvh_prepare_s, "first_dvh_edit_s": first_edit_s,
        "dvh_edit_s": {"median": statistics.median(edit_s), "max": max(edit_s)},
        "display_s": _display_seconds(case, neutral),
        "peak_memory_gb": _peak_gb(), "peak_memory_after_read_gb": peak_after_read,
        "refinement_box_share": _box_share(preference),
    }


def _box_share(predictor) -> float:
    box = predictor._prepared.refinement_box
    return float(np.prod([s.stop - s.start for s in box.inner]) / np.prod(predictor._prepared.grid.shape))


def compare_with_ct_grid(path: str, dose_grid_mm: float, device: str, threads: int) -> dict:
    """The neutral prediction on the dose grid against the one on the CT grid (the previous behaviour): the
    seconds of both per slider change and new case, and how far the doses and their metrics lie apart."""
    from doseai.dose_grid import on_dose_grid
    from doseai.io import load_case
    from doseai.predict import DosePredictor
    from doseai.report import case_metrics
    from doseai.resample import resample_to

    preference = DosePredictor(device=device, threads=threads)
    ct_case = load_case(path)
    start = time.perf_counter()
    preference.set_case(ct_case)
    ct_dose = preference.predict()
    ct_new_case_s = time.perf_counter() - start
    start = time.perf_counter()
    preference.predict(0.5, -0.3)
    ct_slider_s = time.perf_counter() - start
    ct_metrics = case_metrics(ct_case, ct_dose)
    grid_case = on_dose_grid(ct_case, dose_grid_mm)
    preference.set_case(grid_case)
    grid_dose = preference.predict()
    grid_metrics = case_metrics(grid_case, grid_dose)
    body = ct_case.structures["External"]
    on_ct = resample_to(grid_dose, grid_case.geometry, ct_case.geometry)
    rows = {}
    for name, values in grid_metrics.items():
        if name in ct_metrics:
            rows[name] = {key: values[key] - ct_metrics[name][key] for key in ("D95", "Dmean")
                          if values.get(key) is not None and ct_metrics[name].get(key) is not None}
    return {"ct_grid_new_case_s": ct_new_case_s, "ct_grid_slider_change_s": ct_slider_s,
            "mean_abs_difference_in_body_gy": float(np.abs(on_ct - ct_dose)[body].mean()),
            "metric_difference_gy (dose grid - CT grid)": rows}


def measure_openkbp(limit: int, device: str, threads: int) -> dict | None:
    """Slider change, DVH edit and new case on the OpenKBP validation patients with a CT (the CT is their own
    dose grid): the same steps as a clinical case."""
    from doseai.dose_grid import on_dose_grid
    from doseai.io import openkbp
    from doseai.paths import openkbp_root
    from doseai.predict import DosePredictor, DVHDosePredictor
    from doseai.report import case_dvhs, case_metrics
    from doseai.train.train_dvh import one_curve_edit

    root = openkbp_root() / "validation" / "128"
    if not root.is_dir():
        return None
    preference = DosePredictor(device=device, threads=threads)
    dvh_model = DVHDosePredictor(device=device, threads=threads)
    new_case, slider, edit, box = [], [], [], []
    patients = 0
    for path in openkbp.list_patients(root).values():
        if patients >= limit:
            break
        case = openkbp.load_patient(path)
        if case.ct is None:
            continue
        patients += 1
        start = time.perf_counter()
        case = on_dose_grid(case)
        preference.set_case(case)
        neutral = preference.predict()
        case_dvhs(case, neutral), case_metrics(case, neutral)
        new_case.append(time.perf_counter() - start)
        box.append(_box_share(preference))
        for values in ((0.5, -0.3), (-0.6, 0.4)):
            start = time.perf_counter()
            dose = preference.predict(*values)
            case_dvhs(case, dose), case_metrics(case, dose)
            slider.append(time.perf_counter() - start)
        dvh_model.set_case(case)
        vector = dvh_model.dvh_vector(neutral)
        dvh_model.predict_edit(neutral, one_curve_edit(dvh_model, vector, "Parotid_L", 0.8)[0])  # start's network
        desired, _ = one_curve_edit(dvh_model, vector, "Larynx", 0.8)
        start = time.perf_counter()
        dose = dvh_model.predict_edit(neutral, desired)
        case_dvhs(case, dose), case_metrics(case, dose)
        edit.append(time.perf_counter() - start)
    return {"patients": patients, "new_case_s_median": statistics.median(new_case),
            "slider_change_s_median": statistics.median(slider), "dvh_edit_s_median": statistics.median(edit),
            "refinement_box_share_median": statistics.median(box), "peak_memory_gb": _peak_gb()}


def _child(args) -> int:
    """Run one measurement in this (fresh) process and print its JSON on the last line."""
    if args.child == "openkbp":
        result = measure_openkbp(args.openkbp_limit, args.device, args.threads)
    elif args.child.startswith("ct-grid:"):
        result = compare_with_ct_grid(args.child[8:], args.dose_grid, args.device, args.threads)
    else:
        result = measure_case(args.child, args.dose_grid, args.device, args.threads)
    print(json.dumps(result))
    return 0


def _in_fresh_process(args, what: str) -> dict | None:
    command = [sys.executable, __file__, "--child", what, "--device", args.device, "--threads", str(args.threads),
               "--dose-grid", str(args.dose_grid), "--openkbp-limit", str(args.openkbp_limit)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{what}: the measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _row(name: str, r: dict) -> str:
    grid = " x ".join(map(str, r["dose_grid_shape_zyx"][::-1]))
    display = "n/a" if r["display_s"] is None else f"{r['display_s']:.3f}"
    return (f"{name:22s} {grid:>13s} {r['new_case_s']:8.2f} {r['slider_change_s']['median']:7.3f} "
            f"{r['slider_change_s']['max']:7.3f} {r['dvh_edit_s']['median']:7.3f} {r['metrics_s']:7.3f} "
            f"{display:>7s} {r['peak_memory_gb']:6.2f} {r['read_s']:6.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="*", default=list(CLINICAL_CASES), choices=list(CLINICAL_CASES))
    parser.add_argument("--openkbp-limit", type=int, default=10, help="validation patients with a CT (0: none)")
    parser.add_argument("--ct-grid", action="store_true", help="also the first case on its CT grid, for comparison")
    parser.add_argument("--dose-grid", type=float, default=2.5, help="dose grid spacing in mm (default %(default)s)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="bench_clinical_size.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)

    results = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                           "device": args.device, "threads": args.threads}, "bars": BARS, "cases": {}}
    for name in args.cases:
        results["cases"][name] = _in_fresh_process(args, str(clinical_case_folder(name)))
    if args.ct_grid and args.cases:
        results["ct_grid_comparison"] = _in_fresh_process(args, "ct-grid:" + str(clinical_case_folder(args.cases[0])))
    if args.openkbp_limit:
        results["openkbp_validation"] = _in_fresh_process(args, "openkbp")

    print(f"\n{'case':22s} {'dose grid':>13s} {'new case':>8s} {'slider':>7s} {'(max)':>7s} {'DVH edit':>7s} "
          f"{'metrics':>7s} {'display':>7s} {'peak GB':>6s} {'read s':>6s}")
    for name, r in results["cases"].items():
        print(_row(name, r))
    first = results["cases"].get("phantom_513x513x256")
    if first:
        checks = {"slider_change_s": first["slider_change_s"]["median"], "dvh_edit_s": first["dvh_edit_s"]["median"],
                  "new_case_s": first["new_case_s"], "peak_memory_gb": first["peak_memory_gb"]}
        results["bars_met"] = {key: value <= BARS[key] for key, value in checks.items()}
        print("bars (513 x 513 x 256): " + ", ".join(f"{key} {checks[key]:.3g} <= {BARS[key]:g}: "
                                                      f"{'met' if ok else 'MISSED'}"
                                                      for key, ok in results["bars_met"].items()))
    comparison = results.get("ct_grid_comparison")
    if comparison:
        print(f"CT grid (before): new case {comparison['ct_grid_new_case_s']:.2f} s, slider change "
              f"{comparison['ct_grid_slider_change_s']:.2f} s; dose grid vs CT grid: mean |difference| in the body "
              f"{comparison['mean_abs_difference_in_body_gy']:.3f} Gy")
        for name, row in comparison["metric_difference_gy (dose grid - CT grid)"].items():
            print(f"  {name:12s} " + "  ".join(f"{key} {value:+.2f} Gy" for key, value in row.items()))
    openkbp_result = results.get("openkbp_validation")
    if openkbp_result:
        print(f"OpenKBP validation ({openkbp_result['patients']} patients with a CT, the CT its own dose grid): new "
              f"case {openkbp_result['new_case_s_median']:.2f} s, slider change "
              f"{openkbp_result['slider_change_s_median']:.3f} s, DVH edit {openkbp_result['dvh_edit_s_median']:.3f} s"
              f" (medians), refinement box {openkbp_result['refinement_box_share_median']:.0%} of the model grid")
    elif args.openkbp_limit:
        print("OpenKBP validation: skipped (no ../shared/data/openkbp/validation/128)")
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
