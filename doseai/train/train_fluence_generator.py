"""Training the fluence generator (:mod:`doseai.models.fluence_generator`, issue 29) on a fluence set's training
patients: each patient's beam maps of features (from its kept influence matrix and the objective mimicking its
clinical dose) and of its L-BFGS-B weights.

1. ``examples``: the maps of every patient with a kept matrix, cached under ``<cache>/fluence_generator/`` (about
   2 s per patient to make; derived, never committed).
2. The teacher: DDPM training with v-prediction, masked to the bixels, ``teacher_epochs`` x ``steps_per_epoch``
   steps of ``batch`` beams.
3. The one-step generator: started from the teacher, trained to give in one evaluation the teacher's DDIM sample
   from the same noise (``pairs`` noises per patient, drawn once and sampled by the teacher before distilling).
4. Tuning on the objective: the one-step generator's weights, times the factor that minimises the objective along
   them (:func:`doseai.optimize.generator.scale_to_objective`), are scored by the mimicking objective itself,
   log f(s w) / f*, through each patient's influence matrix (the gradient in the weights is the objective's; the
   factor needs none, being optimal). Map errors alone do not make good plans: the objective is steep along some
   directions a small map error moves. The canvas is mirrored at random (rows, columns) on the way in and back on
   the way out: a few tens of patients, and the fit to them runs ahead of held-out patients.

The stages resume from their ``last.pt`` (``<cache>/runs/<run>/teacher``, ``.../student``, ``.../tuned``). ``monitor``
patients (training split) are held out of both to report the masked error against their L-BFGS-B maps; the
validation split is never read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from doseai.errors import DoseAIError
from doseai.paths import cache_root
from doseai.safe_load import load_checkpoint, plain
from doseai.train.loop import TrainingConfig, gradient_step, open_run, start_run


@dataclass(frozen=True, kw_only=True)
class FluenceGeneratorConfig(TrainingConfig):
    """Settings of the generator's training (an epoch is ``steps_per_epoch`` optimizer steps)."""

    run_name: str = "fluence_generator"
    epochs: int = 30  # the teacher's
    learning_rate: float = 1e-3
    student_epochs: int = 15
    student_learning_rate: float = 2e-4
    steps_per_epoch: int = 100
    batch: int = 32
    pairs: int = 4
    monitor: int = 4
    patients: int | None = None
    network: dict | None = None
    tune_epochs: int = 10
    tune_learning_rate: float = 1e-4
    tune_patients: int = 32  # their objectives stay in memory, ~0.3 GB each
    tune_batch: int = 4  # patients per step
    tune_flips: bool = True  # mirror the canvas at random while tuning (few patients: an augmentation)


@dataclass
class GeneratorExample:
    """One patient's maps: features (beams, F, H, W), target asinh(w/u) (beams, 1, H, W), uniform weight u."""

    patient_id: str
    features: np.ndarray
    target: np.ndarray
    uniform_weight: float


def example_of(patient_id: str, case, record: dict, settings, influence) -> GeneratorExample:
    """A patient's example from its case, fluence-set record and influence matrix."""
    from doseai.optimize.beam_maps import BeamLayout, bixel_features, weights_to_target
    from doseai.optimize.plan import plan_problem, plan_terms

    problem = plan_problem(case, case.dose, settings, influence)
    terms, _ = plan_terms(case, case.dose, settings, problem.work)
    uniform = float(problem.uniform[0])
    layout = BeamLayout.of(influence)
    features = layout.to_maps(bixel_features(influence, terms, case.prescriptions, uniform))
    target = layout.to_maps(weights_to_target(record["weights"], uniform)[:, None])
    return GeneratorExample(patient_id, features, target, uniform)


