"""Structure mapping: segment names -> table rows (canonical name, role, prescription) -> the
``overrides`` and ``prescriptions`` of :meth:`DosePreferenceLogic.predict`, and what is wrong with it.

The Widget shows the rows in a table and stores them in the parameter node as JSON; everything here
is plain Python so that it is tested without Qt.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

TARGET, OAR, BODY, IGNORED = "target", "OAR", "body", "ignored"
ROLES = (TARGET, OAR, BODY, IGNORED)
BODY_NAME = "External"  # the canonical name the model reads the body (possible-dose region) from


@dataclass
class StructureRow:
    """One segment: its name in the segmentation, the structure name the model and reports use, its
    role, and for targets the prescription in Gy (None when unknown)."""

    segment: str
    canonical: str
    role: str
    prescriptionGy: float | None = None


@dataclass
class MappingCheck:
    """``errors`` block prediction; ``notes`` are worth knowing but harmless."""

    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def message(self) -> str:
        return "\n".join(self.errors + self.notes)


def default_row(segment: str) -> StructureRow:
    """The row for a segment nobody edited: matched name, role from the name, prescription from the name."""
    from doseai.structures import canonical_name, is_target, prescription_from_name

    canonical = canonical_name(segment) or segment
    if is_target(canonical):
        return StructureRow(segment, canonical, TARGET, prescription_from_name(canonical))
    return StructureRow(segment, canonical, BODY if canonical == BODY_NAME else OAR)


def structure_rows(segment_names: Iterable[str], previous: Sequence[StructureRow] = ()) -> list[StructureRow]:
    """One row per segment, in segmentation order; a segment the user already edited (same name in
    ``previous``) keeps its row, so edits survive a reload of the segmentation."""
    kept = {row.segment: row for row in previous}
    return [kept.get(name) or default_row(name) for name in segment_names]


def mapping_arguments(rows: Sequence[StructureRow]) -> tuple[dict[str, str | None], dict[str, float]]:
    """``(overrides, prescriptions)`` for ``predict``/``computeDVH``: every segment is overridden
    explicitly (None = left out), so the names in the table are exactly the names used."""
    overrides: dict[str, str | None] = {}
    prescriptions: dict[str, float] = {}
    for row in rows:
        overrides[row.segment] = None if row.role == IGNORED else row.canonical.strip()
        if row.role == TARGET and row.prescriptionGy:
            prescriptions[row.canonical.strip()] = float(row.prescriptionGy)
    return overrides, prescriptions


def check_mapping(rows: Sequence[StructureRow], model_oars: Sequence[str] = ()) -> MappingCheck:
    """What stops a prediction (errors) and what the user should know (notes, e.g. OARs the model
    expects but the segmentation lacks: those are empty model inputs, not a failure)."""
    from doseai.structures import is_target, prescription_from_name

    check = MappingCheck()
    if not rows:
        check.errors.append("The segmentation has no segments.")
        return check
    used: dict[str, str] = {}
    for row in rows:
        if row.role not in ROLES:
            check.errors.append(f"Segment '{row.segment}': unknown role '{row.role}' (use one of {', '.join(ROLES)}).")
            continue
        if row.role == IGNORED:
            continue
        name = row.canonical.strip()
        if not name:
            check.errors.append(f"Segment '{row.segment}': enter a structure name or set its role to ignored.")
            continue
        if name in used:
            check.errors.append(f"Segments '{used[name]}' and '{row.segment}' are both named '{name}'; "
                                "rename one or set one to ignored.")
        used[name] = row.segment
        rx = row.prescriptionGy
        if row.role == TARGET and not (rx is not None and math.isfinite(rx) and rx > 0):
            check.errors.append(f"Target '{name}': enter its prescription in Gy.")
        if row.role != TARGET and is_target(name) and prescription_from_name(name):
            # PlanningCase reads a prescription from such a name, so it would be a target anyway
            check.errors.append(f"'{name}' is named like a target with a prescription; set its role to target "
                                "or ignored, or rename it.")
        if row.role == BODY and name != BODY_NAME:
            check.errors.append(f"Body segment '{row.segment}': name it '{BODY_NAME}'.")
    if not any(row.role == TARGET and row.prescriptionGy for row in rows):
        check.errors.insert(0, "Missing required structure: at least one target (PTV) with a prescription. "
                               "Name a segment like PTV_70, or set its role to target and enter the dose.")
    missing = [name for name in model_oars if name not in used]
    if missing:
        check.notes.append(f"Not in the segmentation (empty model inputs): {', '.join(missing)}.")
    if BODY_NAME not in used:
        check.notes.append("No body (External) segment: the body is taken from the CT (HU > -500).")
    return check


def rows_to_json(rows: Sequence[StructureRow]) -> str:
    return json.dumps([asdict(row) for row in rows])


def rows_from_json(text: str) -> list[StructureRow]:
    """Rows saved by :func:`rows_to_json`; an empty or unreadable text (an old scene) gives no rows."""
    try:
        items = json.loads(text) if text else []
        return [StructureRow(**item) for item in items]
    except (ValueError, TypeError):
        return []
