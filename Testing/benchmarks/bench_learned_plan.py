"""Learned planning against L-BFGS-B and Adam on the OpenKBP validation split (issue 29), all on the same
influence matrices: the 9-beam, 10 mm plans of the fluence set (``doseai train fluence-set --split validation
--with-ct-less --keep-influence DIR``; the 7 patients without a CT on water).

For each patient and each desired dose (the clinical reference, and the shipped preference model's predicted
dose at neutral sliders), every optimizer plans toward it: L-BFGS-B and Adam with their 300 iterations and the
learned optimizer with its trained number of steps from the uniform start; the uniform start itself and the fluence
generator alone (one step, and its undistilled teacher by DDIM; both times the best global factor); and the generator's weights refined by the learned optimizer and by
L-BFGS-B (their optimizer time includes the generator's). Printed and written as JSON: the objective against
iterations and seconds, the final objective over L-BFGS-B's (300 iterations, uniform start), the first iteration
at which each is within 1 % of it, the plan's dose score / DVH score against the clinical dose, the fluence's
total variation per beam (mean |difference| of neighbouring bixels over the mean weight), and the time split
(engine from the set's generation; generator, refinement and optimizer measured here; the total: prediction for the
predicted dose, engine and optimizer). Run:
    python Testing/benchmarks/bench_learned_plan.py --influence DIR [--network CKPT] [--generator PT|none] [--limit N]
        [--json PATH]
    python Testing/benchmarks/bench_learned_plan.py --summarise PATH   # the table of an earlier run again
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

DEFAULT_SET = Path(__file__).resolve().parents[2] / "data" / "fluence_set" / "mimic_10mm" / "validation"


def total_variation(influence, weights: np.ndarray) -> float:
    """Mean over beams of the mean |difference| of neighbouring bixels (4-neighbourhood) over the mean weight."""
    from doseai.optimize.fluence_setup import neighbour_pairs

    pairs = neighbour_pairs(influence.bixel_beam, influence.bixel_position_mm, influence.beams.bixel_width_mm)
    scale = float(weights.mean()) or 1.0
    per_beam = []
    for beam in np.unique(influence.bixel_beam):
        own = pairs[influence.bixel_beam[pairs[:, 0]] == beam]
        if len(own):
            per_beam.append(float(np.abs(weights[own[:, 0]] - weights[own[:, 1]]).mean()) / scale)
    return float(np.mean(per_beam)) if per_beam else 0.0


def _network(path: str | None):
    from doseai.models.learned_optimizer import LearnedFluenceOptimizer
    from doseai.optimize.learned import load_learned_optimizer
    from doseai.safe_load import load_checkpoint

    if path == "untrained":  # the ablation: heavy-ball on the damped Jacobi step, as the network starts
        return LearnedFluenceOptimizer().eval(), 30, "untrained (heavy-ball Jacobi, step 1, momentum 0.8)"
    if path is None or not path.endswith("last.pt"):
        network, card = load_learned_optimizer(Path(path) if path else None)
        return network, int(card["steps"]), str(path or "shipped")
    state = load_checkpoint(path, ("model", "network", "steps"))
    network = LearnedFluenceOptimizer(**state["network"])
    network.load_state_dict(state["model"])
    return network.eval(), int(state["steps"]), f"{path} (epoch {state['epoch'] + 1})"


def _scores(case, work, influence, weights) -> dict:
    from doseai.optimize.plan import case_dose
    from doseai.scoring import score_patient

    score = score_patient(case, case_dose(influence.dose_image(weights), work, case))
    return {"dose_score_gy": score.dose_score,
            "dvh_score_gy": float(np.mean(list(score.dvh_errors.values()))) if score.dvh_errors else None,
            "total_variation": total_variation(influence, np.asarray(weights))}


def plan_one(case, work, terms, settings, influence, solver: str, iterations: int, network,
             initial=None) -> dict:
    """One optimizer's plan toward ``terms`` (of ``plan_terms`` on the working case ``work``) from ``initial``
    (default: uniform), scored."""
    from doseai.optimize.fluence import optimize_fluence
    from doseai.optimize.plan import top_target

    prescription_gy, target_voxels = top_target(case, work)
    fluence = optimize_fluence(influence, terms, max_iterations=iterations, tolerance=0.0 if solver != "lbfgsb"
                               else settings.tolerance, solver=solver, progress=False,
                               prescription_gy=prescription_gy, target_voxels=target_voxels,
                               learned_network=network, initial_weights=initial)
    return {"objective_history": fluence.objective_history, "history_seconds": fluence.history_seconds,
            "objective": fluence.objective, "optimize_s": fluence.timings_s["solve"],
            "setup_s": fluence.timings_s["setup"], "iterations": fluence.iterations,
            **_scores(case, work, influence, fluence.weights)}


def generated(case, work, terms, influence, generator, sampler: str) -> tuple[dict, object]:
    """The generator's weights alone (no optimization), scored, and the weights (for the refinement)."""
    from doseai.optimize.fluence import FluenceObjective
    from doseai.optimize.fluence_setup import uniform_initial_weights
    from doseai.optimize.generator import generate_weights
    from doseai.optimize.plan import top_target

    uniform = float(uniform_initial_weights(influence, terms, *top_target(case, work))[0])
    start = time.perf_counter()
    weights = generate_weights(influence, terms, case.prescriptions, uniform, generator, sampler=sampler)
    seconds = time.perf_counter() - start
    value = float(FluenceObjective(influence, terms, weight_scale=uniform).value(weights))
    return {"objective_history": [value], "history_seconds": [seconds], "objective": value, "optimize_s": seconds,
            "generate_s": seconds, "iterations": 0, **_scores(case, work, influence, weights.numpy())}, weights