def build_examples(fluence_set: Path, influence_folder: Path, split: str = "train",
                   limit: int | None = None) -> list[GeneratorExample]:
    """The examples of the set's patients with a kept matrix (made once, then read from the cache)."""
    from doseai.io import openkbp
    from doseai.paths import openkbp_root
    from doseai.train.fluence_set import load_fluence_set, load_influence

    settings, records = load_fluence_set(Path(fluence_set))
    folder = cache_root() / "fluence_generator" / Path(fluence_set).parent.name / split
    folder.mkdir(parents=True, exist_ok=True)
    kept = [pid for pid in records if (Path(influence_folder) / f"{pid}.npz").is_file()][:limit]
    if not kept:
        raise DoseAIError(f"no kept influence matrix in {influence_folder} for the records of {fluence_set}")
    paths = openkbp.list_patients(openkbp_root() / split)
    examples = []
    for pid in tqdm(kept, desc="generator examples", unit="patient"):
        cached = folder / f"{pid}.npz"
        if not cached.is_file():
            case = openkbp.load_npz(paths[pid])
            influence = load_influence(Path(influence_folder) / f"{pid}.npz", case, records[pid], settings)
            example = example_of(pid, case, records[pid], settings, influence)
            partial = cached.with_suffix(".tmp.npz")
            np.savez(partial, features=example.features, target=example.target, uniform=example.uniform_weight)
            partial.rename(cached)
        with np.load(cached) as saved:
            examples.append(GeneratorExample(pid, saved["features"], saved["target"], float(saved["uniform"])))
    return examples


def _padded(array: np.ndarray, size: int) -> np.ndarray:
    """A (beams, C, H, W) map centred on a size x size canvas (the isocenter's ray stays at the centre)."""
    pad = (size - array.shape[-1]) // 2
    return np.pad(array, ((0, 0), (0, 0), (pad, pad), (pad, pad)))


def stack_beams(examples: list[GeneratorExample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All beams of ``examples`` on one canvas: features (N, F, S, S), targets (N, 1, S, S) and each beam's own
    canvas size (N,), by which a batch is cropped to what its beams need."""
    size = max(e.features.shape[-1] for e in examples)
    features = np.concatenate([_padded(e.features, size) for e in examples])
    targets = np.concatenate([_padded(e.target, size) for e in examples])
    sizes = np.concatenate([np.full(len(e.features), e.features.shape[-1]) for e in examples])
    return torch.from_numpy(features), torch.from_numpy(targets), torch.from_numpy(sizes)


def batch_of(rng: np.random.Generator, batch: int, sizes: torch.Tensor, *stacks: torch.Tensor) -> list[torch.Tensor]:
    """A random batch of beams from ``stacks``, cropped around the centre to the largest canvas among them."""
    pick = torch.from_numpy(rng.integers(0, len(sizes), batch))
    full, size = stacks[0].shape[-1], int(sizes[pick].max())
    low = (full - size) // 2
    return [stack[pick][..., low:low + size, low:low + size] for stack in stacks]


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the bixels that exist."""
    return ((prediction - target).square() * mask).sum() / mask.sum().clamp(min=1.0)


def _split(config: FluenceGeneratorConfig, examples: list[GeneratorExample]):
    if len(examples) <= config.monitor:
        raise DoseAIError(f"{len(examples)} patients: need more than the {config.monitor} held out to monitor")
    return examples[:config.monitor], examples[config.monitor:]


def train_teacher(examples: list[GeneratorExample], config: FluenceGeneratorConfig, rng: np.random.Generator):
    """DDPM training of the teacher (resumable); the teacher network."""
    from doseai.models.fluence_generator import FluenceMapNet, exists_mask, schedulers
    from doseai.optimize.beam_maps import FEATURES

    monitor, fitting = _split(config, examples)
    features, targets, sizes = stack_beams(fitting)
    mask = exists_mask(features)
    network = FluenceMapNet(len(FEATURES), config.network)
    scale = network.config["map_scale"]
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate)
    checkpoints, log = open_run(f"{config.run_name}/teacher")
    start_epoch = checkpoints.resume(network, optimizer)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs, last_epoch=start_epoch - 1)
    ddpm, _ = schedulers(network.config)
    for epoch in range(start_epoch, config.epochs):
        started, losses = time.perf_counter(), []
        for _ in tqdm(range(config.steps_per_epoch), desc=f"teacher epoch {epoch + 1}/{config.epochs}", leave=False):
            f, clean, m = batch_of(rng, config.batch, sizes, features, targets, mask)
            clean = clean / scale
            noise = torch.randn_like(clean)
            t = torch.randint(0, ddpm.num_train_timesteps, (len(clean),))
            noisy = ddpm.add_noise(clean, noise, t)
            loss = masked_mse(network(noisy, t, f), ddpm.get_velocity(clean, noise, t), m)
            losses.append(gradient_step(optimizer, network.parameters(), loss))
        scheduler.step()
        record = {"epoch": epoch, "loss": float(np.mean(losses)), "seconds": time.perf_counter() - started}
        if (epoch + 1) % 5 == 0 or epoch + 1 == config.epochs:
            record["monitor_mse"] = monitor_error(network, monitor, "ddim")
        log.write(**record)
        print(record, flush=True)
        checkpoints.save({"model": network.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                          "network": network.config, "monitor": record})
    return network.eval()


