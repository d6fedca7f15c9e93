"""Qt-free part of the DoseOptimizer module: importable and testable on slicer-core.

``DoseOptimizer.py`` (the Slicer module file) re-exports :class:`DoseOptimizerLogic`, mixed with
``ScriptedLoadableModuleLogic`` for the parameter node.
"""

from .logic import (
    MODES,
    OBJECTIVE_FILES,
    PLAN_MODE_ATTRIBUTE,
    TASK_PACKAGES,
    DoseOptimizerLogic,
    OptimizationResult,
    missing_packages_for,
    require_packages,
)

__all__ = [
    "MODES",
    "OBJECTIVE_FILES",
    "PLAN_MODE_ATTRIBUTE",
    "TASK_PACKAGES",
    "DoseOptimizerLogic",
    "OptimizationResult",
    "missing_packages_for",
    "require_packages",
]
