"""Benchmark: doseai's fluence optimizer against pyRadPlan's on pyRadPlan's TG-119 phantom.

One influence matrix (pyRadPlan 0.5 photon pencil beam: 9 equispaced coplanar beams, 5 mm bixels, 6 MV
generic machine, 5 mm dose grid) is computed once. pyRadPlan's own ``fluence_optimization`` (non-linear
fluence problem, scipy L-BFGS-B, its default tolerances, start at w = 0) and ``doseai.optimize``
(``optimize_fluence`` with its defaults, start at uniform weights) then optimize the same objectives -
TG-119's own, as stored in the phantom's structure set - on the same matrix. Both final weight vectors
are evaluated with one objective function (doseai's FluenceObjective, with pyRadPlan's objective classes
as a cross-check that the definitions agree). Bar: same or better objective, >= 3x faster.

Prints a table and writes JSON. Run:
    python Testing/benchmarks/bench_optimizer.py [--out PATH] [--threads 1] [--repeats 1]
--threads limits torch, BLAS and OpenMP threads for both optimizers (set before numpy is imported);
scipy's sparse products, which pyRadPlan uses, are single-threaded either way.
"""

from __future__ import annotations

import argparse
import os


def _parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", "--json", dest="out", default="benchmark-results/optimizer.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="run both optimizers N times (alternating); medians")
    parser.add_argument("--beams", type=int, default=9)
    parser.add_argument("--bixel-mm", type=float, default=5.0)
    parser.add_argument("--max-iterations", type=int, default=500)
    parser.add_argument("--tolerance", type=float, default=None, help="doseai stopping tolerance (default: its own)")
    parser.add_argument("--device", default="cpu", help="torch device for doseai (cpu, cuda)")
    parser.add_argument("--solver", default="lbfgsb", choices=("lbfgsb", "adam"))
    return parser.parse_args()


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(ARGS.threads)

import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import torch  # noqa: E402

from doseai.engine.influence import BeamSet, DoseInfluence  # noqa: E402
from doseai.geometry import ImageGeometry  # noqa: E402
from doseai.optimize import (  # noqa: E402
    FluenceObjective, MaxDVH, MeanDose, MinDVH, SquaredDeviation, SquaredOverdose, SquaredUnderdose, optimize_fluence,
)


def _our_term(objective, structure: str, voxels: np.ndarray):
    """doseai's term with pyRadPlan's definition of ``objective`` (a pyRadPlan Objective)."""
    index = torch.from_numpy(voxels.astype(np.int64))
    name, priority = objective.name, float(objective.priority)
    if name == "Squared Overdosing":
        return SquaredOverdose(structure, index, priority, dose_gy=objective.d_max)
    if name == "Squared Underdosing":
        return SquaredUnderdose(structure, index, priority, dose_gy=objective.d_min)
    if name == "Squared Deviation":
        return SquaredDeviation(structure, index, priority, dose_gy=objective.d_ref)
    if name == "Max DVH":
        return MaxDVH(structure, index, priority, dose_gy=objective.d, volume_pct=objective.v_max)
    if name == "Min DVH":
        return MinDVH(structure, index, priority, dose_gy=objective.d, volume_pct=objective.v_min)
    if name == "Mean Dose" and objective.f_diff == "quadratic":
        return MeanDose(structure, index, priority, dose_gy=objective.d_ref, two_sided=True)
    raise NotImplementedError(f"no doseai equivalent of pyRadPlan objective {name!r} in this benchmark")


def _pyradplan_objective(objectives, matrix: sp.csr_matrix, weights: np.ndarray) -> float:
    """pyRadPlan's own objective classes on the dose D w (float32, as its optimizer computes it)."""
    dose = matrix @ np.asarray(weights, np.float32)
    return float(sum(obj.priority * float(obj.compute_objective(dose[voxels])) for obj, voxels in objectives))


