"""Training the learned fluence optimizer (:mod:`doseai.models.learned_optimizer`) by unrolling it on training
patients' mimicking problems (issue 29).

Each training patient of a fluence set (``doseai train fluence-set ... --keep-influence DIR``) gives a problem:
its kept influence matrix and the objective that mimics its clinical dose (:func:`doseai.optimize.plan.plan_problem`),
with the L-BFGS-B objective of its record as the reference f*. An unroll runs ``steps`` updates from a start and
the loss is the mean over steps of log(f_t / f*) plus log(f_T / f*) once more (the last step is what the user gets):
scale-free, so large and small patients weigh alike. Starts: half from the uniform weights, half from the
record's weights multiplied by log-normal noise (what a fluence generator hands over: near, not at, the optimum).
With a fluence generator (``generator``), a share of the unrolls starts from its weights instead (a few
noise seeds per patient), the start it is shipped to refine; patients the generator was fitted on are left out
(its starts there are better than a new patient's), and the monitor reports the generator start too.
The first-order meta-gradient (:func:`doseai.optimize.learned.unroll`) needs no second derivatives of the objective.
Patients held out of the fitting (``monitor``, from the training split) report progress, and the epoch where
their median f_T / f* is lowest is kept as ``best.pt`` beside ``last.pt`` (the one to export); validation is never
read. The learning rate follows a cosine over the epochs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from doseai.errors import DoseAIError
from doseai.safe_load import load_checkpoint, plain
from doseai.train.loop import TrainingConfig, gradient_step, open_run, start_run


@dataclass(frozen=True, kw_only=True)
class LearnedOptimizerConfig(TrainingConfig):
    """Settings of the learned optimizer's training; ``patients``: at most this many training patients
    (their problems stay in memory, ~0.3 GB each); ``monitor``: of them, held out to report on."""

    run_name: str = "learned_optimizer"
    epochs: int = 30
    learning_rate: float = 3e-3
    steps: int = 30
    hidden: int = 20
    layers: int = 2
    patients: int = 40
    monitor: int = 4
    start_noise: float = 0.5  # sigma of the log-normal noise on the record's weights
    generator: str | None = None  # fluence generator weights whose starts a share of the unrolls refine
    generator_share: float = 0.75
    generator_seeds: int = 4
    init: str | None = None  # a trained learned optimizer's weights to start from


@dataclass
class TrainingProblem:
    """One patient's problem: the objective, the uniform start, the record's weights and f*."""

    patient_id: str
    objective: object
    uniform: torch.Tensor
    reference_weights: torch.Tensor
    reference_value: float
    curvature: torch.Tensor
    generated: list[torch.Tensor] = field(default_factory=list)  # the generator's weights, one per noise seed


def generator_fitted_ids(generator) -> set[str]:
    """The patients a fluence generator was tuned or monitored on (its card)."""
    training = generator.card.get("training", {})
    return set(training.get("tuned_ids", [])) | set(training.get("monitor_ids", []))


def load_problems(fluence_set: Path, influence_folder: Path, split: str = "train", limit: int | None = None,
                  generator=None, seeds: int = 4) -> list[TrainingProblem]:
    """The problems of a fluence set's patients whose influence matrix was kept (the record's own objective
    is recomputed as a check that matrix, objective and record belong together); with a ``generator``, its
    weights for ``seeds`` noise seeds each, and without the patients it was fitted on."""
    from doseai.io import openkbp
    from doseai.optimize.generator import generate_weights
    from doseai.optimize.plan import plan_problem
    from doseai.paths import openkbp_root
    from doseai.train.fluence_set import load_fluence_set, load_influence

    settings, records = load_fluence_set(fluence_set)
    paths = openkbp.list_patients(openkbp_root() / split)
    problems = []
    fitted = generator_fitted_ids(generator) if generator is not None else set()
    kept = [pid for pid in records if (Path(influence_folder) / f"{pid}.npz").is_file() and pid not in fitted][:limit]
    if not kept:
        raise DoseAIError(f"no kept influence matrix in {influence_folder} for the records of {fluence_set}"
                          + (" but of patients the fluence generator was fitted on" if fitted else ""))
    for pid in tqdm(kept, desc="loading problems", unit="patient"):
        record, case = records[pid], openkbp.load_npz(paths[pid])
        influence = load_influence(Path(influence_folder) / f"{pid}.npz", case, record, settings)
        problem = plan_problem(case, case.dose, settings, influence)
        weights = torch.from_numpy(record["weights"])
        value = problem.objective.value(weights)
        if not np.isclose(value, record["objective_history"][-1], rtol=1e-3):
            raise DoseAIError(f"{pid}: the rebuilt objective gives {value:.6g} for the record's weights, the record "
                              f"says {record['objective_history'][-1]:.6g}: the set and the code disagree")
        generated = [] if generator is None else [
            generate_weights(influence, problem.objective.terms, case.prescriptions, float(problem.uniform[0]),
                             generator, seed=seed) for seed in range(seeds)]
        problems.append(TrainingProblem(pid, problem.objective, problem.uniform, weights, float(value),
                                        problem.objective.gauss_newton_diagonal().float(), generated))
    return problems


def _start(problem: TrainingProblem, rng: np.random.Generator, noise: float, generator_share: float) -> torch.Tensor:
    if problem.generated and rng.random() < generator_share:
        return problem.generated[rng.integers(len(problem.generated))].clone()
    if rng.random() < 0.5:
        return problem.uniform.clone()
    factor = torch.from_numpy(np.exp(noise * rng.standard_normal(problem.uniform.numel())).astype(np.float32))
    return problem.reference_weights * factor


def unroll_loss(network, problem: TrainingProblem, start: torch.Tensor, steps: int):
    """The unroll's loss (see the module docstring) and its objective history."""
    from doseai.optimize.learned import unroll

    _, history, surrogates = unroll(problem.objective, start, network, steps, float(problem.uniform[0]),
                                    problem.curvature)
    logs = torch.stack([torch.log(s.clamp(min=1e-30) / problem.reference_value) for s in surrogates])
    return logs.mean() + logs[-1], history


