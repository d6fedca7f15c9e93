"""What a DoseOptimizer optimization is asked for and what it gives back (no Qt, no torch).

:class:`OptimizationRequest` (inputs and plan settings) and :class:`DisplayTargets` (the nodes to fill)
go into :meth:`DoseOptimizerLogic.run <DoseOptimizerLib.logic.DoseOptimizerLogic.run>`, an
:class:`OptimizationResult` comes out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from doseai.mrml.plots import DVHResult

MODES = ("mimic", "objectives")  # doseai.optimize.plan.MODES (not imported here: it needs torch)
OPTIMIZERS = ("lbfgsb", "adam", "learned")  # doseai.optimize.fluence_solvers.SOLVERS (same reason)
STARTS = ("uniform", "generator")  # doseai.optimize.plan.STARTS (same reason)

Progress = Callable[[str, int], None]  # (what is being done, percent done)


@dataclass
class OptimizationRequest:
    """What :meth:`DoseOptimizerLogic.run` plans for: the CT, segmentation and desired dose nodes, the mode
    ("mimic" or "objectives"), the beams (number, bixel width in mm), the iteration limit, and how segments
    map to structures (``overrides``: segment name -> canonical name or None; ``prescriptions``: target
    name -> Gy, for targets whose names hold none). ``optimizer``: "lbfgsb", "adam" or "learned" (the LSTM
    learned optimizer); ``maxIterations`` None: 300, or the learned optimizer's trained steps. ``start``:
    "uniform" weights or the fluence "generator"'s (mode mimic)."""

    ctNode: object
    segNode: object
    desiredDoseNode: object
    mode: str = "mimic"
    numberOfBeams: int = 9
    bixelWidthMm: float = 5.0
    maxIterations: int | None = None
    overrides: Mapping[str, str | None] | None = None
    prescriptions: Mapping[str, float] | None = None
    optimizer: str = "lbfgsb"
    start: str = "uniform"

    def __post_init__(self) -> None:
        self.numberOfBeams, self.bixelWidthMm = int(self.numberOfBeams), float(self.bixelWidthMm)
        self.maxIterations = int(self.maxIterations) if self.maxIterations is not None else None

    def modeProblem(self) -> str:
        """Why :attr:`mode`, :attr:`optimizer` or :attr:`start` is not one the optimizer knows (a sentence),
        or ""."""
        if self.mode not in MODES:
            return f"Unknown optimization mode '{self.mode}': choose one of {', '.join(MODES)}"
        if self.optimizer not in OPTIMIZERS:
            return f"Unknown optimizer '{self.optimizer}': choose one of {', '.join(OPTIMIZERS)}"
        if self.start not in STARTS:
            return f"Unknown start '{self.start}': choose one of {', '.join(STARTS)}"
        if self.start == "generator" and self.mode != "mimic":
            return "The fluence generator plans toward the desired dose: its start needs mode mimic"
        return ""


@dataclass
class DisplayTargets:
    """Where :meth:`DoseOptimizerLogic.run` shows the plan, each filled in place when given, else created: the
    plan's dose volume (empty, or a plan optimized before), the DVH chart and the metrics table."""

    planDoseNode: object = None
    chartNode: object = None
    metricsTableNode: object = None


@dataclass
class OptimizationResult:
    """What :meth:`DoseOptimizerLogic.run` made: the plan dose node, its DVH (chart with the desired
    dose dashed, metrics table), the objectives (those optimized for in "objectives" mode, those derived
    from the desired dose for a TPS in "mimic" mode), the core's :class:`~doseai.optimize.plan.PlanResult`,
    the desired dose on the CT grid and the timings (s)."""

    planDoseNode: object
    dvh: DVHResult
    objectives: list
    plan: object
    desiredDose: object
    influenceReused: bool
    meanAbsoluteDifferenceGy: float
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def chartNode(self):
        """The DVH chart (the plan solid, the desired dose dashed)."""
        return self.dvh.chartNode

    @property
    def metricsTableNode(self):
        """The table of the plan's DVH metrics."""
        return self.dvh.metricsTableNode

    @property
    def case(self):
        """The PlanningCase the plan was optimized on (CT grid)."""
        return self.dvh.case

    def summary(self) -> str:
        """One paragraph for the status line: mode, plan, reuse of the matrix, times, difference, DVH."""
        reused = " (dose-influence matrix reused)" if self.influenceReused else ""
        return (f"Optimized ({self.plan.settings.mode}): {self.plan.summary()}{reused}; "
                f"{self.timings.get('total_s', 0):.1f} s in all. Mean |plan - desired| in the body "
                f"{self.meanAbsoluteDifferenceGy:.2f} Gy. {self.dvh.summary()}")