def _generate(network, example: GeneratorExample, sampler: str, seed: int = 0) -> torch.Tensor:
    from doseai.models.fluence_generator import ddim_sample, map_noise, one_step

    features = torch.from_numpy(example.features)
    noise = map_noise(features, seed)
    with torch.no_grad():
        return one_step(network, features, noise) if sampler == "one-step" else ddim_sample(network, features, noise)


def monitor_error(network, examples: list[GeneratorExample], sampler: str) -> float:
    """Masked mean squared error of the generated maps against the L-BFGS-B maps, over ``examples``."""
    from doseai.models.fluence_generator import exists_mask

    errors = [float(masked_mse(_generate(network, e, sampler), torch.from_numpy(e.target),
                               exists_mask(torch.from_numpy(e.features)))) for e in examples]
    return float(np.mean(errors))


def teacher_pairs(teacher, examples: list[GeneratorExample], pairs: int, rng: np.random.Generator):
    """(features, noise, teacher sample, canvas sizes) over ``pairs`` noises per patient's beams (each sampled
    on its own canvas, then padded to one)."""
    from doseai.models.fluence_generator import ddim_sample

    size = max(e.features.shape[-1] for e in examples)
    features, noises, samples, sizes = [], [], [], []
    for example in tqdm(examples, desc="teacher samples", unit="patient"):
        f = torch.from_numpy(example.features)
        for _ in range(pairs):
            noise = torch.from_numpy(rng.standard_normal((f.shape[0], 1, *f.shape[2:])).astype(np.float32))
            features.append(_padded(f.numpy(), size))
            noises.append(_padded(noise.numpy(), size))
            samples.append(_padded(ddim_sample(teacher, f, noise).numpy(), size))
            sizes.append(np.full(len(f), f.shape[-1]))
    return (torch.from_numpy(np.concatenate(features)), torch.from_numpy(np.concatenate(noises)),
            torch.from_numpy(np.concatenate(samples)), torch.from_numpy(np.concatenate(sizes)))


def train_student(teacher, examples: list[GeneratorExample], config: FluenceGeneratorConfig,
                  rng: np.random.Generator):
    """Distil the teacher's DDIM sampler into one step (resumable); the student network."""
    from doseai.models.fluence_generator import FluenceMapNet, exists_mask, one_step

    monitor, fitting = _split(config, examples)
    student = FluenceMapNet(teacher.n_features, teacher.config)
    student.load_state_dict(teacher.state_dict())
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.student_learning_rate)
    checkpoints, log = open_run(f"{config.run_name}/student")
    start_epoch = checkpoints.resume(student, optimizer)
    if start_epoch >= config.student_epochs:
        return student.eval()
    features, noises, samples, sizes = teacher_pairs(teacher, fitting, config.pairs, rng)
    mask = exists_mask(features)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.student_epochs,
                                                           last_epoch=start_epoch - 1)
    for epoch in range(start_epoch, config.student_epochs):
        started, losses = time.perf_counter(), []
        for _ in tqdm(range(config.steps_per_epoch), desc=f"student epoch {epoch + 1}/{config.student_epochs}",
                      leave=False):
            f, z, sample, m = batch_of(rng, config.batch, sizes, features, noises, samples, mask)
            loss = masked_mse(one_step(student, f, z), sample, m)
            losses.append(gradient_step(optimizer, student.parameters(), loss))
        scheduler.step()
        record = {"epoch": epoch, "loss": float(np.mean(losses)), "seconds": time.perf_counter() - started,
                  "monitor_mse": monitor_error(student, monitor, "one-step")}
        log.write(**record)
        print(record, flush=True)
        checkpoints.save({"model": student.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                          "network": student.config, "monitor": record})
    return student.eval()


