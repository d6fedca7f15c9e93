"""Fixtures for MRML tests on slicer-core (Slicer's MRML and module logics as a Python package, no Qt).

slicer-core has no ``slicer.app`` and no ``slicer.mrmlScene``: the ``scene`` fixture builds a
``vtkMRMLScene`` with an application logic and registers the module logics these tests need, the way
the Slicer application does at start-up. The whole folder is skipped when ``slicer`` is not importable.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from doseai.structures import OPENKBP_OARS

try:
    import slicer  # noqa: F401 - the slicer-core meta-package
    from slicer import vtkMRMLScene  # noqa: F401

    SLICER_MISSING = ""
except Exception as exc:  # ImportError, or a broken binary wheel
    SLICER_MISSING = f"MRML tests need slicer-core (pip install 'doseai[test]'); 'import slicer' failed: {exc}"

if SLICER_MISSING:
    # every test module of this folder is reported as skipped with the reason, without importing it

    class _SkippedModule(pytest.Module):
        def collect(self):
            pytest.skip(SLICER_MISSING, allow_module_level=True)

    def pytest_pycollect_makemodule(module_path, parent):
        return _SkippedModule.from_parent(parent, path=module_path)

REPO_ROOT = Path(__file__).resolve().parents[2]
# module folders hold the Qt-free module libraries (DosePreferenceLib, DoseOptimizerLib); the repo root doseai
for folder in (REPO_ROOT, REPO_ROOT / "DosePreference", REPO_ROOT / "DoseOptimizer"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

# module logic name -> class name in slicer-core; a class slicer-core lacks is left out (and listed)
MODULE_LOGICS = {
    "Colors": "vtkSlicerColorLogic",
    "SubjectHierarchy": "vtkSlicerSubjectHierarchyModuleLogic",
    "Volumes": "vtkSlicerVolumesLogic",
    "Segmentations": "vtkSlicerSegmentationsModuleLogic",
    "Tables": "vtkSlicerTablesLogic",
    "Plots": "vtkSlicerPlotsLogic",
}


class SlicerCoreScene:
    """A scene with the application logic and module logics registered on it."""

    def __init__(self) -> None:
        import slicer

        self.scene = slicer.vtkMRMLScene()
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        # vtkSlicerColorLogic reads colour files from <home>/<share>/ColorFiles; slicer-core ships none,
        # so point it at an empty folder (otherwise it logs an error)
        home = Path(tempfile.mkdtemp(prefix="doseai-slicer-core-"))
        (home / "share" / "ColorFiles").mkdir(parents=True)
        self._home = home
        self.app_logic.SetHomeDirectory(str(home))
        self.app_logic.SetShareDirectory("share")
        self.app_logic.SetMRMLScene(self.scene)
        self.logics = {}
        self.unavailable = []
        for name, class_name in MODULE_LOGICS.items():
            logic_class = getattr(slicer, class_name, None)
            if logic_class is None:
                self.unavailable.append(name)
                continue
            logic = logic_class()
            logic.SetMRMLApplicationLogic(self.app_logic)
            if name == "Colors":
                self.app_logic.SetColorLogic(logic)  # as the application does
            logic.SetMRMLScene(self.scene)
            self.app_logic.SetModuleLogic(name, logic)
            self.logics[name] = logic
        if "Colors" not in self.logics:  # the application logic's own colour logic adds the defaults
            self.app_logic.GetColorLogic().SetMRMLScene(self.scene)

    def close(self) -> None:
        self.scene.Clear(True)
        for name in self.logics:
            self.app_logic.SetModuleLogic(name, None)
        self.logics.clear()
        shutil.rmtree(self._home, ignore_errors=True)


@pytest.fixture
def slicer_core():
    """A fresh :class:`SlicerCoreScene` per test."""
    core = SlicerCoreScene()
    yield core
    core.close()


@pytest.fixture
def scene(slicer_core):
    return slicer_core.scene


@pytest.fixture(scope="session")
def mrml_case():
    """A small sample phantom with dose (24 x 48 x 48 voxels)."""
    from doseai.sample import make_sample_case

    return make_sample_case(seed=3, shape=(24, 48, 48))


def _dice(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


@pytest.fixture(scope="session")
def dice():
    """Dice coefficient of two masks (1.0 when both are empty)."""
    return _dice


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def plan_engine():
    """For tests that optimize a plan: skips without torch or pyRadPlan, and runs torch on one thread
    while the test runs (on a 2-core machine busy with other work, the optimizer's sparse products on
    two threads were measured 45x slower than on one: 18 s instead of 0.4 s for 40 iterations)."""
    torch = pytest.importorskip("torch", reason="torch not installed (pip install -e '.[models]')")
    pytest.importorskip("pyRadPlan", reason="pyRadPlan not installed (see README: pip install --no-deps pyradplan)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def slider_model(monkeypatch):
    """The shipped preference (slider) model, loaded into the logic's shared predictor for the test only
    (``DOSEAI_TEST_WEIGHTS`` points at another model, e.g. a throwaway one while it trains)."""
    import os

    pytest.importorskip("torch", reason="torch not installed (pip install -e '.[models]')")
    from DosePreferenceLib import SHARED_SESSION, DosePreferenceLogic

    from doseai.predict import DEFAULT_MODEL

    weights = Path(os.environ.get("DOSEAI_TEST_WEIGHTS") or DEFAULT_MODEL)
    if not weights.is_file():
        pytest.skip(f"model weights not found at {weights}")
    monkeypatch.setattr(SHARED_SESSION, "predictor", SHARED_SESSION.predictor)  # restored afterwards
    return DosePreferenceLogic().predictor(weights=weights, device="cpu")


PREFERENCE_CARD = {"name": "card", "inputs": {"channels": ["ct", "target_dose", *OPENKBP_OARS, "body", "beam_plate"]},
                   "preference": {"sliders": ["oar_sparing", "homogeneity"], "range": [-1, 1],
                                  "text": "oar_sparing = w in [-1, 1] spares; homogeneity = h in [-1, 1] evens. "
                                          "0 = typical."}}


@pytest.fixture
def preference_gui(monkeypatch, scene):
    """The DosePreference module loaded with the GUI stand-ins (make_widget, answers, calls) on a fresh scene."""
    from DosePreferenceLib import DosePreferenceLogic
    from slicer_stand_ins import ModuleGui

    # the card the Widget reads for tooltips and the model's OARs (the model itself may differ)
    monkeypatch.setattr(DosePreferenceLogic, "modelCard", classmethod(lambda cls, weights=None: PREFERENCE_CARD))
    gui = ModuleGui(monkeypatch, scene, "DosePreference")
    yield gui
    gui.close()