def monitor_ratios(network, problems: list[TrainingProblem], steps: int) -> dict[str, float]:
    """Median and max f_T / f* over ``problems`` from the uniform start and, where the problems have them, from
    the generator's first start (``selection``: the median the best epoch is chosen by, the generator's if any)."""
    from doseai.optimize.learned import unroll

    def final_ratios(start_of) -> list[float]:
        return [unroll(p.objective, start_of(p), network, steps, float(p.uniform[0]), p.curvature)[1][-1]
                / p.reference_value for p in problems]

    with torch.no_grad():
        ratios = final_ratios(lambda p: p.uniform)
        record = {"median_final_ratio": float(np.median(ratios)), "max_final_ratio": float(np.max(ratios))}
        if all(p.generated for p in problems):
            ratios = final_ratios(lambda p: p.generated[0])
            record.update(median_generator_ratio=float(np.median(ratios)), max_generator_ratio=float(np.max(ratios)))
    record["selection"] = record.get("median_generator_ratio", record["median_final_ratio"])
    return record


def train_learned_optimizer(fluence_set: Path, influence_folder: Path,
                            config: LearnedOptimizerConfig | None = None) -> Path:
    """Train (or resume) the learned optimizer; the path of the run's last checkpoint."""
    from doseai.models.learned_optimizer import LearnedFluenceOptimizer

    config = config or LearnedOptimizerConfig()
    rng, _ = start_run(config)
    generator = None
    if config.generator is not None:
        from doseai.optimize.generator import load_fluence_generator

        generator = load_fluence_generator(Path(config.generator))
    problems = load_problems(fluence_set, influence_folder, limit=config.patients, generator=generator,
                             seeds=config.generator_seeds)
    if len(problems) <= config.monitor:
        raise DoseAIError(f"{len(problems)} problems: need more than the {config.monitor} held out to monitor")
    monitor, fitting = problems[:config.monitor], problems[config.monitor:]
    network = LearnedFluenceOptimizer(hidden=config.hidden, layers=config.layers)
    if config.init is not None:
        from doseai.safe_load import load_into, load_state_dict_file

        load_into(network, load_state_dict_file(Path(config.init)), Path(config.init), "--init")
    optimizer = torch.optim.Adam(network.parameters(), lr=config.learning_rate)
    checkpoints, log = open_run(config.run_name)
    start_epoch = checkpoints.resume(network, optimizer)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs, last_epoch=start_epoch - 1)
    best_path = checkpoints.folder / "best.pt"  # the lowest monitored ratio (training-split patients)
    best = None
    if best_path.is_file():  # runs from before the generator starts recorded no "selection": their uniform median
        monitored = load_checkpoint(best_path, ("monitor",))["monitor"]
        best = monitored.get("selection", monitored["median_final_ratio"])
    print(f"{len(fitting)} patients to fit, {len(monitor)} held out (training split) to monitor; "
          f"{config.steps} steps per unroll")
    for epoch in range(start_epoch, config.epochs):
        started, losses = time.perf_counter(), []
        for index in tqdm(rng.permutation(len(fitting)), desc=f"learned optimizer epoch {epoch + 1}/{config.epochs}",
                          unit="patient", leave=False):
            problem = fitting[index]
            start = _start(problem, rng, config.start_noise, config.generator_share)
            loss, _ = unroll_loss(network, problem, start, config.steps)
            losses.append(gradient_step(optimizer, network.parameters(), loss))
        scheduler.step()
        record = {"epoch": epoch, "loss": float(np.mean(losses)), "seconds": time.perf_counter() - started,
                  **monitor_ratios(network, monitor, config.steps)}
        log.write(**record)
        print(record)
        state = {"model": network.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                 "network": network.config(), "steps": config.steps, "monitor": record,
                 "train_ids": [p.patient_id for p in fitting], "monitor_ids": [p.patient_id for p in monitor],
                 "starts": {"generator": config.generator, "generator_share": config.generator_share if generator
                            else 0.0, "generator_seeds": config.generator_seeds, "init": config.init}}
        checkpoints.save(state)
        if best is None or record["selection"] < best:
            best = record["selection"]
            torch.save(plain(state), best_path)
    return checkpoints.path


