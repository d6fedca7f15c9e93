"""The learned fluence optimizer (issue 29) on tiny synthetic problems: its first-order meta-gradient, the
secant step size, non-negativity and any bixel count, that training on a problem lowers its unrolled objective,
the solver "learned" in optimize_fluence, and the export / load round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from doseai.errors import UnreadableInputError
from doseai.models.learned_optimizer import LearnedFluenceOptimizer
from doseai.optimize import FluenceObjective, mimicking_terms, optimize_fluence, uniform_initial_weights
from doseai.optimize.learned import jacobi_step_size, load_learned_optimizer, unroll
from Testing.test_optimize import _influence, _masks


def _problem(seed=0, beams=2):
    influence, dense = _influence(seed=seed, beams=beams)
    masks = _masks()
    rng = np.random.default_rng(seed)
    desired = rng.uniform(5, 15, masks["External"].shape).astype(np.float32)
    desired[masks["PTV_60"]] = 60.0
    terms = mimicking_terms(desired, masks, {"PTV_60": 60.0})
    uniform = uniform_initial_weights(influence, terms)
    return influence, terms, FluenceObjective(influence, terms, weight_scale=float(uniform[0])), uniform


def test_the_surrogate_is_the_objective_with_its_gradient():
    _, _, objective, uniform = _problem()
    weights = (uniform * 1.3).requires_grad_(True)
    value, grad = objective.value_and_grad(weights.detach())
    surrogate = value.float() + torch.dot(grad, weights - weights.detach())
    surrogate.backward()
    assert float(surrogate) == pytest.approx(float(value), rel=1e-6)
    assert torch.allclose(weights.grad, grad)


def test_the_secant_step_is_the_quadratic_optimum_along_the_jacobi_direction():
    _, _, objective, uniform = _problem()
    curvature = objective.gauss_newton_diagonal().float()
    value, grad = objective.value_and_grad(uniform)
    rho = jacobi_step_size(objective, uniform, grad, curvature)
    direction = grad / curvature
    along = [float(objective.value(torch.clamp(uniform - f * rho * direction, min=0))) for f in (0.7, 1.0, 1.3)]
    assert 0 < rho and along[1] < float(value) and along[1] <= min(along[0], along[2]) * 1.001


@pytest.mark.parametrize("beams", [2, 3])
def test_the_untrained_network_lowers_the_objective_and_keeps_weights_non_negative(beams):
    _, _, objective, uniform = _problem(seed=beams, beams=beams)
    with torch.no_grad():
        weights, history, surrogates = unroll(objective, uniform, LearnedFluenceOptimizer(), 15, float(uniform[0]))
    assert weights.shape == uniform.shape and bool((weights >= 0).all())
    assert len(history) == 16 and len(surrogates) == 15
    assert min(history) < 0.5 * history[0] and float(objective.value(weights)) == pytest.approx(min(history), rel=1e-5)


def test_training_on_a_problem_lowers_its_unrolled_objective():
    from doseai.train.train_learned_optimizer import TrainingProblem, unroll_loss

    _, _, objective, uniform = _problem(seed=4)
    reference = optimize_fluence(*_problem(seed=4)[:2], max_iterations=200, progress=False).objective
    problem = TrainingProblem("p", objective, uniform, uniform, reference, objective.gauss_newton_diagonal().float())
    torch.manual_seed(0)
    network = LearnedFluenceOptimizer(hidden=8, layers=1)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss, _ = unroll_loss(network, problem, uniform.clone(), 8)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    # log(f / f*) summed over the unroll: 0.58 at the start, 0.52 after 12 updates (a larger rate overshoots:
    # the first-order meta-gradient ignores how a step moves the later gradients)
    assert losses[-1] < losses[0] - 0.04 and all(b <= a + 1e-6 for a, b in zip(losses, losses[1:]))


def test_the_learned_solver_runs_its_steps_and_exports_round_trip(tmp_path):
    from doseai.train.train_learned_optimizer import export_learned_optimizer

    influence, terms, _, _ = _problem()
    network = LearnedFluenceOptimizer(hidden=6, layers=1)
    result = optimize_fluence(influence, terms, solver="learned", max_iterations=12, progress=False,
                              learned_network=network)
    assert result.solver == "learned" and result.iterations == 12 and len(result.objective_history) == 13
    assert len(result.history_seconds) == 13 and bool((result.weights >= 0).all())
    assert result.objective == pytest.approx(min(result.objective_history), rel=1e-4)

    checkpoint = tmp_path / "last.pt"
    torch.save({"model": network.state_dict(), "network": network.config(), "steps": 12, "epoch": 0}, checkpoint)
    path = export_learned_optimizer(checkpoint, tmp_path / "lo.pt", {"note": "test"})
    loaded, card = load_learned_optimizer(path)
    assert card["steps"] == 12 and card["validation"] == {"note": "test"}
    again = optimize_fluence(influence, terms, solver="learned", max_iterations=12, progress=False,
                             learned_network=loaded)
    assert again.objective_history == pytest.approx(result.objective_history, rel=1e-5)
    with pytest.raises(UnreadableInputError, match="no learned fluence optimizer"):
        load_learned_optimizer(tmp_path / "absent.pt")


def cli_plan_settings(monkeypatch, tmp_path):
    """(the sample case's path, run(args) -> the CLI's return code, the PlanSettings each run planned with):
    ``doseai optimize`` with the planning itself stood in for."""
    from doseai.cli import main
    from doseai.io import save_case
    from doseai.sample import make_sample_case

    case = save_case(make_sample_case(seed=1), tmp_path / "case", "nrrd")
    seen = []

    def fake_plan(case, desired, settings, **kwargs):
        seen.append(settings)
        raise SystemExit(0)

    monkeypatch.setattr("doseai.optimize.plan.plan_from_dose", fake_plan)
    return case, main, seen


def test_the_cli_passes_the_optimizer_choice(monkeypatch, tmp_path):
    case, main, seen = cli_plan_settings(monkeypatch, tmp_path)
    with pytest.raises(SystemExit):
        main(["optimize", "--case", str(case), "--out", str(tmp_path / "o"), "--optimizer", "adam"])
    assert seen[-1].solver == "adam" and seen[-1].max_iterations == 300
