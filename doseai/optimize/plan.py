"""From a desired (e.g. predicted) dose to a deliverable plan: beams, dose-influence matrix, fluence
optimization, and the plan's dose back on the case grid.

Two ways to steer the optimizer toward the desired dose:

* ``"mimic"``: voxel-wise dose mimicking (two-sided in targets and the rest of the body, one-sided in
  OARs), as in the OpenKBP-Opt study (Babier et al. 2022).
* ``"objectives"``: the DVH point and mean-dose objectives derived from the desired dose with
  rule-based margins (:mod:`doseai.optimize.from_dose`), i.e. what a planner would type into a TPS.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from doseai.case import PlanningCase, validate_dose
from doseai.engine.beams import default_beams
from doseai.engine.contract import DoseEngine
from doseai.engine.influence import BeamSet, DoseInfluence
from doseai.engine.registry import DEFAULT_ENGINE, engine_class, get_engine
from doseai.engine.working_grid import body_mask, dose_to_case_grid
from doseai.errors import GeometryMismatchError
from doseai.optimize.fluence import FluenceResult, optimize_fluence
from doseai.optimize.from_dose import (
    FromDoseRules, PlanObjective, mimicking_terms, objectives_from_dose, objectives_to_terms,
)
from doseai.resample import resample_to

if TYPE_CHECKING:
    import torch

    from doseai.optimize.fluence_objective import FluenceObjective

MODES = ("mimic", "objectives")
# where the optimizer starts: the uniform weights, or the fluence generator's (mode mimic; not the default while
# it loses to the uniform start, see Docs/DoseToPlan.md)
STARTS = ("uniform", "generator")


@dataclass
class PlanSettings:
    """What the optimizer is asked for. ``engine``: a name of :func:`doseai.engine.registry.engine_names`.
    ``bixel_width_mm`` and ``lateral_cutoff_mm`` (for engines that take one) trade engine time for detail
    (the engine's time grows with the number of bixels); ``smoothness`` penalises jagged fluence."""

    mode: str = "mimic"
    engine: str = DEFAULT_ENGINE
    n_beams: int = 9
    bixel_width_mm: float = 5.0
    lateral_cutoff_mm: float = 50.0
    working_spacing_mm: float = 5.0
    smoothness: float = 0.0
    max_iterations: int = 300
    tolerance: float = 1e-4
    solver: str = "lbfgsb"
    start: str = "uniform"
    rules: FromDoseRules = field(default_factory=FromDoseRules)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {self.start!r}")
        if self.start == "generator" and self.mode != "mimic":
            raise ValueError("the fluence generator plans toward a desired dose: start 'generator' needs mode 'mimic'")


@dataclass
class PlanResult:
    """The optimized plan: its dose on the case grid, the fluence (weights, maps per beam), the
    objectives it was optimized for (``objectives``: the TPS list, empty when mimicking) and timings."""

    dose: np.ndarray
    fluence: FluenceResult
    fluence_maps: list[np.ndarray]
    beams: BeamSet
    objectives: list[PlanObjective]
    settings: PlanSettings
    engine_card: dict
    timings_s: dict[str, float]
    jaws_mm: list[tuple[float, float, float, float]] = field(default_factory=list)  # per beam, X1 X2 Y1 Y2
    start: str = "uniform"  # where the optimizer started: "uniform" or "generator"

    def summary(self) -> str:
        """One line: beams, bixels, engine, generator and optimization times, iterations and why it stopped."""
        t = self.timings_s
        generated = f", fluence generator {t['generate_s']:.1f} s" if "generate_s" in t else ""
        return (f"{len(self.beams.gantry_angles_deg)} beams, {self.fluence.weights.size} bixels; dose engine "
                f"{t.get('engine_s', 0):.1f} s{generated}, optimization {t.get('optimize_s', 0):.1f} s "
                f"({self.fluence.iterations} iterations from the {self.start} start, {self.fluence.stop_reason})")


def default_iterations(solver: str) -> int:
    """The iterations a solver runs unless told: 300, or the steps the learned optimizer was trained for."""
    if solver != "learned":
        return 300
    from doseai.optimize.learned import load_learned_optimizer

    return int(load_learned_optimizer()[1]["steps"])


def make_engine(settings: PlanSettings) -> DoseEngine:
    """The dose engine ``settings.engine`` with those of the settings' engine options it takes (the working
    grid spacing; the lateral cut-off where the engine has one)."""
    offered = {"working_spacing_mm": settings.working_spacing_mm, "lateral_cutoff_mm": settings.lateral_cutoff_mm}
    taken = engine_class(settings.engine).options()
    return get_engine(settings.engine, **{name: value for name, value in offered.items() if name in taken})


def plan_from_dose(case: PlanningCase, desired_dose: np.ndarray, settings: PlanSettings | None = None,
                   beams: BeamSet | None = None, influence: DoseInfluence | None = None,
                   progress: bool = True) -> PlanResult:
    """Optimize a plan whose dose comes as close as the beams allow to ``desired_dose`` (Gy, on the case
    grid). ``influence`` (from an earlier call on the same case and beams) skips the dose engine."""
    settings = settings or PlanSettings()
    case.require_target()
    desired = validate_dose(np.asarray(desired_dose, np.float32), "desired dose")
    if desired.shape != case.geometry.shape:
        raise GeometryMismatchError(f"the desired dose has shape {desired.shape}, the case grid {case.geometry.shape}")
    timings: dict[str, float] = {}
    engine = make_engine(settings)
    beams = beams or default_beams(case, n_beams=settings.n_beams, bixel_width_mm=settings.bixel_width_mm)
    start = time.perf_counter()
    if influence is None:
        influence = engine.compute(case, beams, progress=progress)
    timings["engine_s"] = time.perf_counter() - start
    work = engine.working_case(case)
    if not work.geometry.matches(influence.geometry):
        raise GeometryMismatchError("the influence matrix was computed on another working grid than this case's")

    start = time.perf_counter()
    terms, objectives = plan_terms(case, desired, settings, work)
    timings["objectives_s"] = time.perf_counter() - start

    prescription_gy, target_voxels = top_target(case, work)
    initial = None
    if settings.start == "generator":
        start = time.perf_counter()
        initial = generated_start(influence, terms, case, prescription_gy, target_voxels)
        timings["generate_s"] = time.perf_counter() - start
    start = time.perf_counter()
    fluence = optimize_fluence(influence, terms, smoothness=settings.smoothness,
                               max_iterations=settings.max_iterations, tolerance=settings.tolerance,
                               solver=settings.solver, progress=progress, prescription_gy=prescription_gy,
                               target_voxels=target_voxels, initial_weights=initial)
    timings["optimize_s"] = time.perf_counter() - start

    return PlanResult(dose=case_dose(fluence.dose_image, work, case), fluence=fluence,
                      fluence_maps=influence.fluence_maps(fluence.weights), beams=influence.beams,
                      objectives=objectives, settings=settings, engine_card=engine.card(), timings_s=timings,
                      jaws_mm=influence.jaws_mm(fluence.weights),
                      start="generator" if initial is not None else "uniform")


def generated_start(influence: DoseInfluence, terms: list, case: PlanningCase, prescription_gy: float,
                    target_voxels: np.ndarray, generator=None) -> torch.Tensor:
    """The fluence generator's weights for a mimicking problem (the shipped generator unless one is given)."""
    from doseai.optimize.fluence_setup import uniform_initial_weights
    from doseai.optimize.generator import generate_weights

    uniform = float(uniform_initial_weights(influence, terms, prescription_gy, target_voxels)[0])
    return generate_weights(influence, terms, case.prescriptions, uniform, generator)


def top_target(case: PlanningCase, work: PlanningCase) -> tuple[float, np.ndarray]:
    """The highest prescription (Gy) and its target's voxels on the working grid: where the uniform starting
    weights put the prescription."""
    top = max(case.prescriptions, key=case.prescriptions.get)
    return case.prescriptions[top], np.flatnonzero(work.structures[top].ravel())


def plan_terms(case: PlanningCase, desired: np.ndarray, settings: PlanSettings,
               work: PlanningCase) -> tuple[list, list[PlanObjective]]:
    """The optimizer's objective terms on the working grid of ``work`` for a plan toward ``desired`` (Gy, case
    grid), and the TPS objectives they come from (empty when mimicking)."""
    masks = dict(work.structures)
    body = body_mask(work)
    if body is not None:
        masks["External"] = body
    if settings.mode == "mimic":
        desired_work = np.clip(resample_to(desired, case.geometry, work.geometry, "linear"), 0, None)
        return mimicking_terms(desired_work, masks, case.prescriptions), []
    # DVH points read on the case grid, where the desired dose was made
    objectives = objectives_from_dose(desired, case.structures, case.prescriptions, settings.rules)
    return objectives_to_terms(objectives, masks), objectives


@dataclass
class PlanProblem:
    """A plan's optimization problem as the optimizers see it: the objective (value and gradient in the bixel
    weights), the uniform starting weights (mean target dose at the prescription), the working-grid case."""

    objective: FluenceObjective
    uniform: torch.Tensor
    work: PlanningCase


def plan_problem(case: PlanningCase, desired: np.ndarray, settings: PlanSettings,
                 influence: DoseInfluence) -> PlanProblem:
    """The problem :func:`plan_from_dose` hands its optimizer, for learned optimizers and benchmarks that run
    several optimizers on one influence matrix."""
    from doseai.optimize.fluence import FluenceObjective, uniform_initial_weights

    work = make_engine(settings).working_case(case)
    terms, _ = plan_terms(case, validate_dose(np.asarray(desired, np.float32), "desired dose"), settings, work)
    uniform = uniform_initial_weights(influence, terms, *top_target(case, work))
    return PlanProblem(FluenceObjective(influence, terms, settings.smoothness, weight_scale=float(uniform[0])),
                       uniform, work)


def case_dose(working_dose: np.ndarray, work: PlanningCase, case: PlanningCase) -> np.ndarray:
    """A working-grid plan dose on the case grid, 0 outside the case's body (float32 Gy)."""
    dose = dose_to_case_grid(working_dose, work.geometry, case.geometry)
    body = body_mask(case)
    return (dose * body if body is not None else dose).astype(np.float32)


def mean_difference_in_body(case: PlanningCase, dose: np.ndarray, desired: np.ndarray) -> float:
    """Mean |dose - desired| in the body (where the desired dose is > 0 when the case has no body)."""
    body = body_mask(case)
    region = body if body is not None else desired > 0
    return float(np.abs(dose - desired)[region].mean()) if region.any() else 0.0