def plan_problem_uniform(case, work, terms, influence):
    """The uniform start every solver begins from."""
    from doseai.optimize.fluence_setup import uniform_initial_weights
    from doseai.optimize.plan import top_target

    return uniform_initial_weights(influence, terms, *top_target(case, work))


OPTIMIZERS = ("uniform", "lbfgsb", "adam", "learned", "generator", "generator_ddim", "generator+learned", "generator+lbfgsb")


def _within(history: list[float], goal: float) -> int | None:
    hits = [i for i, value in enumerate(history) if value <= goal]
    return hits[0] if hits else None


def run(args) -> dict:
    import torch

    from doseai.io import openkbp
    from doseai.optimize.plan import make_engine, plan_terms
    from doseai.paths import openkbp_root
    from doseai.predict import DosePredictor
    from doseai.train.fluence_set import load_fluence_set, load_influence

    torch.set_num_threads(args.threads)
    settings, records = load_fluence_set(Path(args.fluence_set))
    network, steps, network_name = _network(args.network)
    generator = None
    if args.generator != "none":
        from doseai.optimize.generator import load_fluence_generator

        generator = load_fluence_generator(Path(args.generator) if args.generator else None)
    predictor = DosePredictor(threads=args.threads)
    paths = openkbp.list_patients(openkbp_root() / "validation")
    results = {"settings": {"bixel_width_mm": settings.bixel_width_mm, "beams": settings.n_beams,
                            "iterations": args.iterations, "learned_steps": steps, "network": network_name,
                            "threads": args.threads, "machine": platform.processor() or platform.machine(),
                            "generator": args.generator or "shipped"}, "patients": {}}
    for pid in list(records)[:args.limit]:
        record, case = records[pid], openkbp.load_npz(paths[pid])
        influence = load_influence(Path(args.influence) / f"{pid}.npz", case, record, settings)
        predictor.set_case(case)
        start = time.perf_counter()
        predicted = predictor.predict()
        predict_s = time.perf_counter() - start
        entry = {"on_water": bool(record.get("on_water", False)), "engine_s": float(record["engine_s"]),
                 "predict_s": predict_s}
        work = make_engine(settings).working_case(case)  # once per patient: the optimizers share it
        for source, desired in (("clinical", case.dose), ("predicted", predicted)):
            terms, _ = plan_terms(case, desired, settings, work)
            runs = {name: plan_one(case, work, terms, settings, influence, name, count, model)
                    for name, count, model in (("lbfgsb", args.iterations, None), ("adam", args.iterations, None),
                                               ("learned", steps, network))}
            first = runs["lbfgsb"]  # every solver starts from the same uniform weights: the baseline of a start
            runs["uniform"] = {"objective_history": first["objective_history"][:1], "history_seconds": [0.0],
                               "objective": first["objective_history"][0], "optimize_s": 0.0, "iterations": 0,
                               **_scores(case, work, influence, np.asarray(plan_problem_uniform(case, work, terms,
                                                                                               influence)))}
            if generator is not None:
                runs["generator"], start = generated(case, work, terms, influence, generator, "one-step")
                runs["generator_ddim"], _ = generated(case, work, terms, influence, generator, "ddim")
                for name, solver, count in (("generator+learned", "learned", steps),
                                            ("generator+lbfgsb", "lbfgsb", args.iterations)):
                    outcome = plan_one(case, work, terms, settings, influence, solver, count, network, start)
                    # the whole optimizer time: the generator's evaluation, then the refinement from it
                    outcome["refine_s"] = outcome["optimize_s"]
                    outcome["generate_s"] = runs["generator"]["generate_s"]
                    outcome["optimize_s"] += outcome["generate_s"]
                    outcome["history_seconds"] = [t + outcome["generate_s"] for t in outcome["history_seconds"]]
                    runs[name] = outcome
            goal = runs["lbfgsb"]["objective"] * 1.01
            for name, outcome in runs.items():
                outcome["ratio_to_lbfgsb"] = outcome["objective"] / runs["lbfgsb"]["objective"]
                outcome["first_iteration_within_1pct"] = _within(outcome["objective_history"], goal)
            entry[source] = runs
        results["patients"][pid] = entry
        c = entry["clinical"]
        print(f"{pid}: L-BFGS-B {c['lbfgsb']['objective']:.4g} ({c['lbfgsb']['optimize_s']:.2f} s), learned x"
              f"{c['learned']['ratio_to_lbfgsb']:.3f} ({c['learned']['optimize_s']:.2f} s), Adam x"
              f"{c['adam']['ratio_to_lbfgsb']:.3f}", flush=True)
    results["summary"] = summarise(results["patients"])
    return results


