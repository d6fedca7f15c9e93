"""Qt-free part of the DosePreference module: importable and testable on slicer-core.

``DosePreference.py`` (the Slicer module file) re-exports :class:`DosePreferenceLogic`, mixed with
``ScriptedLoadableModuleLogic`` for the parameter node.
"""

from doseai.packages import install_plan

from .dvh_edit import DesiredDVHError, DVHEditSession, check_desired_vector, curve_on_levels
from .export import dicom_reference, export_paths, instance_uids, safe_file_stem
from .logic import (
    REQUIRED_PACKAGES,
    TASK_PACKAGES,
    TORCH_REQUIREMENT,
    DosePreferenceLogic,
    DVHResult,
    PendingPrediction,
    PredictionResult,
    missing_packages,
    missing_packages_for,
    model_oars,
    slider_tooltips,
)
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
    "ROLES",
    "TASK_PACKAGES",
    "TORCH_REQUIREMENT",
    "DVHEditSession",
    "DVHResult",
    "DesiredDVHError",
    "DosePreferenceLogic",
    "MappingCheck",
    "PendingPrediction",
    "PredictionResult",
    "StructureRow",
    "check_desired_vector",
    "check_mapping",
    "curve_on_levels",
    "default_row",
    "dicom_reference",
    "export_paths",
    "install_plan",
    "instance_uids",
    "mapping_arguments",
    "missing_packages",
    "missing_packages_for",
    "model_oars",
    "rows_from_json",
    "rows_to_json",
    "safe_file_stem",
    "slider_tooltips",
    "structure_rows",
]
