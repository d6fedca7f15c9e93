"""MRML glue: Slicer nodes <-> :class:`doseai.PlanningCase`, dose volumes that behave like an
imported RTDOSE, DVH table/plot nodes (a reference dose dashed) and isodose-line segmentations.

This is the only part of ``doseai`` that imports ``slicer`` and ``vtk``. It works in the Slicer
application and on ``slicer-core`` (Slicer's MRML and module logics without Qt); it never touches
``slicer.app`` or ``slicer.mrmlScene``: every function takes the scene or the nodes it works on.
The exception is :mod:`doseai.mrml.app` (not imported here): what the module Widgets share that needs
the application (installing packages, a progress dialog, showing results in the views).
:mod:`doseai.mrml.dicom` reads the DICOM study a CT came from, for exports.

Geometry: Slicer volumes hold an IJK-to-RAS matrix; ``doseai`` grids are ITK/LPS (spacing, origin,
row-major direction). The conversion flips the first two rows (RAS <-> LPS).
"""

from doseai.mrml.case_nodes import nodes_from_case
from doseai.mrml.colors import DOSE_COLOR_TABLE_NAME, structure_color
from doseai.mrml.dose import (
    DOSE_UNIT_NAME_ATTRIBUTE,
    DOSE_UNIT_VALUE_ATTRIBUTE,
    DOSE_VOLUME_ATTRIBUTE,
    SPREAD_ATTRIBUTE,
    create_or_update_dose_node,
    create_or_update_spread_node,
    get_or_create_dose_color_table,
    is_dose_volume,
    missing_inputs,
    scene_inputs,
    segment_names,
)
from doseai.mrml.isodose import (
    DEFAULT_ISODOSE_LEVELS_PCT,
    isodose_levels,
    isodose_segmentation,
    parse_levels as parse_isodose_levels,
    show_isodose_lines,
)
from doseai.mrml.nodes import (
    case_from_nodes,
    dose_on_grid,
    geometry_from_volume_node,
    ijk_to_ras_matrix,
    segment_colors,
    set_volume_from_array,
    volume_array,
)
from doseai.mrml.plots import (
    EDIT_ATTRIBUTE,
    REFERENCE_ATTRIBUTE,
    STRUCTURE_ATTRIBUTE,
    DVHResult,
    editable_curve,
    editable_curve_chart,
    editable_curve_table,
    metrics_table,
    read_curve,
    remove_editable_curve,
    set_point_dragging,
    show_case_dvh,
    show_dvh,
)

__all__ = [
    "DEFAULT_ISODOSE_LEVELS_PCT",
    "DOSE_COLOR_TABLE_NAME",
    "DOSE_UNIT_NAME_ATTRIBUTE",
    "DOSE_UNIT_VALUE_ATTRIBUTE",
    "DOSE_VOLUME_ATTRIBUTE",
    "DVHResult",
    "EDIT_ATTRIBUTE",
    "REFERENCE_ATTRIBUTE",
    "SPREAD_ATTRIBUTE",
    "STRUCTURE_ATTRIBUTE",
    "case_from_nodes",
    "create_or_update_dose_node",
    "create_or_update_spread_node",
    "dose_on_grid",
    "editable_curve",
    "editable_curve_chart",
    "editable_curve_table",
    "geometry_from_volume_node",
    "get_or_create_dose_color_table",
    "ijk_to_ras_matrix",
    "is_dose_volume",
    "isodose_levels",
    "isodose_segmentation",
    "metrics_table",
    "missing_inputs",
    "nodes_from_case",
    "parse_isodose_levels",
    "show_isodose_lines",
    "read_curve",
    "remove_editable_curve",
    "scene_inputs",
    "segment_names",
    "segment_colors",
    "set_point_dragging",
    "set_volume_from_array",
    "show_case_dvh",
    "show_dvh",
    "structure_color",
    "volume_array",
]