def export_learned_optimizer(checkpoint: Path, out: Path, validation: dict | None = None) -> Path:
    """The weights of a run's checkpoint as ``out`` and its model card beside it (``validation``: the numbers
    of ``Testing/benchmarks/bench_learned_plan.py`` to record in the card)."""
    import json

    state = load_checkpoint(checkpoint, ("model", "network", "steps", "epoch"))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key: value.float() for key, value in state["model"].items()}, out)
    card = {
        "name": out.stem, "kind": "learned fluence optimizer (coordinate-wise LSTM, after L2Plan)",
        "network": state["network"], "steps": state["steps"],
        "inputs": {"per_bixel": ["asinh(damped Jacobi step / weight scale)", "asinh(weight / weight scale)",
                                 "weight at zero", "asinh(previous update / weight scale)",
                                 "asinh(gradient / its RMS)", "log(f / f_start) / 10", "log(f / f_previous)"],
                   "problem": "any FluenceObjective: value, gradient, Gauss-Newton diagonal"},
        "training": {"data": "OpenKBP training split: mimicking problems of the fluence set (9 beams, 10 mm bixels)",
                     "epochs": state["epoch"] + 1, "patients": len(state.get("train_ids", [])),
                     "monitor_ids": state.get("monitor_ids", []), "monitor": state.get("monitor"),
                     "starts": state.get("starts", {"generator": None}),
                     "command": "doseai train learned-optimizer --fluence-set data/fluence_set/mimic_10mm/train "
                                "--influence <kept matrices>"},
        "validation": validation or {},
    }
    out.with_suffix(".json").write_text(json.dumps(card, indent=2))
    return out
