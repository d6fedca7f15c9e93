"""Qt-free part of the DoseOptimizer module: importable and testable on slicer-core.

``DoseOptimizer.py`` (the Slicer module file) re-exports :class:`DoseOptimizerLogic`, mixed with
``ScriptedLoadableModuleLogic`` for the parameter node.
"""

from .logic import (
    OBJECTIVE_FILES,
    PLAN_ENGINE,
    PLAN_MODE_ATTRIBUTE,
    TASK_PACKAGES,
    DoseOptimizerLogic,
    missing_packages_for,
    require_packages,
)
from .optimization import MODES, OPTIMIZERS, STARTS, DisplayTargets, OptimizationRequest, OptimizationResult

__all__ = [
    "MODES",
    "OBJECTIVE_FILES",
    "OPTIMIZERS",
    "PLAN_ENGINE",
    "PLAN_MODE_ATTRIBUTE",
    "STARTS",
    "TASK_PACKAGES",
    "DisplayTargets",
    "DoseOptimizerLogic",
    "OptimizationRequest",
    "OptimizationResult",
    "missing_packages_for",
    "require_packages",
]
