"""Display colours: a fixed colour per known structure and the rainbow dose colour table's values."""

from __future__ import annotations

import colorsys
import zlib

DOSE_COLOR_TABLE_NAME = "DoseAI_DoseColor"

# RGB in [0, 1]; chosen to be distinguishable over a CT and close to common TPS conventions
_STRUCTURE_COLORS: dict[str, tuple[float, float, float]] = {
    "External": (0.90, 0.70, 0.60),
    "Brainstem": (0.60, 0.20, 0.80),
    "SpinalCord": (1.00, 1.00, 0.00),
    "Parotid_L": (0.00, 0.80, 0.25),
    "Parotid_R": (0.00, 0.55, 1.00),
    "Esophagus": (0.80, 0.50, 0.25),
    "Larynx": (0.00, 0.90, 0.90),
    "Mandible": (0.90, 0.90, 0.75),
    "PTV_70": (1.00, 0.00, 0.00),
    "PTV_63": (1.00, 0.45, 0.00),
    "PTV_56": (1.00, 0.75, 0.20),
}
_TARGET_COLORS = {"PTV": (1.0, 0.15, 0.15), "CTV": (1.0, 0.5, 0.0), "GTV": (0.9, 0.0, 0.6), "ITV": (0.8, 0.3, 0.3)}


def structure_color(name: str) -> tuple[float, float, float]:
    """A stable display colour for a structure name (canonical names get fixed colours)."""
    if name in _STRUCTURE_COLORS:
        return _STRUCTURE_COLORS[name]
    kind = name[:3].upper()
    if kind in _TARGET_COLORS:
        return _TARGET_COLORS[kind]
    hue = (zlib.crc32(name.encode("utf-8")) % 360) / 360.0
    return colorsys.hsv_to_rgb(hue, 0.75, 0.95)


def dose_rainbow(n_colors: int = 256) -> list[tuple[float, float, float]]:
    """Rainbow from blue (low dose) through green and yellow to red (high dose), ``n_colors`` entries."""
    return [colorsys.hsv_to_rgb(0.667 * (1.0 - i / (n_colors - 1)), 1.0, 1.0) for i in range(n_colors)]
