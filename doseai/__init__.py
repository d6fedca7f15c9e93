"""SlicerDoseAI core: the Qt-free part of the extension.

Arrays follow SimpleITK: ``array[k, j, i]`` (z, y, x); geometry is spacing/origin/direction in LPS, mm.
Dose is in Gy (float32).
"""

from doseai.case import PlanningCase
from doseai.errors import (
    DoseAIError,
    GeometryMismatchError,
    InvalidDoseError,
    MissingPackageError,
    MissingStructureError,
    OutputExistsError,
    UnreadableInputError,
)
from doseai.geometry import ImageGeometry

__all__ = [
    "PlanningCase",
    "ImageGeometry",
    "DoseAIError",
    "GeometryMismatchError",
    "InvalidDoseError",
    "MissingPackageError",
    "MissingStructureError",
    "OutputExistsError",
    "UnreadableInputError",
]
__version__ = "0.1.0"
