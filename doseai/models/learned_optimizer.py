"""A learned fluence optimizer (after L2Plan, Poles et al. 2026): an LSTM that runs coordinate-wise over the
bixels (one set of weights shared by every bixel, so it plans any number of bixels and beams) and learns the
update dynamics of fluence optimization.

Each step it reads, per bixel, the damped Jacobi step -rho g_j / H_jj of the objective (H_jj: the Gauss-Newton
diagonal; rho: the best step along the Jacobi direction at the start, measured once by a secant, because a bixel's
dose overlaps many others' and the undamped Jacobi step overshoots by two orders of magnitude), the current and the
previous update, the gradient's direction, whether the bixel sits at zero, and how far the objective has come;
it answers with a step size and a momentum for that bixel:

    delta_j = -kappa * sigmoid(a_j) * rho g_j / H_jj + sigmoid(b_j) * delta_prev_j,   w_j <- max(0, w_j + delta_j)

Started untrained it is heavy-ball on the damped Jacobi step (step 1, momentum 0.8: the best hand-tuned pair on a
training patient).

All inputs are in units of the plan's own scale (the uniform starting weight, the objective at the start), so
the same weights serve patients whose matrices and objectives differ by orders of magnitude. Non-negativity is
kept by the projection. The network knows nothing of the objective beyond what the step gives it: the
objective (:class:`~doseai.optimize.fluence_objective.FluenceObjective`) supplies value, gradient and H_jj.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

N_FEATURES = 7


@dataclass
class StepState:
    """What the optimizer carries from step to step for one plan."""

    weights: torch.Tensor  # (n_bixels,)
    previous_step: torch.Tensor  # (n_bixels,) the last update
    hidden: list[tuple[torch.Tensor, torch.Tensor]]  # per LSTM layer, (h, c) of shape (n_bixels, hidden)
    first_value: float
    last_value: float


class LearnedFluenceOptimizer(nn.Module):
    """The coordinate-wise LSTM. ``hidden``/``layers``: the LSTM's size; ``max_step``: kappa's starting value,
    the largest fraction of the Jacobi step a bixel may take (learned)."""

    def __init__(self, hidden: int = 20, layers: int = 2, max_step: float = 2.0):
        super().__init__()
        self.hidden, self.layers = hidden, layers
        self.cells = nn.ModuleList(nn.LSTMCell(N_FEATURES if i == 0 else hidden, hidden) for i in range(layers))
        self.head = nn.Linear(hidden, 2)
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():  # start as half the max step (1 x rho), momentum 0.8
            self.head.bias.copy_(torch.tensor([0.0, math.log(0.8 / 0.2)]))
        self.log_kappa = nn.Parameter(torch.tensor(math.log(max_step)))

    def start(self, weights: torch.Tensor, value: float) -> StepState:
        """The state before the first step from ``weights`` (objective ``value`` there)."""
        zeros = weights.new_zeros(weights.numel(), self.hidden)
        return StepState(weights, torch.zeros_like(weights), [(zeros, zeros) for _ in range(self.layers)],
                         float(value), float(value))

    def features(self, state: StepState, value: float, grad: torch.Tensor, curvature: torch.Tensor,
                 scale: float) -> torch.Tensor:
        """(n_bixels, N_FEATURES) inputs of one step, all scale-free (see the module docstring)."""
        jacobi = grad / curvature / scale
        direction = grad / grad.square().mean().sqrt().clamp(min=1e-30)
        progress = math.log(max(value, 1e-30) / max(state.first_value, 1e-30))
        change = math.log(max(value, 1e-30) / max(state.last_value, 1e-30))
        n = grad.numel()
        return torch.stack([
            torch.asinh(jacobi), torch.asinh(state.weights / scale), (state.weights <= 0).to(grad.dtype),
            torch.asinh(state.previous_step / scale), torch.asinh(direction),
            grad.new_full((n,), progress / 10.0), grad.new_full((n,), max(min(change, 5.0), -5.0)),
        ], dim=1)

    def step(self, state: StepState, value: float, grad: torch.Tensor, curvature: torch.Tensor,
             scale: float) -> StepState:
        """One update of ``state.weights`` from the objective's ``value`` and ``grad`` there (``curvature``:
        H_jj / rho > 0; ``scale``: the plan's weight scale). Differentiable in the network's parameters (the inputs
        are taken as given: the first-order approximation of learned optimizers)."""
        x = self.features(state, value, grad.detach(), curvature, scale).detach()
        hidden = []
        for cell, (h, c) in zip(self.cells, state.hidden):
            h, c = cell(x, (h, c))
            hidden.append((h, c))
            x = h
        a, b = self.head(x).unbind(dim=1)
        jacobi = (grad / curvature).detach()
        delta = -self.log_kappa.exp() * torch.sigmoid(a) * jacobi + torch.sigmoid(b) * state.previous_step
        weights = torch.clamp(state.weights + delta, min=0.0)
        return StepState(weights, weights - state.weights, hidden, state.first_value, float(value))

    def config(self) -> dict:
        """The constructor's arguments, for the model card."""
        return {"hidden": self.hidden, "layers": self.layers}