def run(args) -> dict:
    logging.getLogger("pyRadPlan").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    from pyRadPlan import PhotonPlan, calc_dose_influence, fluence_optimization, generate_stf, load_tg119
    from pyRadPlan.optimization.objectives import get_objective

    ct, cst = load_tg119()
    pln = PhotonPlan(machine="Generic")
    angles = np.linspace(0.0, 360.0, args.beams, endpoint=False)
    pln.prop_stf = {"gantry_angles": angles.tolist(), "couch_angles": [0.0] * args.beams,
                    "bixel_width": args.bixel_mm}
    pln.prop_opt = {"solver": "scipy"}  # pyRadPlan's fallback when ipopt is absent, named so it does not warn
    stf = generate_stf(ct, cst, pln)
    start = time.perf_counter()
    dij = calc_dose_influence(ct, cst, stf, pln)
    influence_seconds = time.perf_counter() - start

    # the matrix as doseai sees it: float32 CSR, int32 indices, rows = pyRadPlan's dose-grid voxel order
    start = time.perf_counter()
    matrix = sp.csr_matrix(dij.physical_dose.flat[0], dtype=np.float32)
    matrix.sort_indices()
    tensor = torch.sparse_csr_tensor(torch.from_numpy(matrix.indptr.astype(np.int32)),
                                     torch.from_numpy(matrix.indices.astype(np.int32)),
                                     torch.from_numpy(matrix.data), size=matrix.shape).to(args.device)
    dims = tuple(int(n) for n in dij.dose_grid.dimensions)  # x, y, z
    res = dij.dose_grid.resolution
    geometry = ImageGeometry(shape=(dims[2], dims[1], dims[0]), spacing=(res["x"], res["y"], res["z"]))
    beam_of, position = [], []
    for b, beam in enumerate(stf.beams):
        for ray in beam.rays:
            beam_of.append(b)
            position.append(np.asarray(ray.ray_pos_bev, dtype=float)[[0, 2]])
    influence = DoseInfluence(tensor, geometry, BeamSet(tuple(angles.tolist()), (0.0, 0.0, 0.0),
                                                        bixel_width_mm=args.bixel_mm),
                              np.asarray(beam_of), np.asarray(position), engine="pyRadPlan (photon pencil beam)")
    convert_seconds = time.perf_counter() - start

    # TG-119's objectives on the dose grid, prepared as pyRadPlan's planning problem does (overlap priorities
    # applied, structures resampled to the dose grid); voxel indices are rows of the matrix
    ct_dose = ct.resample_to_grid(dij.dose_grid)
    cst_dose = cst.apply_overlap_priorities().resample_on_new_ct(ct_dose)
    terms, reference = [], []
    for voi in cst_dose.vois:
        voxels = np.unique(np.asarray(voi.indices_numpy, dtype=np.int64))
        for objective in voi.objectives or []:
            objective = get_objective(objective)
            terms.append(_our_term(objective, voi.name, voxels))
            reference.append((objective, voxels))
    evaluator = FluenceObjective(influence, terms)

    ours_kwargs = {"max_iterations": args.max_iterations, "threads": args.threads, "solver": args.solver}
    if args.tolerance is not None:
        ours_kwargs["tolerance"] = args.tolerance
    prp_runs, our_runs = [], []
    for _ in range(args.repeats):
        info: dict = {}
        start = time.perf_counter()
        w_prp = fluence_optimization(ct, cst, stf, dij, pln, opt_info=info)
        prp_runs.append({"seconds": time.perf_counter() - start, "weights": np.asarray(w_prp, np.float32),
                         "iterations": int(info.get("num_iter", -1)),
                         "evaluations": len(info.get("obj_history", [])),
                         "stop": str(info.get("result_info", {}).get("message", ""))})
        result = optimize_fluence(influence, terms, progress=sys.stderr.isatty(), **ours_kwargs)
        our_runs.append(result)

    prp = prp_runs[int(np.argsort([r["seconds"] for r in prp_runs])[len(prp_runs) // 2])]
    ours = our_runs[int(np.argsort([r.seconds for r in our_runs])[len(our_runs) // 2])]
    prp_value = evaluator.value(prp["weights"])
    our_value = evaluator.value(ours.weights)
    prp_value_theirs = _pyradplan_objective(reference, matrix, prp["weights"])
    our_value_theirs = _pyradplan_objective(reference, matrix, ours.weights)
    reached = [t for f, t in zip(ours.objective_history, ours.history_seconds) if f <= prp_value]
    reached_iteration = next((i for i, f in enumerate(ours.objective_history) if f <= prp_value), None)

    def metrics(weights):
        dose = matrix @ weights
        out = {}
        for term in terms:
            values = dose[term.voxels.numpy()]
            out[term.structure] = {"mean_gy": float(values.mean()), "max_gy": float(values.max()),
                                   "D95_gy": float(np.percentile(values, 5)), "D5_gy": float(np.percentile(values, 95))}
        return out

    return {
        "machine": platform.processor() or platform.machine(), "threads": args.threads, "device": args.device,
        "torch": torch.__version__, "problem": {
            "phantom": "TG-119 (pyRadPlan bundled)", "beams": args.beams, "bixel_mm": args.bixel_mm,
            "voxels": int(matrix.shape[0]), "bixels": int(matrix.shape[1]), "nonzeros": int(matrix.nnz),
            "objective_rows": int(evaluator.rows.numel()),
            "objectives": [t.label + f" (priority {t.priority:g}, {t.n_voxels} voxels)" for t in terms]},
        "influence_matrix_seconds": influence_seconds, "conversion_seconds": convert_seconds,
        "pyradplan": {"objective": prp_value, "objective_pyradplan_eval": prp_value_theirs,
                      "iterations": prp["iterations"], "evaluations": prp["evaluations"], "seconds": prp["seconds"],
                      "all_seconds": [r["seconds"] for r in prp_runs], "stop": prp["stop"],
                      "metrics": metrics(prp["weights"])},
        "doseai": {"objective": our_value, "objective_pyradplan_eval": our_value_theirs,
                   "iterations": ours.iterations, "evaluations": ours.evaluations, "seconds": ours.seconds,
                   "all_seconds": [r.seconds for r in our_runs], "stop": ours.stop_reason,
                   "timings_s": ours.timings_s, "work_fraction": ours.work_fraction, "solver": ours.solver,
                   "seconds_to_pyradplan_objective": reached[0] if reached else None,
                   "iterations_to_pyradplan_objective": reached_iteration,
                   "metrics": metrics(ours.weights)},
        "time_ratio": prp["seconds"] / ours.seconds,
        "time_ratio_to_same_objective": prp["seconds"] / reached[0] if reached else None,
        "objective_relative_difference": (our_value - prp_value) / prp_value,
        "evaluators_agree_relative": max(abs(prp_value - prp_value_theirs) / prp_value,
                                         abs(our_value - our_value_theirs) / our_value),
    }


def print_table(r: dict) -> None:
    p, o = r["pyradplan"], r["doseai"]
    print(f"TG-119, {r['problem']['beams']} beams, {r['problem']['bixels']} bixels, {r['problem']['voxels']} voxels, "
          f"{r['problem']['nonzeros'] / 1e6:.1f}M non-zeros; influence matrix {r['influence_matrix_seconds']:.1f} s; "
          f"{r['threads']} thread(s), doseai on {r['device']}")
    print(f"{'optimizer':<34}{'objective':>11}{'iterations':>12}{'evaluations':>13}{'time [s]':>10}{'ratio':>8}")
    print(f"{'pyRadPlan 0.5 (scipy L-BFGS-B)':<34}{p['objective']:>11.3f}{p['iterations']:>12}{p['evaluations']:>13}"
          f"{p['seconds']:>10.2f}{1.0:>8.2f}")
    print(f"{'doseai (' + o['solver'] + ', until its stop rule)':<34}{o['objective']:>11.3f}{o['iterations']:>12}"
          f"{o['evaluations']:>13}{o['seconds']:>10.2f}{r['time_ratio']:>8.2f}")
    if o["seconds_to_pyradplan_objective"] is not None:
        print(f"{'doseai, first reaching pyRadPlan':<34}{p['objective']:>11.3f}"
              f"{o['iterations_to_pyradplan_objective']:>12}{'':>13}{o['seconds_to_pyradplan_objective']:>10.2f}"
              f"{r['time_ratio_to_same_objective']:>8.2f}")
    print(f"objective: doseai - pyRadPlan = {100 * r['objective_relative_difference']:+.2f}%; the two objective "
          f"implementations agree to {r['evaluators_agree_relative']:.1e} (relative); doseai stop: {o['stop']}; "
          f"setup {o['timings_s']['setup']:.2f} s, work fraction after screening {o['work_fraction']:.2f}")


def main() -> None:
    result = run(ARGS)
    print_table(result)
    out = Path(ARGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
