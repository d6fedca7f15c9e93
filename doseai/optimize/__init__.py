"""Fluence-map optimization on a dose-influence matrix, and objectives derived from a (predicted) dose.

* :mod:`~doseai.optimize.objectives`: objective terms (torch) on the flat dose of the working grid.
* :mod:`~doseai.optimize.fluence`: :func:`optimize_fluence` (L-BFGS-B or projected Adam) -> :class:`FluenceResult`;
  its parts: :mod:`~doseai.optimize.fluence_setup` (matrix rows, initial weights),
  :mod:`~doseai.optimize.fluence_objective` (value and gradient with row screening) and
  :mod:`~doseai.optimize.fluence_solvers`.
* :mod:`~doseai.optimize.plan`: from a desired dose to a plan through a dose engine of :mod:`doseai.engine`.
* :mod:`~doseai.optimize.from_dose`: DVH objectives from a predicted dose (TPS export, torch terms) and
  dose-mimicking objective sets.
"""

from doseai.optimize.fluence import (
    SOLVERS, FluenceObjective, FluenceResult, neighbour_pairs, optimize_fluence, uniform_initial_weights,
)
from doseai.optimize.from_dose import (
    CSV_COLUMNS, OBJECTIVE_TYPES, FromDoseRules, PlanObjective, mimicking_terms, objectives_from_case,
    objectives_from_dose, objectives_from_json, objectives_to_csv, objectives_to_json, objectives_to_terms,
)
from doseai.optimize.objectives import (
    OBJECTIVE_KINDS, DoseMimicking, MaxDose, MaxDVH, MeanDose, MinDose, MinDVH, ObjectiveTerm, SquaredDeviation,
    SquaredOverdose, SquaredUnderdose, objective_from_dict, objectives_from_dicts, objectives_to_dicts,
    quantile_linear, voxel_indices,
)

__all__ = [
    "SOLVERS", "FluenceObjective", "FluenceResult", "neighbour_pairs", "optimize_fluence", "uniform_initial_weights",
    "CSV_COLUMNS", "OBJECTIVE_TYPES", "FromDoseRules", "PlanObjective", "mimicking_terms", "objectives_from_case",
    "objectives_from_dose", "objectives_from_json", "objectives_to_csv", "objectives_to_json", "objectives_to_terms",
    "OBJECTIVE_KINDS", "DoseMimicking", "MaxDose", "MaxDVH", "MeanDose", "MinDose", "MinDVH", "ObjectiveTerm",
    "SquaredDeviation", "SquaredOverdose", "SquaredUnderdose", "objective_from_dict", "objectives_from_dicts",
    "objectives_to_dicts", "quantile_linear", "voxel_indices",
]
