"""MRML glue: Slicer nodes <-> :class:`doseai.PlanningCase`, dose volumes that behave like an
imported RTDOSE, DVH table/plot nodes (a reference dose dashed) and isodose-line segmentations.

This is the only part of ``doseai`` that imports ``slicer`` and ``vtk``. It works in the Slicer
application and on ``slicer-core`` (Slicer's MRML and module logics without Qt); it never touches
``slicer.app`` or ``slicer.mrmlScene``: every function takes the scene or the nodes it works on.

Geometry: Slicer volumes hold an IJK-to-RAS matrix; ``doseai`` grids are ITK/LPS (spacing, origin,
row-major direction). The conversion flips the first two rows (RAS <-> LPS).
"""

from doseai.mrml.colors import DOSE_COLOR_TABLE_NAME, structure_color
from doseai.mrml.dose import (
    DOSE_UNIT_NAME_ATTRIBUTE,
    DOSE_UNIT_VALUE_ATTRIBUTE,
    DOSE_VOLUME_ATTRIBUTE,
    create_or_update_dose_node,
    get_or_create_dose_color_table,
    is_dose_volume,
)
from doseai.mrml.isodose import (
    DEFAULT_ISODOSE_LEVELS_PCT,
    isodose_levels,
    isodose_segmentation,
    parse_levels as parse_isodose_levels,
)
from doseai.mrml.nodes import (
    case_from_nodes,
    geometry_from_volume_node,
    ijk_to_ras_matrix,
    nodes_from_case,
    segment_colors,
    set_volume_from_array,
    volume_array,
)
from doseai.mrml.plots import REFERENCE_ATTRIBUTE, STRUCTURE_ATTRIBUTE, metrics_table, show_dvh

__all__ = [
    "DEFAULT_ISODOSE_LEVELS_PCT",
    "DOSE_COLOR_TABLE_NAME",
    "DOSE_UNIT_NAME_ATTRIBUTE",
    "DOSE_UNIT_VALUE_ATTRIBUTE",
    "DOSE_VOLUME_ATTRIBUTE",
    "REFERENCE_ATTRIBUTE",
    "STRUCTURE_ATTRIBUTE",
    "case_from_nodes",
    "create_or_update_dose_node",
    "geometry_from_volume_node",
    "get_or_create_dose_color_table",
    "ijk_to_ras_matrix",
    "is_dose_volume",
    "isodose_levels",
    "isodose_segmentation",
    "metrics_table",
    "nodes_from_case",
    "parse_isodose_levels",
    "segment_colors",
    "set_volume_from_array",
    "show_dvh",
    "structure_color",
    "volume_array",
]