def _generated(student, example: GeneratorExample, layout, noise: torch.Tensor, flips: tuple[int, ...] = ()):
    """The one-step generator's weights for ``example`` (differentiable); ``flips``: canvas axes (2: rows, 3:
    columns) mirrored on the way in and back on the way out (an augmentation: the same bixels, a mirrored view)."""
    from doseai.models.fluence_generator import one_step
    from doseai.optimize.beam_maps import target_to_weights

    features = torch.from_numpy(example.features)
    if flips:
        features, noise = features.flip(flips), noise.flip(flips)
    maps = one_step(student, features, noise)
    if flips:
        maps = maps.flip(flips)
    return target_to_weights(layout.from_maps(maps)[:, 0], example.uniform_weight)


def objective_ratio(student, example: GeneratorExample, problem, layout, noise: torch.Tensor,
                    flips: tuple[int, ...] = ()):
    """(surrogate of log f(s w) / f*, its value): the surrogate's gradient in the network is the objective's."""
    from doseai.optimize.generator import best_scale

    objective = problem.objective
    weights = _generated(student, example, layout, noise, flips)
    with torch.no_grad():
        dose = objective.dose_rows(weights)
        scale = best_scale([(t, p, dose[local]) for t, local, p in
                            zip(objective.terms, objective.local, objective.priorities)])
        value, grad = objective.value_and_grad(weights * scale)
    ratio = float(value) / problem.reference_value
    surrogate = float(np.log(ratio)) + torch.dot(grad * scale, weights - weights.detach()) / float(value)
    return surrogate, ratio


def tune_on_objective(student, examples: list[GeneratorExample], problems: dict, config: FluenceGeneratorConfig,
                      rng: np.random.Generator):
    """Stage 4 (resumable): the one-step generator tuned on the objective; the network."""
    from doseai.models.fluence_generator import map_noise
    from doseai.optimize.beam_maps import BeamLayout

    monitor, fitting = _split(config, [e for e in examples if e.patient_id in problems])
    layouts = {pid: BeamLayout.of(problem.objective.influence) for pid, problem in problems.items()}
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.tune_learning_rate)
    checkpoints, log = open_run(f"{config.run_name}/tuned")
    start_epoch = checkpoints.resume(student, optimizer)
    best_path = checkpoints.folder / "best.pt"  # the lowest monitored median ratio (training-split patients)
    best = load_checkpoint(best_path, ("monitor",))["monitor"]["monitor_median_ratio"] if best_path.is_file() else None

    def noise_for(example, seed=None):
        return map_noise(torch.from_numpy(example.features), int(seed if seed is not None else rng.integers(2**31)))

    def monitor_ratios() -> list[float]:
        with torch.no_grad():
            return [objective_ratio(student, e, problems[e.patient_id], layouts[e.patient_id], noise_for(e, 0))[1]
                    for e in monitor]

    student.train()
    for epoch in range(start_epoch, config.tune_epochs):
        started, ratios = time.perf_counter(), []
        for _ in tqdm(range(config.steps_per_epoch), desc=f"tuning epoch {epoch + 1}/{config.tune_epochs}",
                      leave=False):
            optimizer.zero_grad(set_to_none=True)
            for index in rng.integers(0, len(fitting), config.tune_batch):
                e = fitting[index]
                flips = tuple(axis for axis in (2, 3) if config.tune_flips and rng.random() < 0.5)
                surrogate, ratio = objective_ratio(student, e, problems[e.patient_id], layouts[e.patient_id],
                                                   noise_for(e), flips)
                (surrogate / config.tune_batch).backward()
                ratios.append(ratio)
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
        watched = monitor_ratios()
        record = {"epoch": epoch, "median_ratio": float(np.median(ratios)), "seconds": time.perf_counter() - started,
                  "monitor_median_ratio": float(np.median(watched)), "monitor_max_ratio": float(np.max(watched))}
        log.write(**record)
        print(record, flush=True)
        state = {"model": student.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                 "network": student.config, "monitor": record,
                 "train_ids": [e.patient_id for e in fitting], "monitor_ids": [e.patient_id for e in monitor]}
        checkpoints.save(state)
        if best is None or record["monitor_median_ratio"] < best:
            best = record["monitor_median_ratio"]
            torch.save(plain(state), best_path)
    return student.eval()


