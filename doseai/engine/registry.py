"""The dose engines by name: the one place in the code that lists them.

A new engine is its own module with a :class:`~doseai.engine.contract.DoseEngine` subclass, plus one
:func:`register_engine` line below. Importing this module loads no engine library (nor torch).
"""

from __future__ import annotations

from doseai.engine.contract import DoseEngine
from doseai.engine.pydosert_engine import PyDoseRTEngine
from doseai.engine.pyradplan_engine import PyRadPlanEngine

#: The engine used when none is named.
DEFAULT_ENGINE = "pyradplan"

_ENGINES: dict[str, type[DoseEngine]] = {}


def register_engine(cls: type[DoseEngine]) -> type[DoseEngine]:
    """Make ``cls`` available under ``cls.key`` (lower case); returns ``cls``, so it also decorates."""
    if not (isinstance(cls, type) and issubclass(cls, DoseEngine)):
        raise TypeError(f"{cls!r} is not a DoseEngine subclass")
    key = cls.key.lower()
    if _ENGINES.get(key, cls) is not cls:
        raise ValueError(f"a dose engine named '{key}' is registered already ({_ENGINES[key].__name__})")
    _ENGINES[key] = cls
    return cls


def engine_names() -> tuple[str, ...]:
    """The registered engines' names, in registration order (the default first)."""
    return tuple(_ENGINES)


def engine_class(name: str = DEFAULT_ENGINE) -> type[DoseEngine]:
    """The engine class registered as ``name`` (any case); ValueError for an unknown name."""
    try:
        return _ENGINES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dose engine '{name}'; choose one of {sorted(_ENGINES)}") from None


def get_engine(name: str = DEFAULT_ENGINE, **options) -> DoseEngine:
    """A dose engine by name; ``options`` go to its constructor (see ``engine_class(name).options()``)."""
    return engine_class(name)(**options)


register_engine(PyRadPlanEngine)
register_engine(PyDoseRTEngine)
