"""Side-by-side of the two dose engines on pyRadPlan's bundled TG-119 phantom (C-shape target, core OAR).

  pyRadPlan  SVD pencil beam (matRad's algorithm), generic 6 MV machine: influence matrix, then doses
  PyDoseRT   pencil-beam convolution, 10 MV preset ('varian_10MV'), and the same preset with its kernel's
             beam quality set to a 6 MV-like TPR20,10 (0.67) -- the closest PyDoseRT gets to 6 MV

Same 9 coplanar beams (0, 40, ..., 320 deg, isocentre at the target centroid), 5 mm bixels, the same
bixels (pyRadPlan's) with unit weight, the same 5 mm working grid. For each single beam and for the
9-beam uniform-fluence plan: 3%/3 mm global gamma (pymedphys; reference pyRadPlan, 3% of its maximum,
points at or above 10% of that maximum), and the mean |difference| there. Doses are normalised to
their mean in the target first: the engines' absolute calibrations differ (pyRadPlan: its dose per
unit weight; PyDoseRT: uncalibrated), so only shapes are compared.

Prints a table and writes JSON. Run:
    python Testing/benchmarks/bench_engines.py [--json PATH] [--threads N] [--spacing MM] [--no-gamma]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from doseai.case import PlanningCase
from doseai.engine import PyDoseRTEngine, PyRadPlanEngine, default_beams
from doseai.engine.pydosert_engine import TPR_20_10_6MV
from doseai.geometry import ImageGeometry

GAMMA = {"dose_percent_threshold": 3.0, "distance_mm_threshold": 3.0, "lower_percent_dose_cutoff": 10.0}


def tg119_case() -> PlanningCase:
    """pyRadPlan's TG-119 phantom as a PlanningCase: 'PTV' (OuterTarget, 50 Gy), 'Core', 'External' (BODY)."""
    import SimpleITK as sitk
    from pyRadPlan import load_tg119

    ct, cst = load_tg119()
    geometry = ImageGeometry.from_sitk(ct.cube_hu)
    names = {"OuterTarget": "PTV", "Core": "Core", "BODY": "External"}
    structures = {names[v.name]: sitk.GetArrayFromImage(v.mask).astype(bool) for v in cst.vois if v.name in names}
    return PlanningCase(geometry, ct=sitk.GetArrayFromImage(ct.cube_hu).astype(np.float32), structures=structures,
                        prescriptions={"PTV": 50.0}, patient_id="TG119")


def gamma_pass(reference: np.ndarray, evaluation: np.ndarray, spacing_xyz) -> dict:
    """3%/3 mm global gamma of ``evaluation`` against ``reference`` (same grid) with pymedphys."""
    import pymedphys

    axes = tuple(np.arange(n) * s for n, s in zip(reference.shape, spacing_xyz[::-1]))  # (z, y, x) mm
    gamma = pymedphys.gamma(axes, reference, axes, evaluation, **GAMMA, max_gamma=1.5)  # 1.5: search no further
    region = reference >= GAMMA["lower_percent_dose_cutoff"] / 100 * reference.max()
    with np.errstate(invalid="ignore"):
        passed = gamma[region] <= 1.0  # a point pymedphys left undefined (NaN) counts as failed
    return {"pass_rate": float(np.mean(passed)), "points": int(region.sum()),
            "undefined_points": int(np.isnan(gamma[region]).sum())}


def central_axis(dose: np.ndarray, geometry: ImageGeometry, isocenter, body: np.ndarray) -> dict:
    """Beam at gantry 0 (runs along +y): depth of the maximum on the axis through the isocentre, dose 100 mm
    deeper relative to it, and the 80%-20% lateral penumbra (along x, mean of both sides) at the isocentre."""
    k, j, i = np.rint(geometry.physical_to_index(np.asarray([isocenter]))[0]).astype(int)
    sy, sx = geometry.spacing[1], geometry.spacing[0]
    entry = int(np.flatnonzero(body[k, :, i])[0])
    axis = dose[k, entry:, i]
    peak = int(np.argmax(axis))
    deeper = peak + int(round(100 / sy))
    profile = dose[k, j, :] / dose[k, j, i]

    def edge(values, level):  # first crossing of ``level`` walking out from the axis, in voxels
        n = int(np.flatnonzero(values < level)[0])
        return n - 1 + (values[n - 1] - level) / (values[n - 1] - values[n])

    sides = [profile[i:], profile[i::-1]]
    penumbra = np.mean([edge(v, 0.2) - edge(v, 0.8) for v in sides]) * sx
    return {"dmax_depth_mm": (peak + 0.5) * sy, "dose_dmax_plus_100mm_rel": float(axis[deeper] / axis[peak])
            if deeper < len(axis) else None, "penumbra_80_20_mm": float(penumbra)}


def compare(reference: np.ndarray, evaluation: np.ndarray, ptv: np.ndarray, spacing_xyz, gamma: bool) -> dict:
    ref = reference / reference[ptv].mean()
    ev = evaluation / evaluation[ptv].mean()
    region = ref >= GAMMA["lower_percent_dose_cutoff"] / 100 * ref.max()
    out = {"mean_abs_diff_pct_of_max": float(100 * np.abs(ref - ev)[region].mean() / ref.max()),
           "max_ratio_eval_to_ref": float(ev.max() / ref.max())}
    if gamma:
        out["gamma"] = gamma_pass(ref, ev, spacing_xyz)
    return out