def summarise(patients: dict) -> dict:
    summary = {}
    for source in ("clinical", "predicted"):
        for name in OPTIMIZERS:
            if not all(name in p[source] for p in patients.values()):
                continue
            runs = [p[source][name] for p in patients.values()]
            lbfgsb = [p[source]["lbfgsb"] for p in patients.values()]
            summary[f"{source}/{name}"] = {
                "median_ratio_to_lbfgsb": statistics.median(r["ratio_to_lbfgsb"] for r in runs),
                "within_1pct_fraction": float(np.mean([r["first_iteration_within_1pct"] is not None for r in runs])),
                "within_25pct_fraction": float(np.mean([r["ratio_to_lbfgsb"] <= 1.25 for r in runs])),
                "median_total_s": statistics.median(p["predict_s"] * (source == "predicted") + p["engine_s"]
                                                    + p[source][name]["optimize_s"] for p in patients.values()),
                "median_optimize_s": statistics.median(r["optimize_s"] for r in runs),
                "median_speedup_vs_lbfgsb": statistics.median(b["optimize_s"] / r["optimize_s"] if r["optimize_s"] > 0
                                                              else float("inf") for r, b in zip(runs, lbfgsb)),
                "dose_score_gy": float(np.mean([r["dose_score_gy"] for r in runs])),
                "dvh_score_gy": float(np.nanmean([r["dvh_score_gy"] if r["dvh_score_gy"] is not None else np.nan
                                                  for r in runs])),
                "median_total_variation": statistics.median(r["total_variation"] for r in runs),
                "median_ratio_after_30_iterations": statistics.median(
                    r["objective_history"][min(30, len(r["objective_history"]) - 1)] / b["objective"]
                    for r, b in zip(runs, lbfgsb)),
            }
    summary["median_engine_s"] = statistics.median(p["engine_s"] for p in patients.values())
    summary["median_predict_s"] = statistics.median(p["predict_s"] for p in patients.values())
    return summary


def print_table(results: dict) -> None:
    s = results["summary"]
    print(f"\n{len(results['patients'])} validation patients, {results['settings']}")
    print(f"{'desired / optimizer':<28}{'f/f_LBFGSB':>11}{'f@30/f_LB':>10}{'<=1%':>7}{'<=25%':>7}{'opt s':>8}"
          f"{'speedup':>8}{'total s':>8}{'dose Gy':>9}{'DVH Gy':>8}{'TV':>7}")
    for key, row in s.items():
        if not isinstance(row, dict):
            continue
        print(f"{key:<28}{row['median_ratio_to_lbfgsb']:>11.3f}{row['median_ratio_after_30_iterations']:>10.3f}"
              f"{row['within_1pct_fraction']:>7.0%}{row['within_25pct_fraction']:>7.0%}{row['median_optimize_s']:>8.2f}"
              f"{row['median_speedup_vs_lbfgsb']:>8.1f}{row['median_total_s']:>8.1f}{row['dose_score_gy']:>9.3f}{row['dvh_score_gy']:>8.3f}"
              f"{row['median_total_variation']:>7.3f}")
    print(f"engine (median, from the set's generation) {s['median_engine_s']:.1f} s; "
          f"prediction {s['median_predict_s']:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fluence-set", default=str(DEFAULT_SET))
    parser.add_argument("--influence", help="the kept influence matrices of the validation set")
    parser.add_argument("--summarise", metavar="JSON", help="only summarise and print the patients of an earlier run's "
                                                            "JSON again (rewritten with the new summary)")
    parser.add_argument("--network", help="a learned-optimizer checkpoint (last.pt), weights (default: shipped), or 'untrained' "
                             "(the ablation: the network as it starts, heavy-ball on the damped Jacobi step)")
    parser.add_argument("--generator", help="fluence generator weights (default: the shipped one), or 'none'")
    parser.add_argument("--iterations", type=int, default=300, help="L-BFGS-B and Adam (default: %(default)s)")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="bench_learned_plan.json")
    args = parser.parse_args()
    if args.summarise:
        results = json.loads(Path(args.summarise).read_text())
        results["summary"] = summarise(results["patients"])
        args.json = args.summarise
    elif args.influence:
        results = run(args)
    else:
        parser.error("give --influence (or --summarise JSON)")
    Path(args.json).write_text(json.dumps(results, indent=1))
    print_table(results)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
