"""Structure names: canonical names after AAPM TG-263 and a matcher for common aliases.

``canonical_name("Parotid L") == "Parotid_L"``, ``canonical_name("PTV_7000") == "PTV_70"``.
Matching works on the lower-case alphanumeric form of a name, so ``LeftParotid``, ``parotid_lt``
and ``L Parotid`` all match; a user override (raw name -> canonical name, or None to ignore) wins.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from doseai.errors import DoseAIError

# canonical name -> aliases (compact lower-case form); laterality is resolved separately
_MIDLINE_ORGANS: dict[str, tuple[str, ...]] = {
    "Brainstem": ("brainstem",),
    "SpinalCord": ("spinalcord", "cord", "myelon"),
    "Esophagus": ("esophagus", "oesophagus"),
    "Larynx": ("larynx", "glotticlarynx"),
    "Mandible": ("mandible", "mandibula", "jaw"),
    "OralCavity": ("oralcavity",),
    "OpticChiasm": ("opticchiasm", "chiasm"),
    "Brain": ("brain",),
    "External": ("external", "body", "skin", "outline"),
}
_LATERAL_ORGANS: dict[str, tuple[str, ...]] = {
    "Parotid": ("parotid", "parotidgland"),
    "Glnd_Submand": ("submandibular", "submandibulargland", "submand"),
    "Cochlea": ("cochlea",),
    "Eye": ("eye", "globe"),
    "Lens": ("lens",),
    "OpticNrv": ("opticnerve", "opticnrv"),
}
_LEFT = ("l", "lt", "left")
_RIGHT = ("r", "rt", "right")

# Structures the OpenKBP-trained models know, in channel order.
OPENKBP_OARS = ("Brainstem", "SpinalCord", "Parotid_R", "Parotid_L", "Esophagus", "Larynx", "Mandible")
OPENKBP_TARGETS = ("PTV_56", "PTV_63", "PTV_70")

_TARGET_PATTERN = re.compile(r"^(ptv|ctv|gtv|itv)[\s_\-]*(?:high|low|mid)?[\s_\-]*(\d+(?:[.,p]\d+)?)?\s*(c?gy)?", re.I)


def _compact(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _side(remainder: str) -> str | None:
    if remainder in _LEFT:
        return "L"
    if remainder in _RIGHT:
        return "R"
    return None


def prescription_from_name(name: str) -> float | None:
    """Prescription in Gy encoded in a target name (``PTV70``, ``PTV_7000`` in cGy, ``PTV 59.4Gy``), else None."""
    match = _TARGET_PATTERN.match(name.strip())
    if not match or match.group(2) is None:
        return None
    value = float(match.group(2).replace(",", ".").replace("p", "."))
    unit = (match.group(3) or "").lower()
    if unit == "cgy" or (unit != "gy" and value >= 200):
        value /= 100.0
    return value


def is_target(name: str) -> bool:
    return _TARGET_PATTERN.match(name.strip()) is not None


def _target_canonical(name: str) -> str:
    kind = _TARGET_PATTERN.match(name.strip()).group(1).upper()
    dose = prescription_from_name(name)
    return kind if dose is None else f"{kind}_{dose:g}"


def canonical_name(raw: str, overrides: Mapping[str, str | None] | None = None) -> str | None:
    """Canonical TG-263-style name of ``raw``, or None when it is not recognised (or overridden to None)."""
    if overrides and raw in overrides:
        return overrides[raw]
    if is_target(raw):
        return _target_canonical(raw)
    compact = _compact(raw)
    for canonical, aliases in _MIDLINE_ORGANS.items():
        if compact in aliases:
            return canonical
    for stem, aliases in _LATERAL_ORGANS.items():
        for alias in aliases:
            if compact.startswith(alias):
                side = _side(compact[len(alias):])
            elif compact.endswith(alias):
                side = _side(compact[: -len(alias)])
            else:
                continue
            if side:
                return f"{stem}_{side}"
    return None


def match_structures(
    raw_names: Iterable[str], overrides: Mapping[str, str | None] | None = None
) -> dict[str, str]:
    """Map raw names to the names a PlanningCase stores: canonical where recognised, raw otherwise.

    Names overridden to None are left out. Two raw names landing on one canonical name is an error
    that asks for an override, so that no structure is silently dropped.
    """
    mapping: dict[str, str] = {}
    seen: dict[str, str] = {}
    for raw in raw_names:
        if overrides and raw in overrides and overrides[raw] is None:
            continue
        name = canonical_name(raw, overrides) or raw
        if name in seen:
            raise DoseAIError(
                f"structures '{seen[name]}' and '{raw}' both map to '{name}'; "
                "pass an override mapping to say which one is meant"
            )
        seen[name] = raw
        mapping[raw] = name
    return mapping
