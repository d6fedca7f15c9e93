"""The fluence generator at work: the shipped network (:mod:`doseai.models.fluence_generator`) turns a mimicking
problem's beam's-eye-view features into bixel weights in one evaluation (or, for comparison, the undistilled
teacher by DDIM in a few tens). The learned optimizer starts from them."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from doseai.engine.influence import DoseInfluence
from doseai.errors import UnreadableInputError
from doseai.paths import REPO_ROOT

DEFAULT_FLUENCE_GENERATOR = REPO_ROOT / "Resources" / "Models" / "fluence_generator_v1.pt"
SAMPLERS = ("one-step", "ddim")


@dataclass
class FluenceGenerator:
    """The one-step generator, the teacher it was distilled from, and their card."""

    student: torch.nn.Module
    teacher: torch.nn.Module
    card: dict


def load_fluence_generator(path: Path | None = None) -> FluenceGenerator:
    """The generator's networks from ``path`` (default: the shipped one) and its card; kept after the first
    load while the file is unchanged (the DoseOptimizer module loads it once a session, not once a plan)."""
    path = Path(path) if path is not None else DEFAULT_FLUENCE_GENERATOR
    if not path.is_file():
        raise UnreadableInputError(f"{path}: no fluence generator there (train one with `doseai train "
                                   "fluence-generator`)")
    return _load(str(path.resolve()), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _load(path: str, modified_ns: int) -> FluenceGenerator:
    from doseai.models.fluence_generator import FluenceMapNet
    from doseai.optimize.beam_maps import FEATURES
    from doseai.predict import load_card
    from doseai.safe_load import load_state_dict_file

    card = load_card(Path(path))
    features = card["inputs"].get("features")
    if list(features or []) != list(FEATURES):
        raise UnreadableInputError(f"{path}: its card lists other features than this version computes: "
                                   f"{features} vs {list(FEATURES)}")
    state = load_state_dict_file(path)
    networks = []
    for role in ("student", "teacher"):
        network = FluenceMapNet(len(FEATURES), card["network"])
        own = {key[len(role) + 1:]: value.float() for key, value in state.items() if key.startswith(role + ".")}
        network.load_state_dict(own)
        networks.append(network.eval())
    return FluenceGenerator(*networks, card)


def problem_maps(influence: DoseInfluence, terms: Sequence, prescriptions: dict[str, float], uniform_weight: float):
    """(layout, features (beams, F, H, W) tensor) of a mimicking problem."""
    from doseai.optimize.beam_maps import BeamLayout, bixel_features

    layout = BeamLayout.of(influence)
    features = bixel_features(influence, terms, prescriptions, uniform_weight)
    return layout, torch.from_numpy(layout.to_maps(features))


def best_scale(pieces: Sequence[tuple], low: float = 0.05, high: float = 20.0, evaluations: int = 40) -> float:
    """The factor s minimising sum priority * term(s * dose) over ``pieces`` (term, priority, the term's dose),
    by golden-section search on log s: the objective is convex in s (a sum of convex functions of a linear
    map), and the dose of s * w is s times the dose of w, so no further matrix product is needed."""
    import math

    def objective(log_s: float) -> float:
        return sum(priority * float(term.value(math.exp(log_s) * dose)) for term, priority, dose in pieces)

    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = math.log(low), math.log(high)
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = objective(c), objective(d)
    for _ in range(evaluations):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = objective(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = objective(d)
    return math.exp((a + b) / 2.0)


def scale_to_objective(influence: DoseInfluence, terms: Sequence, weights: torch.Tensor) -> float:
    """:func:`best_scale` of ``weights`` on a problem's terms (one dose computation)."""
    dose = torch.mv(influence.matrix, weights.to(influence.matrix.device, torch.float32))
    return best_scale([(term, float(term.priority), dose[term.voxels.to(dose.device)]) for term in terms])


@torch.no_grad()
def generate_weights(influence: DoseInfluence, terms: Sequence, prescriptions: dict[str, float],
                     uniform_weight: float, generator: FluenceGenerator | None = None, seed: int = 0,
                     sampler: str = "one-step", steps: int | None = None, rescale: bool = True) -> torch.Tensor:
    """Bixel weights (n_bixels,) for a mimicking problem, from the generator's noise drawn with ``seed``:
    ``sampler`` "one-step" (the distilled generator) or "ddim" (the teacher in ``steps`` steps); ``rescale``:
    times the factor that minimises the objective along them (:func:`scale_to_objective`), as in training."""
    from doseai.models.fluence_generator import ddim_sample, map_noise, one_step
    from doseai.optimize.beam_maps import target_to_weights

    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    generator = generator or load_fluence_generator()
    layout, features = problem_maps(influence, terms, prescriptions, uniform_weight)
    noise = map_noise(features, seed)
    maps = (one_step(generator.student, features, noise) if sampler == "one-step"
            else ddim_sample(generator.teacher, features, noise, steps))
    weights = target_to_weights(layout.from_maps(maps)[:, 0], uniform_weight).float()
    return weights * scale_to_objective(influence, terms, weights) if rescale else weights