def run(spacing: float, threads: int | None, gamma: bool) -> dict:
    if threads:
        torch.set_num_threads(threads)
        try:
            import numba

            numba.set_num_threads(threads)
        except ImportError:
            pass
    case = tg119_case()
    beams = default_beams(case, n_beams=9, bixel_width_mm=5.0, energy_mv=6.0)

    engine = PyRadPlanEngine(working_spacing_mm=spacing)
    influence = engine.compute(case, beams, progress=False)
    work = engine.working_case(case)
    work_ptv, work_body = work.structures["PTV"], work.structures["External"]
    n_beams = len(beams.gantry_angles_deg)
    start = time.perf_counter()
    reference = [influence.dose_image((influence.bixel_beam == b).astype(np.float32)) for b in range(n_beams)]
    reference.append(influence.dose_image(np.ones(influence.n_bixels, np.float32)))
    matrix_s = time.perf_counter() - start
    axis = central_axis(reference[0], influence.geometry, beams.isocenter_lps_mm, work_body)  # beam 0: gantry 0
    pyradplan = {"card": engine.card(), "timings_s": dict(influence.timings_s), "central_axis_beam0": axis,
                 "doses_from_matrix_s": matrix_s, "n_bixels": influence.n_bixels,
                 "nnz": int(influence.matrix._nnz()), "grid": list(influence.geometry.shape)}

    labels = [f"beam {g:g}" for g in beams.gantry_angles_deg] + ["9-beam plan"]
    variants = {"pydosert_10MV": PyDoseRTEngine(working_spacing_mm=spacing),
                "pydosert_tpr0.67": PyDoseRTEngine(working_spacing_mm=spacing, tpr_20_10=TPR_20_10_6MV)}
    results = {}
    for key, other in variants.items():
        start = time.perf_counter()
        model = other.prepare(case, beams, influence.bixel_beam, influence.bixel_position_mm)
        prepare_s = time.perf_counter() - start
        ones = torch.ones(model.n_bixels)
        doses, beam_s = [], []
        with torch.no_grad():
            for b in range(n_beams):
                start = time.perf_counter()
                doses.append(model.beam_dose(b, ones).numpy())
                beam_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            doses.append(model.forward(ones).numpy())
            plan_s = time.perf_counter() - start
        rows = {label: compare(ref, ev, work_ptv, influence.geometry.spacing, gamma)
                for label, ref, ev in zip(labels, reference, doses)}
        results[key] = {"card": other.card(), "prepare_s": prepare_s, "beam_forward_s_median": float(np.median(beam_s)),
                        "plan_forward_s": plan_s, "rows": rows,
                        "central_axis_beam0": central_axis(doses[0], influence.geometry, beams.isocenter_lps_mm,
                                                           work_body)}
    return {"phantom": "TG-119 (pyRadPlan bundled)", "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "working_spacing_mm": spacing,
            "beams": {"gantry_deg": list(beams.gantry_angles_deg), "isocenter_lps_mm": list(beams.isocenter_lps_mm),
                      "bixel_width_mm": beams.bixel_width_mm},
            "normalisation": "each dose divided by its mean in the target (PTV) before comparing",
            "gamma": GAMMA | {"reference": "pyRadPlan", "global": "3% of the reference maximum",
                              "tool": "pymedphys.gamma (interp_fraction 10, max_gamma 1.5)"} if gamma else None,
            "pyradplan": pyradplan, "pydosert": results, "labels": labels}


def print_table(result: dict) -> None:
    p = result["pyradplan"]
    t = p["timings_s"]
    print(f"TG-119, working grid {p['grid']} (z, y, x) at {result['working_spacing_mm']} mm, {p['n_bixels']} bixels, "
          f"{result['threads']} torch thread(s)")
    print(f"pyRadPlan 6 MV: stf {t['stf_s']:.1f} s, influence matrix {t['dij_s']:.1f} s ({p['nnz'] / 1e6:.1f} M "
          f"non-zeros), to torch {t['convert_s']:.1f} s; 10 doses from the matrix {p['doses_from_matrix_s']:.2f} s")
    for key, r in result["pydosert"].items():
        print(f"{key}: set-up {r['prepare_s']:.1f} s, one beam {r['beam_forward_s_median']:.2f} s (median), "
              f"9-beam plan {r['plan_forward_s']:.2f} s")
    print("beam 0 central axis: depth of maximum / dose 100 mm deeper (rel.) / 80-20% penumbra at isocentre")
    for key, axis in [("pyradplan_6MV", p["central_axis_beam0"])] + [
            (k, r["central_axis_beam0"]) for k, r in result["pydosert"].items()]:
        print(f"  {key:<18} {axis['dmax_depth_mm']:5.1f} mm / {axis['dose_dmax_plus_100mm_rel']:.3f} / "
              f"{axis['penumbra_80_20_mm']:.1f} mm")
    keys = list(result["pydosert"])
    gamma = result["gamma"] is not None
    head = "".join(f" | {k + (' gamma' if gamma else ''):>24} | {'mean|d|%':>8}" for k in keys)
    print(f"{'dose':<13}{head}")
    for label in result["labels"]:
        line = f"{label:<13}"
        for k in keys:
            row = result["pydosert"][k]["rows"][label]
            g = f"{100 * row['gamma']['pass_rate']:.1f}%" if gamma else "-"
            line += f" | {g:>24} | {row['mean_abs_diff_pct_of_max']:>8.2f}"
        print(line)
    print("gamma: 3%/3 mm global (3% of the pyRadPlan maximum), points >= 10% of it; mean|d|%: mean absolute "
          "difference there, % of the maximum; both doses normalised to their mean in the PTV")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="benchmark-results/engines.json")
    parser.add_argument("--spacing", type=float, default=5.0, help="working-grid spacing in mm")
    parser.add_argument("--threads", type=int, help="torch and numba threads")
    parser.add_argument("--no-gamma", action="store_true", help="skip the gamma analysis (the slow part)")
    args = parser.parse_args()
    result = run(args.spacing, args.threads, not args.no_gamma)
    print_table(result)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
