"""Qt-free part of the DosePreference module: importable and testable on slicer-core.

``DosePreference.py`` (the Slicer module file) re-exports :class:`DosePreferenceLogic`, mixed with
``ScriptedLoadableModuleLogic`` for the parameter node.
"""

from doseai.packages import install_plan

from .dvh_editor import DVHEditor
from .dvh_edit import DesiredDVHError, DVHEditSession, check_desired_vector, curve_on_levels
from .export import dicom_reference, export_paths, instance_uids, safe_file_stem
from .mapping_table import fill_mapping_table, mapping_html, rows_from_table, set_up_mapping_table
from .logic import (
    REQUIRED_PACKAGES,
    TASK_PACKAGES,
    TORCH_REQUIREMENT,
    DosePreferenceLogic,
    DVHResult,
    missing_packages,
    missing_packages_for,
)
from .results import PredictionResult, editReportText, model_conditions, model_oars, slider_tooltips
from .sliders import PreferenceSliders, store_values, stored_values
from .session import SHARED_SESSION, CaseInputs, DisplayTargets, PendingPrediction, PredictionSession
from .mapping import (
    ROLES,
    MappingCheck,
    StructureRow,
    check_mapping,
    default_row,
    mapping_arguments,
    rows_from_json,
    rows_to_json,
    structure_rows,
)

__all__ = [
    "REQUIRED_PACKAGES",
    "SHARED_SESSION",
    "ROLES",
    "TASK_PACKAGES",
    "TORCH_REQUIREMENT",
    "CaseInputs",
    "DVHEditSession",
    "DVHEditor",
    "DisplayTargets",
    "DVHResult",
    "DesiredDVHError",
    "DosePreferenceLogic",
    "MappingCheck",
    "PendingPrediction",
    "PredictionResult",
    "PredictionSession",
    "PreferenceSliders",
    "StructureRow",
    "check_desired_vector",
    "check_mapping",
    "curve_on_levels",
    "default_row",
    "dicom_reference",
    "editReportText",
    "export_paths",
    "install_plan",
    "instance_uids",
    "fill_mapping_table",
    "mapping_arguments",
    "mapping_html",
    "missing_packages",
    "missing_packages_for",
    "model_conditions",
    "model_oars",
    "rows_from_json",
    "rows_from_table",
    "rows_to_json",
    "set_up_mapping_table",
    "safe_file_stem",
    "slider_tooltips",
    "store_values",
    "stored_values",
    "structure_rows",
]
