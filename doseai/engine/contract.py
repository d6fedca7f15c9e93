"""The contract every dose engine meets, so that the optimizer and the modules never name an engine.

An engine turns a planning case and a beam set into a :class:`~doseai.engine.influence.DoseInfluence` on
its working grid. Besides :meth:`DoseEngine.compute` and :meth:`DoseEngine.working_case` (what the
optimizer calls) and :meth:`DoseEngine.card` (what it models), the class itself says what it is and
needs before anything heavy loads: its registry key, a label and one-line description, its options
(the constructor's typed keyword arguments with their defaults) and its Python packages with an install
hint. This module and the engine modules import only the standard library and numpy at load time, so that
a Slicer module can check and install the packages before torch or the engine library is there.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from doseai.errors import DoseAIError, MissingPackageError

if TYPE_CHECKING:
    from doseai.case import PlanningCase
    from doseai.engine.influence import BeamSet, DoseInfluence


class DoseEngineError(DoseAIError):
    """The engine's library failed on this case or beam set; the message says what to change."""


class EngineUnavailableError(MissingPackageError):
    """Python packages the engine needs are missing or too old; the message says how to install them."""


@dataclass(frozen=True)
class EngineRequirements:
    """What an engine needs installed. ``packages``: import name -> pip requirement (the engine library
    ``library`` included), checked by :func:`doseai.packages.missing_packages`; ``install_hint``: how to
    install them by hand (e.g. libraries that pip must install with ``--no-deps``)."""

    library: str
    packages: Mapping[str, str]
    install_hint: str

    def __post_init__(self) -> None:
        if self.library not in self.packages:
            raise ValueError(f"the requirements name no pip requirement for the engine library '{self.library}'")

    @property
    def library_requirement(self) -> str:
        """The pip requirement of the engine library itself (e.g. ``pyradplan==0.5.0``)."""
        return self.packages[self.library]

    def missing(self) -> list[str]:
        """pip requirements of :attr:`packages` not installed or too old."""
        from doseai.packages import missing_packages

        return missing_packages(self.packages)


@dataclass(frozen=True)
class EngineOption:
    """One keyword argument of an engine's constructor: its name, type (as annotated) and default."""

    name: str
    type: str
    default: Any


class DoseEngine(ABC):
    """Base class of the dose engines. Subclasses set the class attributes, take their options as typed
    keyword arguments with defaults, and implement :meth:`card`, :meth:`working_case` and :meth:`compute`.

    ``key``: the registry name (``get_engine(key)``); ``name``: the model's name, in its card and in
    :attr:`DoseInfluence.engine`; ``label``: how users know it (messages); ``description``: one line."""

    key: ClassVar[str]
    name: ClassVar[str]
    label: ClassVar[str]
    description: ClassVar[str]
    requirements: ClassVar[EngineRequirements]

    @classmethod
    def options(cls) -> dict[str, EngineOption]:
        """The constructor's keyword arguments, typed, with their defaults."""
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
        return {p.name: EngineOption(p.name, str(p.annotation), p.default) for p in parameters
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    @classmethod
    def is_installed(cls) -> bool:
        """Whether the engine library can be imported (found, not imported; versions unchecked)."""
        import importlib.util

        return importlib.util.find_spec(cls.requirements.library) is not None

    @classmethod
    def missing_packages(cls) -> list[str]:
        """pip requirements of this engine that are not installed or too old."""
        return cls.requirements.missing()

    @classmethod
    def check_available(cls) -> None:
        """Raise :class:`EngineUnavailableError` saying how to install what this engine lacks."""
        missing = cls.missing_packages()
        if missing:
            raise EngineUnavailableError(f"The dose engine {cls.label} needs these Python packages: "
                                         f"{', '.join(missing)}. Install them: {cls.requirements.install_hint}")

    @abstractmethod
    def card(self) -> dict:
        """What this engine models and what it does not (JSON-serialisable; ``card()["name"]`` is :attr:`name`)."""

    @abstractmethod
    def working_case(self, case: PlanningCase) -> PlanningCase:
        """``case`` on the grid this engine computes dose on (the rows of its influence matrix)."""

    @abstractmethod
    def compute(self, case: PlanningCase, beams: BeamSet, progress: bool = True) -> DoseInfluence:
        """The dose-influence matrix (working-grid voxels x bixels) of ``beams`` on ``case``; raises
        :class:`DoseEngineError` when the engine's library fails on them."""
