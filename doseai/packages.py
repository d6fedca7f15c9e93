"""The Python packages the Slicer modules' actions need, whether they are installed, and in what order
to install what is missing.

Plain Python (standard library only): the modules' Lib packages import this at load time, before any
missing package is installed. The installing itself (asking the user, running pip) happens in the Slicer
application, see :mod:`doseai.mrml.app`.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping, Sequence

TORCH_REQUIREMENT = "torch>=2.2"
# what every action needs beyond doseai itself (Slicer bundles both)
BASE_PACKAGES: dict[str, str] = {"numpy": "numpy", "SimpleITK": "SimpleITK"}

PYRADPLAN_REQUIREMENT = "pyradplan==0.5.0"
# pyRadPlan's own dependency list drags in ~1.2 GB of packages it never uses for dose (and a pydantic its
# ray serialiser crashes with), so it is installed with --no-deps, next to what its dose engine imports
# and the optimizer uses: import name -> requirement, the "plan" extra of pyproject.toml (a test keeps
# the two the same)
PLAN_PACKAGES: dict[str, str] = {
    "scipy": "scipy>=1.13",
    "pydantic": "pydantic>=2.10,<2.12",
    "pydantic_settings": "pydantic-settings>=2.0,<3",
    "numpydantic": "numpydantic>=1.6.9",
    "array_api_compat": "array_api_compat",
    "array_api_strict": "array_api_strict",
    "array_api_extra": "array_api_extra",
    "array_api": "types-array-api",
    "pymatreader": "pymatreader>=1.0",
    "h5py": "h5py>=3.11",
    "regex": "regex",
    "pint": "pint>=0.24",
    "jinja2": "jinja2",
    "safetensors": "safetensors",
    "numba": "numba>=0.61",
    "threadpoolctl": "threadpoolctl>=3",  # one BLAS thread inside L-BFGS-B (doseai.optimize.fluence)
}
# requirements pip installs without their dependencies (``pip install --no-deps ...``)
NO_DEPS_REQUIREMENTS: tuple[str, ...] = (PYRADPLAN_REQUIREMENT,)


def missing_packages(required: Mapping[str, str] | None = None) -> list[str]:
    """pip requirements of the packages in ``required`` (import name -> requirement) that are not installed."""
    required = BASE_PACKAGES if required is None else required
    return [requirement for module, requirement in required.items() if importlib.util.find_spec(module) is None]


def install_plan(missing: Sequence[str]) -> tuple[bool, list[str]]:
    """``(torch needed, other requirements)``: torch goes first and on its own (through the PyTorch
    extension where present, which picks the CUDA or CPU build), so that pip installing MONAI or
    pyRadPlan's dependencies does not pull a default torch build."""
    others = [requirement for requirement in missing if not re.match(r"^torch(\W|$)", requirement)]
    return len(others) < len(missing), others


def pip_commands(requirements: Sequence[str]) -> list[str]:
    """The ``pip install`` arguments for ``requirements`` (torch excluded, see :func:`install_plan`):
    the ordinary ones together first, then each of :data:`NO_DEPS_REQUIREMENTS` with ``--no-deps``."""
    plain = [r for r in requirements if r not in NO_DEPS_REQUIREMENTS]
    no_deps = [r for r in requirements if r in NO_DEPS_REQUIREMENTS]
    return ([" ".join(plain)] if plain else []) + [f"--no-deps {r}" for r in no_deps]
