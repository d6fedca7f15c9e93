"""Photon dose engines behind one contract: ``engine.compute(case, beams) -> DoseInfluence``.

``get_engine("pyradplan")`` (default) is pyRadPlan's SVD pencil beam (matRad's algorithm, 6 MV generic
machine); ``get_engine("pydosert")`` is PyDoseRT's differentiable pencil-beam convolution (10 MV
presets), kept for comparison. Each engine's ``card()`` says what it models and what it does not.
Both libraries are optional: they are imported when an engine computes, not when this package loads.
"""

from doseai.engine.beams import beam_rotation, bixel_layout, default_beams, target_centroid_lps, target_union
from doseai.engine.influence import BeamSet, DoseInfluence, torch_csr_from_scipy
from doseai.engine.pydosert_engine import PyDoseRTEngine, PyDoseRTModel
from doseai.engine.pyradplan_engine import PyRadPlanEngine
from doseai.engine.working_grid import body_mask, dose_to_case_grid, to_working_grid, working_geometry

ENGINES = {"pyradplan": PyRadPlanEngine, "pydosert": PyDoseRTEngine}


def get_engine(name: str = "pyradplan", **options):
    """A dose engine by name ('pyradplan' or 'pydosert'); ``options`` go to its constructor."""
    try:
        return ENGINES[name.lower()](**options)
    except KeyError:
        raise ValueError(f"unknown dose engine '{name}'; choose one of {sorted(ENGINES)}") from None


__all__ = [
    "BeamSet", "DoseInfluence", "PyRadPlanEngine", "PyDoseRTEngine", "PyDoseRTModel", "ENGINES", "get_engine",
    "default_beams", "bixel_layout", "beam_rotation", "target_union", "target_centroid_lps",
    "working_geometry", "to_working_grid", "dose_to_case_grid", "body_mask", "torch_csr_from_scipy",
]
