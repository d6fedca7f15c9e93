"""The solvers of :func:`doseai.optimize.fluence.optimize_fluence`, on a
:class:`~doseai.optimize.fluence_objective.FluenceObjective`.

``"lbfgsb"``: scipy's L-BFGS-B (torch computes value and gradient, on CPU or CUDA) on diagonally rescaled
variables w = s * u, s_j ~ 1 / sqrt(H_jj) of the Gauss-Newton Hessian with all terms active, and a long
memory (100 corrections); bounds stay u >= 0. ``"adam"``: projected Adam, all on the device (the choice
for CUDA when host round trips matter). Both stop when the best objective improved by less than
``tolerance`` (relative) over the last ``patience`` iterations (:class:`Stopper`), or after
``max_iterations``; both return ``(best weights, objective history, iterations, stop reason)``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from tqdm.auto import tqdm

    from doseai.optimize.fluence_objective import FluenceObjective

Outcome = tuple[torch.Tensor, list[float], int, str]  # best weights, objective history, iterations, stop reason

SOLVERS = ("lbfgsb", "adam", "learned")  # learned: doseai.optimize.learned


class Stopper:
    """Best objective so far; stop when it improved by less than ``tolerance`` (relative) over ``patience``
    iterations. Relative to the larger of the current value and 1e-6 x the initial one, so that a problem
    whose optimum is 0 (an achievable dose to mimic) stops too."""

    def __init__(self, tolerance: float, patience: int):
        self.tolerance = float(tolerance)
        self.patience = max(1, int(patience))
        self.best: list[float] = []

    def update(self, value: float) -> bool:
        """Record the objective of one more iteration; True when it is time to stop."""
        self.best.append(min(value, self.best[-1]) if self.best else value)
        if len(self.best) <= self.patience:
            return False
        old, new = self.best[-1 - self.patience], self.best[-1]
        return (old - new) <= self.tolerance * max(abs(new), 1e-6 * abs(self.best[0]), 1e-30)


def _single_threaded_blas():
    """L-BFGS-B's BLAS calls are tiny; multi-threaded OpenBLAS spin-waits on a busy machine (measured on
    2 cores with the other core loaded: 45 ms per L-BFGS-B iteration instead of 1.5 ms). Limited to one
    thread when threadpoolctl is installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        from contextlib import nullcontext

        return nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def run_lbfgsb(problem: FluenceObjective, w0: torch.Tensor, scaling: torch.Tensor, max_iterations: int,
               tolerance: float, patience: int, memory: int, bar: tqdm, clock: list[float]) -> Outcome:
    """L-BFGS-B from ``w0`` on u = w / ``scaling`` with ``memory`` corrections; ``bar`` (tqdm) and ``clock``
    (a time per history entry) follow the iterations."""
    with _single_threaded_blas():
        return _lbfgsb(problem, w0, scaling, max_iterations, tolerance, patience, memory, bar, clock)


def _lbfgsb(problem: FluenceObjective, w0: torch.Tensor, scaling: torch.Tensor, max_iterations: int,
            tolerance: float, patience: int, memory: int, bar: tqdm, clock: list[float]) -> Outcome:
    from scipy.optimize import minimize

    device = problem.device
    s = scaling.double().cpu().numpy()
    scaling = scaling.to(device, torch.float32)
    history: list[float] = []
    stopper = Stopper(tolerance, patience)
    state = {"reason": None, "best_u": None, "best_f": np.inf}

    def fun(u: np.ndarray):
        value, grad = problem.value_and_grad(torch.from_numpy(u.astype(np.float32)).to(device) * scaling)
        value = float(value)
        if value < state["best_f"]:
            state["best_f"], state["best_u"] = value, u.copy()
        return value, (grad * scaling).double().cpu().numpy()

    def callback(intermediate_result):
        value = float(intermediate_result.fun)
        history.append(value)
        clock.append(time.perf_counter())
        bar.update(1)
        bar.set_postfix(objective=f"{value:.5g}", refresh=False)
        if stopper.update(value):
            state["reason"] = f"converged: objective improved by < {tolerance:g} (relative) over {patience} iterations"
            raise StopIteration

    u0 = w0.double().cpu().numpy() / s
    history.append(fun(u0)[0])
    clock.append(time.perf_counter())
    stopper.update(history[0])
    if max_iterations == 0:
        return w0, history, 0, "max_iterations"
    result = minimize(fun, u0, jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * u0.size, callback=callback,
                      options={"maxiter": int(max_iterations), "maxcor": int(memory), "ftol": 0.0, "gtol": 0.0,
                               "maxfun": 20 * int(max_iterations) + 20})
    iterations = len(history) - 1
    if state["reason"] is not None:
        reason = state["reason"]
    elif iterations >= max_iterations:
        reason = "max_iterations"
    else:
        reason = f"L-BFGS-B: {result.message}"
    u = result.x if result.fun <= state["best_f"] else state["best_u"]
    return torch.from_numpy(np.asarray(u * s, np.float32)), history, iterations, reason


def run_adam(problem: FluenceObjective, w0: torch.Tensor, max_iterations: int, tolerance: float, patience: int,
             learning_rate: float, bar: tqdm, clock: list[float], betas: tuple[float, float] = (0.9, 0.999),
             decay: float = 0.995) -> Outcome:
    """Projected Adam from ``w0``: step ``learning_rate`` x the mean initial weight, decaying by ``decay`` per
    iteration; ``bar`` and ``clock`` as for :func:`run_lbfgsb`."""
    w = w0.clone().to(problem.device, torch.float32)
    scale = float(w0.mean()) if float(w0.mean()) > 0 else 1.0
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    stopper = Stopper(tolerance, patience)
    history: list[float] = []
    best_w, best_f = w.clone(), np.inf
    reason = "max_iterations"
    iterations = 0
    for step in range(1, max_iterations + 2):
        value, grad = problem.value_and_grad(w)
        value = float(value)
        if value < best_f:
            best_f, best_w = value, w.clone()
        history.append(value)
        clock.append(time.perf_counter())
        if step > 1:
            bar.update(1)
            bar.set_postfix(objective=f"{value:.5g}", refresh=False)
            if stopper.update(value):
                reason = f"converged: objective improved by < {tolerance:g} (relative) over {patience} iterations"
                break
        else:
            stopper.update(value)
        if step == max_iterations + 1:
            break
        m.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
        v.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
        m_hat = m / (1 - betas[0] ** step)
        v_hat = v / (1 - betas[1] ** step)
        lr = learning_rate * scale * decay ** (step - 1)
        w = torch.clamp(w - lr * m_hat / (v_hat.sqrt() + 1e-12 * scale + 1e-30), min=0.0)
        iterations = step
    return best_w, history, iterations, reason