def train_fluence_generator(fluence_set: Path, influence_folder: Path,
                            config: FluenceGeneratorConfig | None = None) -> Path:
    """The stages (each resumes); the folder of the run."""
    from doseai.train.train_learned_optimizer import load_problems

    config = config or FluenceGeneratorConfig()
    rng, _ = start_run(config)
    examples = build_examples(fluence_set, influence_folder, limit=config.patients)
    print(f"{len(examples) - config.monitor} patients to fit, {config.monitor} held out (training split) to monitor")
    teacher = train_teacher(examples, config, rng)
    student = train_student(teacher, examples, config, rng)
    if config.tune_epochs > 0:
        problems = {p.patient_id: p for p in load_problems(Path(fluence_set), Path(influence_folder),
                                                           limit=config.tune_patients)}
        tune_on_objective(student, examples, problems, config, rng)
    return cache_root() / "runs" / config.run_name


def export_fluence_generator(run_folder: Path, out: Path, validation: dict | None = None) -> Path:
    """The run's teacher and student as one weights file ``out`` (fp16) and its model card beside it."""
    import json

    from doseai.optimize.beam_maps import FEATURES

    teacher = load_checkpoint(Path(run_folder) / "teacher" / "last.pt", ("model", "network", "epoch"))
    tuned = next((path for path in (Path(run_folder) / "tuned" / name for name in ("best.pt", "last.pt"))
                  if path.is_file()), None)
    distilled = load_checkpoint(Path(run_folder) / "student" / "last.pt", ("model", "network", "epoch"))
    student = load_checkpoint(tuned, ("model", "network", "epoch")) if tuned else distilled
    weights = {f"{role}.{key}": value.half() for role, state in (("teacher", teacher), ("student", student))
               for key, value in state["model"].items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(weights, out)
    card = {
        "name": out.stem, "kind": "fluence generator (conditional diffusion over beam's-eye-view maps, distilled "
                                  "to one step; after the FMD model)",
        "network": student["network"],
        "inputs": {"features": list(FEATURES), "problem": "a dose-mimicking objective and its influence matrix",
                   "layout": "each beam's bixels on one beam's-eye-view canvas (doseai.optimize.beam_maps)"},
        "output": "asinh(bixel weight / uniform starting weight), per beam",
        "training": {"data": "OpenKBP training split: the fluence set's mimicking plans (9 beams, 10 mm bixels)",
                     "teacher_epochs": teacher["epoch"] + 1, "distilled_epochs": distilled["epoch"] + 1,
                     "tuned_epochs": student["epoch"] + 1 if tuned else 0,
                     "one_step_stage": f"tuned on the objective ({tuned.name})" if tuned else "distilled",
                     "teacher_monitor": teacher.get("monitor"), "distilled_monitor": distilled.get("monitor"),
                     "tuned_monitor": student.get("monitor") if tuned else None,
                     "tuned_ids": student.get("train_ids"), "monitor_ids": student.get("monitor_ids"),
                     "command": "doseai train fluence-generator --fluence-set data/fluence_set/mimic_10mm/train "
                                "--influence <kept matrices>"},
        "validation": validation or {},
    }
    out.with_suffix(".json").write_text(json.dumps(card, indent=2))
    return out
