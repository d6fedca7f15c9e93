"""Qt-free part of the DosePreference module: importable and testable on slicer-core.

``DosePreference.py`` (the Slicer module file) re-exports :class:`DosePreferenceLogic`, mixed with
``ScriptedLoadableModuleLogic`` for the parameter node.
"""

from .logic import REQUIRED_PACKAGES, DosePreferenceLogic, DVHResult, missing_packages

__all__ = ["REQUIRED_PACKAGES", "DosePreferenceLogic", "DVHResult", "missing_packages"]
