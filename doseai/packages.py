"""The Python packages the Slicer modules' actions need, whether they are installed, and in what order
to install what is missing.

Plain Python (standard library only): the modules' Lib packages import this at load time, before any
missing package is installed. The installing itself (asking the user, running pip) happens in the Slicer
application, see :mod:`doseai.mrml.app`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from collections.abc import Mapping, Sequence

try:  # Slicer's Python has pip, which vendors packaging when the package itself is absent
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version
except ImportError:  # pragma: no cover - depends on the Python at hand
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import InvalidVersion, Version

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
    "threadpoolctl": "threadpoolctl>=3",  # one BLAS thread inside L-BFGS-B (doseai.optimize.fluence_solvers)
}
# PyDoseRT (the comparison dose engine) declares matplotlib, scikit-image, rt-utils and more it never needs
# for dose: installed with --no-deps too, beside what it imports (see doseai.engine.pydosert_engine)
PYDOSERT_REQUIREMENT = "pydosert==1.5.0"
# requirements pip installs without their dependencies (``pip install --no-deps ...``)
NO_DEPS_REQUIREMENTS: tuple[str, ...] = (PYRADPLAN_REQUIREMENT, PYDOSERT_REQUIREMENT)


def installed_version(module: str, requirement: str) -> str | None:
    """The installed version of ``requirement``'s distribution (import name ``module``), or None when the
    module cannot be imported. "" when it can but no version is known (no package metadata, no
    ``__version__``; a Slicer build may bundle a package so)."""
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.metadata.version(Requirement(requirement).name)
    except importlib.metadata.PackageNotFoundError:
        pass
    if not Requirement(requirement).specifier:  # any version will do: do not import it to find out
        return ""
    return str(getattr(importlib.import_module(module), "__version__", ""))


def satisfied(requirement: str, version: str | None) -> bool:
    """True when ``version`` (see :func:`installed_version`) meets ``requirement``; an unknown version of an
    importable package is taken as meeting it (nothing better is known), a missing one never is."""
    if version is None:
        return False
    specifier = Requirement(requirement).specifier
    if not specifier or not version:
        return True
    try:
        return specifier.contains(Version(version.split("+")[0]), prereleases=True)
    except InvalidVersion:
        return True


def missing_packages(required: Mapping[str, str] | None = None) -> list[str]:
    """pip requirements of the packages in ``required`` (import name -> requirement) that are not installed
    or whose installed version does not meet the requirement (e.g. an older torch than
    ``torch>=2.2``)."""
    required = BASE_PACKAGES if required is None else required
    return [requirement for module, requirement in required.items()
            if not satisfied(requirement, installed_version(module, requirement))]


def stale_modules(required: Mapping[str, str]) -> list[str]:
    """The packages of ``required`` this process imported whose installed version has changed since (pip
    upgraded them): the process runs the old code until it restarts."""
    import sys

    stale = []
    for module, requirement in required.items():
        running = getattr(sys.modules.get(module), "__version__", None)
        installed = installed_version(module, requirement) if running else None
        if running and installed and str(running).split("+")[0] != installed.split("+")[0]:
            stale.append(f"{module} {running} -> {installed}")
    return stale


def describe_requirements(required: Mapping[str, str], requirements: Sequence[str]) -> list[str]:
    """One line per requirement for a confirmation dialog: what pip will install, and for an upgrade the
    version installed now ("torch>=2.2 (installed: 2.1.0)")."""
    by_requirement = {requirement: module for module, requirement in required.items()}
    lines = []
    for requirement in requirements:
        module = by_requirement.get(requirement)
        version = installed_version(module, requirement) if module else None
        lines.append(f"{requirement} (installed: {version})" if version else requirement)
    return lines


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
