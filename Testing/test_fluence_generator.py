"""The fluence generator (issue 29) on tiny synthetic problems: the beam's-eye-view layout and features, the
teacher's DDPM training and DDIM sampler, the one-step distillation (the student comes closer to the teacher's
samples), the export / load round trip, and where plans start from."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from doseai.errors import DoseAIError, UnreadableInputError
from doseai.optimize import mimicking_terms, uniform_initial_weights
from doseai.optimize.beam_maps import FEATURES, BeamLayout, bixel_features, target_to_weights, weights_to_target
from Testing.test_optimize import _influence, _masks

TINY = {"channels": [8, 8, 8], "norm_groups": 4, "sampler_steps": 4}


def _problem(seed=0, beams=2, desired=None):
    influence, _ = _influence(seed=seed, beams=beams)
    masks = _masks()
    if desired is None:
        desired = np.random.default_rng(seed).uniform(5, 15, masks["External"].shape).astype(np.float32)
        desired[masks["PTV_60"]] = 60.0
    terms = mimicking_terms(desired, masks, {"PTV_60": 60.0})
    return influence, terms, float(uniform_initial_weights(influence, terms)[0])


def test_the_layout_puts_every_bixel_in_its_own_cell_and_back():
    influence, _, _ = _problem(beams=3)
    layout = BeamLayout.of(influence)  # the synthetic bixels sit half a bixel off the isocenter's ray
    assert layout.shape[0] % 4 == 0 and layout.n_beams == 3
    cells = set(zip(layout.beam, layout.row, layout.col))
    assert len(cells) == influence.n_bixels  # no two bixels share a cell
    values = np.random.default_rng(1).random((influence.n_bixels, 2)).astype(np.float32)
    maps = layout.to_maps(values)
    assert maps.shape == (3, 2, *layout.shape) and np.count_nonzero(maps[:, 0]) == influence.n_bixels
    assert np.array_equal(layout.from_maps(maps), values)


def test_features_are_finite_scale_free_and_read_the_desired_dose():
    influence, terms, uniform = _problem()
    features = bixel_features(influence, terms, {"PTV_60": 60.0}, uniform)
    assert features.shape == (influence.n_bixels, len(FEATURES)) and np.isfinite(features).all()
    assert np.all(features[:, FEATURES.index("exists")] == 1)
    # the same problem in other units (matrix x 10, so weights / 10) gives the same features
    scaled = dataclasses.replace(influence, matrix=influence.matrix * 10.0)
    again = bixel_features(scaled, terms, {"PTV_60": 60.0}, uniform / 10.0)
    assert np.allclose(features, again, rtol=1e-4, atol=1e-5)
    # asking for the uniform plan's own dose everywhere: every bixel's ratio is 1
    uniform_dose = influence.dose_image(np.full(influence.n_bixels, uniform, np.float32))
    influence2, terms2, uniform2 = _problem(desired=uniform_dose.astype(np.float32))
    ratio = bixel_features(influence2, terms2, {"PTV_60": 60.0}, uniform)[:, FEATURES.index("ratio")]
    assert np.allclose(ratio[ratio != 0], 1.0, atol=1e-4)


def test_features_refuse_objectives_that_name_no_desired_dose():
    from doseai.optimize.objectives import MaxDose

    influence, terms, uniform = _problem()
    with pytest.raises(DoseAIError, match="dose-mimicking"):
        bixel_features(influence, [MaxDose("SpinalCord", terms[0].voxels, dose_gy=40.0)], {}, uniform)


def test_weights_round_trip_through_the_output_space():
    weights = np.array([0.0, 0.1, 1.0, 7.5], np.float32)
    assert np.allclose(target_to_weights(weights_to_target(weights, 2.0), 2.0), weights, rtol=1e-5)
    assert np.all(target_to_weights(np.array([-1.0, 0.5]), 1.0) >= 0)


def _examples(n=5):
    from doseai.train.train_fluence_generator import GeneratorExample

    examples = []
    for seed in range(n):
        influence, terms, uniform = _problem(seed=seed)
        layout = BeamLayout.of(influence)
        weights = np.random.default_rng(seed).gamma(2.0, uniform / 2, influence.n_bixels)
        examples.append(GeneratorExample(f"p{seed}", layout.to_maps(bixel_features(influence, terms, {"PTV_60": 60.0},
                                                                                      uniform)),
                                         layout.to_maps(weights_to_target(weights, uniform)[:, None]), uniform))
    return examples


def test_teacher_student_train_resume_distil_and_export(monkeypatch, tmp_path):
    from doseai.models.fluence_generator import exists_mask, one_step
    from doseai.optimize.generator import generate_weights, load_fluence_generator
    from doseai.train.train_fluence_generator import (
        FluenceGeneratorConfig, export_fluence_generator, masked_mse, teacher_pairs, train_student, train_teacher,
    )

    monkeypatch.setenv("DOSEAI_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    examples = _examples()
    config = FluenceGeneratorConfig(run_name="gen", epochs=2, student_epochs=3, steps_per_epoch=5, batch=4,
                                    pairs=2, monitor=1, network=TINY, threads=1, learning_rate=3e-3,
                                    student_learning_rate=3e-3)
    rng = np.random.default_rng(0)
    teacher = train_teacher(examples, config, rng)
    run = tmp_path / "cache" / "runs" / "gen"
    assert len((run / "teacher" / "log.jsonl").read_text().splitlines()) == 2
    teacher = train_teacher(examples, dataclasses.replace(config, epochs=3), rng)  # resumes: one epoch more
    assert len((run / "teacher" / "log.jsonl").read_text().splitlines()) == 3

    # distillation brings the one-step map closer to the teacher's DDIM samples than the teacher's own one step
    features, noises, samples, _ = teacher_pairs(teacher, examples[1:], 1, np.random.default_rng(5))
    mask = exists_mask(features)
    with torch.no_grad():
        before = float(masked_mse(one_step(teacher, features, noises), samples, mask))
    student = train_student(teacher, examples, dataclasses.replace(config, epochs=3), np.random.default_rng(5))
    with torch.no_grad():
        after = float(masked_mse(one_step(student, features, noises), samples, mask))
    assert after < 0.8 * before

    path = export_fluence_generator(run, tmp_path / "gen.pt", {"note": "test"})
    generator = load_fluence_generator(path)
    assert generator.card["inputs"]["features"] == list(FEATURES) and generator.card["validation"] == {"note": "test"}
    influence, terms, uniform = _problem(seed=7, beams=3)  # a bixel count it never saw
    weights = generate_weights(influence, terms, {"PTV_60": 60.0}, uniform, generator, seed=3)
    assert weights.shape == (influence.n_bixels,) and bool((weights >= 0).all()) and float(weights.sum()) > 0
    assert torch.equal(weights, generate_weights(influence, terms, {"PTV_60": 60.0}, uniform, generator, seed=3))
    ddim = generate_weights(influence, terms, {"PTV_60": 60.0}, uniform, generator, sampler="ddim", steps=3)
    assert ddim.shape == weights.shape and bool((ddim >= 0).all())
    with pytest.raises(UnreadableInputError, match="no fluence generator"):
        load_fluence_generator(tmp_path / "absent.pt")


def test_where_plans_start():
    from doseai.optimize.plan import PlanSettings

    assert PlanSettings(solver="learned").start == "uniform"  # the generator is asked for, not assumed
    assert PlanSettings(solver="lbfgsb", start="generator").start == "generator"
    with pytest.raises(ValueError, match="needs mode 'mimic'"):
        PlanSettings(mode="objectives", start="generator")
    with pytest.raises(ValueError, match="start must be one of"):
        PlanSettings(start="auto")


def test_the_best_scale_is_the_minimum_along_the_weights():
    from doseai.optimize.generator import best_scale, scale_to_objective
    from doseai.optimize.objectives import SquaredDeviation, SquaredOverdose

    voxels = torch.arange(4)
    dose = torch.tensor([10.0, 20.0, 30.0, 40.0])
    # sum (s d - 50)^2 is least at s = 50 sum d / sum d^2
    assert best_scale([(SquaredDeviation("PTV", voxels, dose_gy=50.0), 1.0, dose)]) == pytest.approx(
        50 * 100 / 3000, rel=1e-4)
    # a limit nobody reaches does not move it; one every voxel exceeds pulls it down
    free = SquaredOverdose("Cord", voxels, dose_gy=1000.0)
    assert best_scale([(SquaredDeviation("PTV", voxels, dose_gy=50.0), 1.0, dose), (free, 5.0, dose)]) == \
        pytest.approx(5 / 3, rel=1e-4)
    influence, terms, uniform = _problem()
    objective = _objective(influence, terms, uniform)
    weights = torch.rand(influence.n_bixels, generator=torch.Generator().manual_seed(0)) * uniform
    scale = scale_to_objective(influence, terms, weights)
    values = [objective.value(weights * f) for f in (scale * 0.9, scale, scale * 1.1)]
    assert values[1] <= min(values[0], values[2])


def _objective(influence, terms, uniform):
    from doseai.optimize.fluence import FluenceObjective

    return FluenceObjective(influence, terms, weight_scale=uniform)


def test_tuning_on_the_objective_lowers_it_and_resumes(monkeypatch, tmp_path):
    from doseai.models.fluence_generator import FluenceMapNet
    from doseai.optimize import optimize_fluence
    from doseai.train.train_fluence_generator import FluenceGeneratorConfig, objective_ratio, tune_on_objective
    from doseai.train.train_learned_optimizer import TrainingProblem

    monkeypatch.setenv("DOSEAI_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    examples, problems = _examples(4), {}
    for seed, example in enumerate(examples):
        influence, terms, uniform = _problem(seed=seed)
        objective = _objective(influence, terms, uniform)
        best = optimize_fluence(influence, terms, max_iterations=200, progress=False)
        problems[example.patient_id] = TrainingProblem(example.patient_id, objective, torch.full(
            (influence.n_bixels,), uniform), torch.from_numpy(best.weights), objective.value(best.weights), None)
    student = FluenceMapNet(len(FEATURES), TINY)
    config = FluenceGeneratorConfig(run_name="tune", tune_epochs=2, steps_per_epoch=8, tune_batch=3, monitor=1,
                                    tune_learning_rate=3e-3, network=TINY, threads=1)

    def ratios():
        noise = [torch.zeros((len(e.features), 1, *e.features.shape[2:])) for e in examples[1:]]
        with torch.no_grad():
            return [objective_ratio(student, e, problems[e.patient_id], BeamLayout.of(
                problems[e.patient_id].objective.influence), z)[1] for e, z in zip(examples[1:], noise)]

    before = ratios()
    assert min(before) >= 1 - 1e-3  # L-BFGS-B's optimum is the floor
    tune_on_objective(student, examples, problems, config, np.random.default_rng(0))
    after = ratios()
    assert np.mean(np.log(after)) < np.mean(np.log(before)) - 0.1
    log = tmp_path / "cache" / "runs" / "tune" / "tuned" / "log.jsonl"
    assert len(log.read_text().splitlines()) == 2
    assert (log.parent / "best.pt").is_file()  # the epoch with the lowest monitored ratio, the one to export
    tune_on_objective(student, examples, problems, dataclasses.replace(config, tune_epochs=3),
                      np.random.default_rng(0))
    assert len(log.read_text().splitlines()) == 3


def test_the_cli_passes_the_start_and_refuses_a_generator_without_mimicking(monkeypatch, tmp_path, capsys):
    from Testing.test_learned_optimizer import cli_plan_settings

    case, main, seen = cli_plan_settings(monkeypatch, tmp_path)
    with pytest.raises(SystemExit):
        main(["optimize", "--case", str(case), "--out", str(tmp_path / "o"), "--start", "generator"])
    assert seen[-1].start == "generator" and seen[-1].solver == "lbfgsb"
    rc = main(["optimize", "--case", str(case), "--out", str(tmp_path / "p"), "--start", "generator",
               "--mode", "objectives"])
    assert rc == 2 and "needs mode 'mimic'" in capsys.readouterr().err


def test_the_shipped_generator_loads_and_plans_any_bixel_count():
    from doseai.optimize.generator import DEFAULT_FLUENCE_GENERATOR, generate_weights, load_fluence_generator

    generator = load_fluence_generator()
    assert generator.card["training"]["tuned_epochs"] > 0 and generator.card["validation"]["patients"] == 40
    assert load_fluence_generator(DEFAULT_FLUENCE_GENERATOR) is generator  # loaded once while unchanged
    influence, terms, uniform = _problem(seed=3, beams=3)
    weights = generate_weights(influence, terms, {"PTV_60": 60.0}, uniform)
    assert weights.shape == (influence.n_bixels,) and bool(torch.isfinite(weights).all()) and bool((weights >= 0).all())
