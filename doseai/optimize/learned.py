"""The learned fluence optimizer at work (solver ``"learned"`` of :func:`doseai.optimize.fluence.optimize_fluence`):
the shipped LSTM (:mod:`doseai.models.learned_optimizer`) refines bixel weights in a few steps, each one value
and gradient of the objective. :func:`unroll` is shared with training (``doseai train learned-optimizer``), which
differentiates through it."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from doseai.errors import UnreadableInputError
from doseai.paths import REPO_ROOT

DEFAULT_LEARNED_OPTIMIZER = REPO_ROOT / "Resources" / "Models" / "learned_optimizer_v1.pt"


def load_learned_optimizer(path: Path | None = None):
    """The learned optimizer's network from ``path`` (default: the shipped one) and its card."""
    from doseai.models.learned_optimizer import LearnedFluenceOptimizer
    from doseai.predict import load_card
    from doseai.safe_load import load_into, load_state_dict_file

    path = Path(path) if path is not None else DEFAULT_LEARNED_OPTIMIZER
    if not path.is_file():
        raise UnreadableInputError(f"{path}: no learned fluence optimizer there (train one with `doseai train "
                                   "learned-optimizer`, or choose the lbfgsb or adam optimizer)")
    card = load_card(path)
    network = LearnedFluenceOptimizer(**card["network"])
    load_into(network, load_state_dict_file(path), path, path.with_suffix(".json").name)
    return network.eval(), card


def jacobi_step_size(problem, weights: torch.Tensor, grad: torch.Tensor, curvature: torch.Tensor) -> float:
    """rho: the step along the Jacobi direction p = g / H_jj that a quadratic model of the objective deems best
    at ``weights``, (g . p) / (p . H p), with H p from a secant of the gradient (exact where the active voxels
    do not change over the small secant step: one more evaluation of the objective)."""
    direction = grad / curvature
    epsilon = 1e-3 * float(weights.norm()) / max(float(direction.norm()), 1e-30)
    _, moved = problem.value_and_grad(torch.clamp(weights - epsilon * direction, min=0.0))
    bend = float(torch.dot(direction, grad - moved)) / epsilon
    along = float(torch.dot(grad, direction))
    return along / bend if bend > 0 and along > 0 else 1e-2


def unroll(problem, w0: torch.Tensor, network, steps: int, scale: float, curvature: torch.Tensor | None = None,
           clock: list[float] | None = None, bar=None) -> tuple[torch.Tensor, list[float], list[torch.Tensor]]:
    """``steps`` updates of the weights from ``w0`` by ``network`` on ``problem`` (a FluenceObjective);
    ``scale``: the plan's weight scale (the uniform starting weight). Returns the best weights, the objective
    after each step (index 0: at ``w0``) and, per step, a surrogate whose value is the objective and whose
    gradient in the network's parameters is the first-order one (training sums their logarithms). The step
    size along the Jacobi direction is measured first (:func:`jacobi_step_size`: one more evaluation)."""
    curvature = (curvature if curvature is not None else problem.gauss_newton_diagonal()).float()
    curvature = curvature.clamp(min=float(curvature.max()) * 1e-6)
    weights = w0.to(problem.device, torch.float32)
    value, grad = problem.value_and_grad(weights.detach())
    curvature = curvature / jacobi_step_size(problem, weights.detach(), grad, curvature)
    state = network.start(weights, float(value))
    history, surrogates = [float(value)], []
    if clock is not None:
        clock.append(time.perf_counter())
    best, best_value = weights.detach(), float(value)
    for _ in range(steps):
        state = network.step(state, float(value), grad, curvature, scale)
        value, grad = problem.value_and_grad(state.weights.detach())
        # the objective's value, with its gradient in the weights (hence in the network's parameters)
        surrogates.append(value.float() + torch.dot(grad, state.weights - state.weights.detach()))
        history.append(float(value))
        if clock is not None:
            clock.append(time.perf_counter())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(objective=f"{float(value):.5g}", refresh=False)
        if float(value) < best_value:
            best, best_value = state.weights.detach(), float(value)
    return best, history, surrogates


def run_learned(problem, w0: torch.Tensor, scale: float, steps: int, bar, clock: list[float], network=None):
    """The solver's outcome (weights, history, iterations, stop reason) of ``steps`` learned updates from
    ``w0`` (``scale``: the uniform starting weight of the plan, whatever ``w0`` is)."""
    if network is None:
        network, _ = load_learned_optimizer()
    with torch.no_grad():
        weights, history, _ = unroll(problem, w0, network, steps, scale, clock=clock, bar=bar)
    return weights, history, steps, f"learned optimizer: {steps} steps"
