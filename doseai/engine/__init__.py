"""Photon dose engines behind one contract (:class:`DoseEngine`): ``engine.compute(case, beams) -> DoseInfluence``.

``get_engine("pyradplan")`` (default) is pyRadPlan's SVD pencil beam (matRad's algorithm, 6 MV generic
machine); ``get_engine("pydosert")`` is PyDoseRT's differentiable pencil-beam convolution (10 MV
presets), kept for comparison; :mod:`doseai.engine.registry` is where engines are listed. Each engine's
``card()`` says what it models and what it does not, its class what it needs installed.

The contract, the registry and the engine classes load without torch or an engine library (a Slicer
module reads the requirements before installing them); the names that need torch or scipy (beams, the
influence matrix, PyDoseRT's model) load on first use.
"""

from __future__ import annotations

import importlib

from doseai.engine.contract import (
    DoseEngine,
    DoseEngineError,
    EngineOption,
    EngineRequirements,
    EngineUnavailableError,
)
from doseai.engine.pydosert_engine import PyDoseRTEngine
from doseai.engine.pyradplan_engine import PyRadPlanEngine
from doseai.engine.registry import DEFAULT_ENGINE, engine_class, engine_names, get_engine, register_engine
from doseai.engine.working_grid import body_mask, dose_to_case_grid, to_working_grid, working_geometry

# name -> submodule, imported when the name is first asked for (they import torch or scipy)
_LAZY = {
    "beam_rotation": "beams", "bixel_layout": "beams", "default_beams": "beams", "target_centroid_lps": "beams",
    "target_union": "beams", "BeamSet": "influence", "DoseInfluence": "influence",
    "torch_csr_from_scipy": "influence", "PyDoseRTModel": "pydosert_model",
}


def __getattr__(name: str):
    """The names of :data:`_LAZY`, from their submodule on first use."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "DoseEngine", "DoseEngineError", "EngineOption", "EngineRequirements", "EngineUnavailableError",
    "DEFAULT_ENGINE", "register_engine", "engine_names", "engine_class", "get_engine",
    "PyRadPlanEngine", "PyDoseRTEngine", "working_geometry", "to_working_grid", "dose_to_case_grid", "body_mask",
    *_LAZY,
]
