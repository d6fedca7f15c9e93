"""A model's conditions (the preference sliders) as one named vector, read from its model card.

The card lists them in the order of the network's condition columns (``preference.conditions``: name, label,
abbreviation, range; older cards: ``preference.sliders`` and one shared ``range``). Everything that shows or
takes a condition reads it from here: the predictor (a mapping ``{"oar_sparing": 0.5}``), the CLI options
(``--oar-sparing``), the batch script, the module's sliders, tooltips and parameter node, and the dose node's
provenance attributes (``DoseAI.OarSparing``). A model with a third condition needs no code change.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from doseai.errors import DoseAIError


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


@dataclass(frozen=True)
class Condition:
    """One condition of the network: ``name`` (snake_case, as in the card), what the GUI calls it, the short
    form of the RTDOSE description, its range and neutral value, and the tooltip text."""

    name: str
    label: str
    low: float = -1.0
    high: float = 1.0
    tooltip: str = ""
    abbreviation: str = ""
    neutral: float = 0.0

    @property
    def option(self) -> str:
        """The command-line option: ``--oar-sparing``."""
        return "--" + self.name.replace("_", "-")

    @property
    def keyword(self) -> str:
        """The camelCase name of the Slicer API and parameter node: ``oarSparing``."""
        return _camel(self.name)

    @property
    def attribute(self) -> str:
        """The dose node attribute that records the value: ``DoseAI.OarSparing``."""
        keyword = self.keyword
        return "DoseAI." + keyword[:1].upper() + keyword[1:]

    @property
    def short(self) -> str:
        return self.abbreviation or "".join(part[:1] for part in self.name.split("_")).upper()

    def checked(self, value) -> float:
        """``value`` as a float, or DoseAIError when it is not a finite number within the range."""
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise DoseAIError(f"{self.name} must be a number, got {value!r}") from None
        if not (math.isfinite(number) and self.low <= number <= self.high):
            raise DoseAIError(f"{self.name} must be within [{self.low:g}, {self.high:g}], got {value}")
        return number

    def to_card(self) -> dict:
        return {"name": self.name, "label": self.label, "abbreviation": self.short, "range": [self.low, self.high]}


def _label_of(name: str) -> str:
    return name.replace("_", " ").capitalize()


def _tooltips(text: str, names: Sequence[str], ranges: Sequence[tuple[float, float]]) -> list[str]:
    """Per condition: the clauses of the card's text that start with its name, then those about all of them,
    then its range."""
    clauses = [c.strip() for c in re.split(r"(?<=[.;])\s+", text) if c.strip()]
    general = [c for c in clauses if not any(c.startswith(name) for name in names)]
    tips = []
    for name, (low, high) in zip(names, ranges):
        own = [c.rstrip(";") + "." if c.endswith(";") else c for c in clauses if c.startswith(name)]
        tips.append(" ".join(own + general + [f"Range [{low:g}, {high:g}]."]).replace("..", "."))
    return tips


@dataclass(frozen=True)
class ConditionSpace:
    """The conditions of a model in the order of the network's condition vector."""

    conditions: tuple[Condition, ...]

    @classmethod
    def from_card(cls, card: Mapping) -> ConditionSpace:
        """The conditions of a model card (its ``preference`` section); DoseAIError when it has none."""
        preference = card.get("preference") if isinstance(card, Mapping) else None
        if not isinstance(preference, Mapping):
            raise DoseAIError("the model card has no 'preference' section: the model takes no sliders")
        entries = preference.get("conditions")
        if entries is None:  # cards before the conditions list: names and one shared range
            low, high = preference.get("range", (-1.0, 1.0))
            entries = [{"name": name, "range": [low, high]} for name in preference.get("sliders", [])]
        names = [str(entry["name"]) for entry in entries]
        ranges = [tuple(float(v) for v in entry.get("range", (-1.0, 1.0))) for entry in entries]
        tips = _tooltips(str(preference.get("text", "")), names, ranges)
        return cls(tuple(
            Condition(name, str(entry.get("label") or _label_of(name)), low, high,
                      str(entry.get("text") or tip), str(entry.get("abbreviation", "")))
            for name, entry, (low, high), tip in zip(names, entries, ranges, tips)))

    def __iter__(self) -> Iterator[Condition]:
        return iter(self.conditions)

    def __len__(self) -> int:
        return len(self.conditions)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.conditions]

    def index(self, name: str) -> int:
        """The column of condition ``name`` in the vector."""
        return self.names.index(name)

    def _find(self, key: str) -> Condition:
        for condition in self.conditions:
            if key in (condition.name, condition.keyword):
                return condition
        raise DoseAIError(f"the model has no condition '{key}' (it takes: {', '.join(self.names) or 'none'})")

    def values(self, given: Mapping[str, float] | Sequence[float] | None = None, **named: float) -> dict[str, float]:
        """Every condition's value, checked and in order: from a mapping (snake_case or camelCase names), a
        sequence in the card's order, and/or keywords; the rest stay neutral. DoseAIError names the problem."""
        chosen = {c.name: c.neutral for c in self.conditions}
        if given is not None and not isinstance(given, Mapping):
            given = list(given)
            if len(given) > len(self.conditions):
                raise DoseAIError(f"{len(given)} slider values for a model with {len(self.conditions)} "
                                  f"({', '.join(self.names)})")
            given = dict(zip(self.names, given))
        for key, value in {**(given or {}), **named}.items():
            condition = self._find(key)
            chosen[condition.name] = condition.checked(value)
        return chosen

    def vector(self, values: Mapping[str, float]) -> np.ndarray:
        """The network's condition row (float32, shape (1, n)) of complete ``values`` (see :meth:`values`)."""
        return np.array([[values[name] for name in self.names]], dtype=np.float32)

    def is_neutral(self, values: Mapping[str, float]) -> bool:
        return all(values[c.name] == c.neutral for c in self.conditions)

    def describe(self, values: Mapping[str, float]) -> str:
        """``oar_sparing +0.50, homogeneity +0.00``: for logs and the CLI."""
        return ", ".join(f"{name} {values[name]:+.2f}" for name in self.names)

    def describe_short(self, values: Mapping[str, float]) -> str:
        """``OAR +0.50 HI +0.00``: for the RTDOSE series description (64 characters)."""
        return " ".join(f"{c.short} {values[c.name]:+.2f}" for c in self.conditions)

    def to_card(self) -> list[dict]:
        return [c.to_card() for c in self.conditions]
