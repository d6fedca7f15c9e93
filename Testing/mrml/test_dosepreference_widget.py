"""The DosePreference Widget's Python on slicer-core, with small stand-ins for Qt and the Slicer
application: the mapping table round trip, the Predict button gating, the debounced slider updates,
Reset, the reference dose, the isodose settings and the export overwrite question.

What the stand-ins cannot show: real Qt widgets, layouts, dialogs and connectGui. Those need the Slicer
application (the module's self test ``DosePreferenceTest.test_Widget`` covers them there).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
import pathlib
import sys
import tempfile
import types
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import slicer
import vtk
from DosePreferenceLib import DosePreferenceLogic, rows_from_json

from doseai.mrml import REFERENCE_ATTRIBUTE, isodose_levels, nodes_from_case
from doseai.structures import OPENKBP_OARS

pytestmark = pytest.mark.mrml

MODULE_DIR = Path(__file__).resolve().parents[2] / "DosePreference"


# --- Qt stand-ins ----------------------------------------------------------------------------------
class _Connectable:
    def __init__(self):
        self._slots = {}

    def connect(self, signal, slot):
        self._slots.setdefault(signal, []).append(slot)

    def emit(self, signal, *args):
        for slot in self._slots.get(signal, []):
            # PythonQt passes a slot only as many of the signal's arguments as it takes
            parameters = inspect.signature(slot).parameters.values()
            if not any(p.kind == p.VAR_POSITIONAL for p in parameters):
                args = args[:len(parameters)]
            slot(*args)


class _Widget(_Connectable):
    """Any widget of the .ui: properties are plain attributes."""

    def __init__(self, name=""):
        super().__init__()
        self.objectName, self.enabled, self.toolTip, self.text, self.visible = name, True, "", "", True

    def setMRMLScene(self, scene):
        pass

    def click(self):
        self.emit("clicked(bool)", False)


class _Item:
    def __init__(self, text=""):
        self._text, self._flags = text, _Qt.ItemIsEditable | _Qt.ItemIsEnabled | _Qt.ItemIsSelectable

    def text(self):
        return self._text

    def setText(self, text):
        self._text = text

    def flags(self):
        return self._flags

    def setFlags(self, flags):
        self._flags = flags


class _ComboBox(_Connectable):
    def __init__(self):
        super().__init__()
        self._items, self._index = [], -1

    def addItems(self, items):
        self._items += list(items)
        self._index = max(self._index, 0)

    def setCurrentIndex(self, index):
        changed = index != self._index
        self._index = index
        if changed:
            self.emit("currentIndexChanged(int)", index)

    @property
    def currentText(self):
        return self._items[self._index]


class _Header:
    visible = True

    def setSectionResizeMode(self, mode):
        pass


class _Table(_Widget):
    def __init__(self, name):
        super().__init__(name)
        self.rowCount, self._items, self._widgets, self._blocked = 0, {}, {}, False

    def setColumnCount(self, count):
        self.columnCount = count

    def setHorizontalHeaderLabels(self, labels):
        self.headers = labels

    def horizontalHeader(self):
        return _Header()

    def verticalHeader(self):
        return _Header()

    def blockSignals(self, block):
        previous, self._blocked = self._blocked, block
        return previous

    def setRowCount(self, count):
        self.rowCount = count

    def setItem(self, row, column, item):
        self._items[row, column] = item

    def item(self, row, column):
        return self._items.get((row, column))

    def setCellWidget(self, row, column, widget):
        self._widgets[row, column] = widget

    def cellWidget(self, row, column):
        return self._widgets.get((row, column))

    def edit(self, row, column, text):
        """What a user's edit does: the item changes, then itemChanged is emitted."""
        self.item(row, column).setText(text)
        if not self._blocked:
            self.emit("itemChanged(QTableWidgetItem*)", self.item(row, column))


class _Qt:
    ItemIsSelectable, ItemIsEditable, ItemIsEnabled = 1, 2, 32
    BusyCursor = WaitCursor = 16


_pending = []  # QTimer.singleShot(0, ...) callbacks, run by _process_events()


class _Timer(_Connectable):
    def __init__(self):
        super().__init__()
        self.active, self.starts, self.singleShot_ = False, 0, False

    def setSingleShot(self, single):
        self.singleShot_ = single

    def setInterval(self, ms):
        self.interval = ms

    def start(self):
        self.active, self.starts = True, self.starts + 1

    def stop(self):
        self.active = False

    def fire(self):
        """The interval passed without another start(): the single shot runs (a repeating timer goes on)."""
        assert self.active
        self.active = not self.singleShot_
        self.emit("timeout()")

    @staticmethod
    def singleShot(ms, callback):
        _pending.append(callback)


def _finish_slider_update(widget):
    """Let the worker thread finish, then the poll timer picks its dose up on the 'main thread'."""
    assert widget._pollTimer.active and widget._pending is not None
    widget._pending._future.result(timeout=60)
    widget._pollTimer.fire()


def _process_events():
    while _pending:
        _pending.pop(0)()


def _qt_module():
    qt = types.ModuleType("qt")
    qt.Qt, qt.QTimer, qt.QComboBox, qt.QTableWidgetItem = _Qt, _Timer, _ComboBox, _Item
    qt.QHeaderView = types.SimpleNamespace(Stretch=1)
    return qt


# --- Slicer application stand-ins --------------------------------------------------------------------
class _WrappedParameters:
    """Typed attributes over a vtkMRMLScriptedModuleNode whose Modified event fires on each change,
    as the parameter node wrapper's does."""

    def __init__(self, cls, node):
        fields = {}
        for name, annotation in cls.__annotations__.items():
            default = getattr(cls, name, None)
            fields[name] = pathlib.Path() if default is None and "Path" in str(annotation) else default
        object.__setattr__(self, "_fields", fields)
        object.__setattr__(self, "parameterNode", node)

    def __getattr__(self, name):
        return self._fields[name]

    def __setattr__(self, name, value):
        assert name in self._fields, name
        if self._fields[name] is not value and self._fields[name] != value:
            self._fields[name] = value
            self.parameterNode.Modified()

    def AddObserver(self, event, callback, priority=0.0):
        return self.parameterNode.AddObserver(event, callback, priority)

    def RemoveObserver(self, tag):
        self.parameterNode.RemoveObserver(tag)

    def connectGui(self, ui):
        return "gui"

    def disconnectGui(self, tag):
        pass


def _stand_ins(scene, answers, calls):
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    wrappers = {}

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent or types.SimpleNamespace(isEntered=True)

        def setup(self):
            self.layout = types.SimpleNamespace(addWidget=lambda widget: None)

        def resourcePath(self, path):
            return str(MODULE_DIR / "Resources" / path)

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            super().__init__()

        def getParameterNode(self):  # one per scene, as in Slicer
            node = scene.GetFirstNodeByName("DosePreference")
            return node or scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "DosePreference")

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic):
        setattr(slm, cls.__name__, cls)
    slm.ScriptedLoadableModuleTest = unittest.TestCase

    pnw = types.ModuleType("slicer.parameterNodeWrapper")

    def parameterNodeWrapper(cls):
        def wrap(node):
            return wrappers.setdefault(node.GetID(), _WrappedParameters(cls, node))
        return wrap

    pnw.parameterNodeWrapper = parameterNodeWrapper
    pnw.WithinRange = lambda minimum, maximum: (minimum, maximum)

    widgets = {w.get("name"): w.get("class") for w in
               ET.parse(MODULE_DIR / "Resources/UI/DosePreference.ui").getroot().iter("widget")}
    ui = {name: (_Table(name) if cls == "QTableWidget" else _Widget(name)) for name, cls in widgets.items()}

    @contextlib.contextmanager
    def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
        yield  # errors fail the test

    def confirm(text, **kwargs):
        calls.append(("confirm", text))
        return answers.pop(0)

    util = {
        "loadUI": lambda path: ui["DosePreference"],
        "childWidgetVariables": lambda widget: types.SimpleNamespace(**ui),
        "tryWithErrorDisplay": tryWithErrorDisplay,
        "createProgressDialog": lambda **kwargs: types.SimpleNamespace(close=lambda: calls.append(("progress",))),
        "confirmYesNoDisplay": confirm,
        "confirmOkCancelDisplay": confirm,
        "setSliceViewerLayers": lambda **kwargs: calls.append(("layers", kwargs)),
        "pip_install": lambda requirements: calls.append(("pip", requirements)),
    }
    app_logic = types.SimpleNamespace(
        GetSelectionNode=lambda: types.SimpleNamespace(SetActivePlotChartID=lambda i: calls.append(("chart", i)),
                                                       SetActiveTableID=lambda i: None),
        PropagatePlotChartSelection=lambda: None, PropagateTableSelection=lambda: None)
    app = types.SimpleNamespace(processEvents=lambda: None, setOverrideCursor=lambda cursor: None,
                                restoreOverrideCursor=lambda: None, layoutManager=lambda: None,
                                applicationLogic=lambda: app_logic, defaultScenePath=tempfile.gettempdir())
    return {"slicer.ScriptedLoadableModule": slm, "slicer.parameterNodeWrapper": pnw, "qt": _qt_module()}, util, app


CARD = {"name": "card", "inputs": {"channels": ["ct", "target_dose", *OPENKBP_OARS, "body", "beam_plate"]},
        "preference": {"sliders": ["oar_sparing", "homogeneity"], "range": [-1, 1],
                       "text": "oar_sparing = w in [-1, 1] spares; homogeneity = h in [-1, 1] evens. 0 = typical."}}


@pytest.fixture
def gui(monkeypatch, scene):
    """(module, widget, answers for confirm dialogs, calls made to the application) on a fresh scene."""
    answers, calls = [], []
    modules, util, app = _stand_ins(scene, answers, calls)
    for name, stand_in in modules.items():
        monkeypatch.setitem(sys.modules, name, stand_in)
    for name, function in util.items():
        monkeypatch.setattr(slicer.util, name, function)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    # the card the Widget reads for tooltips and the model's OARs (the model itself may differ)
    monkeypatch.setattr(DosePreferenceLogic, "modelCard", classmethod(lambda cls, weights=None: CARD))
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.syspath_prepend(str(MODULE_DIR))
    spec = importlib.util.spec_from_file_location("DosePreference", MODULE_DIR / "DosePreference.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "DosePreference", module)
    spec.loader.exec_module(module)
    _pending.clear()

    widgets = []

    def make_widget():
        widget = module.DosePreferenceWidget()
        widget.setup()
        widgets.append(widget)
        return widget

    yield types.SimpleNamespace(module=module, make_widget=make_widget, answers=answers, calls=calls)
    for widget in widgets:  # as Slicer does when the application closes: no observer outlives the test
        widget.cleanup()


@pytest.fixture(scope="module")
def sample():
    from doseai.sample import make_sample_case

    return make_sample_case(seed=9, shape=(32, 64, 64))


# --- without a model -----------------------------------------------------------------------------------
def test_mapping_table_round_trip_and_predict_gating(gui, scene, sample):
    ct_node, seg_node, dose_node = nodes_from_case(scene, sample)
    widget = gui.make_widget()
    parameters, ui = widget._parameterNode, widget.ui
    # obvious inputs picked; the clinical dose becomes the reference, without computing anything yet
    assert (parameters.ctVolume, parameters.segmentation, parameters.referenceDose) == (ct_node, seg_node, dose_node)
    assert parameters.exportFolder == Path(slicer.app.defaultScenePath) / "DoseAI"
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode") == 0

    table = ui.mappingTable
    assert table.rowCount == len(sample.structures)
    assert [table.item(r, 0).text() for r in range(table.rowCount)] == list(sample.structures)
    assert not table.item(0, 0).flags() & _Qt.ItemIsEditable  # the segment column is read-only
    ptv_row = list(sample.structures).index("PTV_70")
    assert table.item(ptv_row, 3).text() == "70" and table.cellWidget(ptv_row, 2).currentText == "target"
    oar_row = list(sample.structures).index("Brainstem")
    assert not table.item(oar_row, 3).flags() & _Qt.ItemIsEditable  # no prescription for an OAR
    assert ui.predictButton.enabled and ui.mappingStatusLabel.text == ""
    assert ui.oarSparingSlider.toolTip == "oar_sparing = w in [-1, 1] spares. 0 = typical. Range [-1, 1]."

    # the user edits a prescription and a name: both land in the parameter node (saved with the scene)
    table.edit(ptv_row, 3, "66,5")
    table.edit(oar_row, 1, "BrainStem_PRV")
    _process_events()
    rows = {row.segment: row for row in rows_from_json(parameters.structureMapping)}
    assert rows["PTV_70"].prescriptionGy == 66.5 and rows["Brainstem"].canonical == "BrainStem_PRV"
    assert "Brainstem" in ui.mappingStatusLabel.text  # the model's Brainstem input is now missing: a note

    # every target ignored: Predict is disabled and the warning says why
    for name in ("PTV_70", "PTV_63", "PTV_56"):
        table.cellWidget(list(sample.structures).index(name), 2).setCurrentIndex(3)  # "ignored"
        _process_events()
    assert not ui.predictButton.enabled and "Fix the structure table" in ui.predictButton.toolTip
    assert "Missing required structure" in ui.mappingStatusLabel.text and "#c00000" in ui.mappingStatusLabel.text
    # a segment made a target again gets the prescription its name states
    table.cellWidget(list(sample.structures).index("PTV_63"), 2).setCurrentIndex(0)
    _process_events()
    assert table.item(list(sample.structures).index("PTV_63"), 3).text() == "63" and ui.predictButton.enabled

    # edits survive leaving and re-entering the module; a renamed segment gets a fresh row
    widget.exit()
    segmentation = seg_node.GetSegmentation()
    segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("Larynx")).SetName("Lt Parotid")
    widget.enter()
    rows = {row.segment: row for row in rows_from_json(parameters.structureMapping)}
    assert rows["PTV_70"].prescriptionGy == 66.5 and "Larynx" not in rows
    assert rows["Lt Parotid"].canonical == "Parotid_L"
    assert "both named 'Parotid_L'" in ui.mappingStatusLabel.text and not ui.predictButton.enabled
    assert not ui.exportButton.enabled  # nothing to export yet

    # the CT as output dose would be overwritten: refused, with the reason on the button
    segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("Lt Parotid")).SetName("Larynx")
    assert ui.predictButton.enabled
    parameters.outputDose = ct_node
    assert not ui.predictButton.enabled and "holds other data" in ui.predictButton.toolTip


def test_segments_added_later_refresh_the_table(gui, scene, sample):
    _, seg_node, _ = nodes_from_case(scene, sample)
    widget = gui.make_widget()
    seg_node.GetSegmentation().AddEmptySegment("", "z_ring")
    assert widget.ui.mappingTable.rowCount == len(sample.structures) + 1


# --- with the model ------------------------------------------------------------------------------------
WEIGHTS = Path(os.environ.get("DOSEAI_TEST_WEIGHTS") or MODULE_DIR.parent / "Resources/Models/dose_preference_v1_1.pt")


@pytest.fixture
def model(monkeypatch):
    pytest.importorskip("torch", reason="torch not installed (pip install -e '.[models]')")
    if not WEIGHTS.is_file():
        pytest.skip(f"model weights not found at {WEIGHTS}")
    monkeypatch.setattr(DosePreferenceLogic, "_predictor", DosePreferenceLogic._predictor)  # restored afterwards
    return DosePreferenceLogic.predictor(weights=WEIGHTS, device="cpu")


def test_predict_sliders_reset_reference_isodose_export(gui, scene, sample, model, tmp_path, monkeypatch):
    ct_node, seg_node, reference_node = nodes_from_case(scene, sample)
    widget = gui.make_widget()
    parameters, ui = widget._parameterNode, widget.ui
    predictions = []
    original, original_async = widget.logic.predict, widget.logic.predictAsync
    monkeypatch.setattr(widget.logic, "predict", lambda *a, **k: predictions.append(k) or original(*a, **k))
    monkeypatch.setattr(widget.logic, "predictAsync",
                        lambda *a, **k: predictions.append({**k, "async": a[2:4]}) or original_async(*a, **k))

    ui.predictButton.click()
    dose_node = parameters.outputDose
    assert dose_node is not None and dose_node.GetAttribute("DoseAI.Model") == model.card["name"]
    assert len(predictions) == 1 and predictions[0]["progress"] is not None and ("progress",) in gui.calls
    assert ("layers", {"background": ct_node, "foreground": dose_node, "foregroundOpacity": 0.4}) in gui.calls
    chart = parameters.dvhChart
    assert chart.GetNumberOfPlotSeriesNodes() == 2 * len(sample.structures)  # prediction + dashed reference
    assert parameters.metricsTable.GetNumberOfRows() == len(sample.structures)
    assert isodose_levels(parameters.isodoseSegmentation) == [30, 50, 70, 80, 90, 95, 100, 105]
    assert ui.statusLabel.text.startswith("Predicted in") and ui.exportButton.enabled
    assert "oar_sparing = w" in ui.oarSparingSlider.toolTip  # from the model card

    # slider steps restart the single-shot timer; one prediction runs when it fires
    timer = widget._sliderTimer
    assert timer.interval == 150 and timer.singleShot_
    for value in (0.05, 0.1, 0.15, 0.5):
        parameters.oarSparing = value
    assert timer.active and timer.starts == 4 and len(predictions) == 1
    timer.fire()
    assert len(predictions) == 2 and predictions[1]["async"] == (0.5, 0.0)  # live: on the worker thread
    assert ui.statusLabel.text == "Updating the dose..." and dose_node.GetAttribute("DoseAI.OarSparing") == "0"
    _finish_slider_update(widget)
    assert not widget._pollTimer.active and widget._pending is None
    assert ui.statusLabel.text.startswith("Predicted in")
    assert parameters.outputDose is dose_node and dose_node.GetAttribute("DoseAI.OarSparing") == "0.5"
    assert parameters.dvhChart is chart and ui.resetButton.enabled

    # a slider that moves while the worker computes: only the latest values are predicted next
    parameters.oarSparing = 0.7
    timer.fire()
    parameters.oarSparing = 0.8
    timer.fire()
    parameters.oarSparing = 0.9
    timer.fire()
    assert len(predictions) == 3 and widget._sliderMovedWhileBusy
    _finish_slider_update(widget)  # 0.7 shown, 0.9 started at once
    assert dose_node.GetAttribute("DoseAI.OarSparing") == "0.7" and predictions[-1]["async"] == (0.9, 0.0)
    _finish_slider_update(widget)
    assert len(predictions) == 4 and dose_node.GetAttribute("DoseAI.OarSparing") == "0.9"

    ui.resetButton.click()
    assert (parameters.oarSparing, parameters.homogeneity) == (0.0, 0.0)
    timer.fire()
    _finish_slider_update(widget)
    assert dose_node.GetAttribute("DoseAI.OarSparing") == "0" and not ui.resetButton.enabled

    # the reference: removed -> dashed curves go; back -> they return
    parameters.referenceDose = None
    assert not any(chart.GetNthPlotSeriesNode(i).GetAttribute(REFERENCE_ATTRIBUTE)
                   for i in range(chart.GetNumberOfPlotSeriesNodes()))
    parameters.referenceDose = reference_node
    assert chart.GetNumberOfPlotSeriesNodes() == 2 * len(sample.structures)

    # isodose settings
    parameters.isodoseLevels = "50, 100"
    assert isodose_levels(parameters.isodoseSegmentation) == [50, 100]
    parameters.isodoseLevels = "fifty"
    assert "isodose levels" in ui.statusLabel.text
    parameters.showIsodose = False
    assert not parameters.isodoseSegmentation.GetDisplayNode().GetVisibility()

    # export, then the overwrite question: "no" leaves the files, "yes" writes them again
    parameters.exportFolder = tmp_path
    ui.exportButton.click()
    files = sorted(tmp_path.iterdir())
    assert len(files) == 3 and "Exported" in ui.statusLabel.text
    stamps = [f.stat().st_mtime_ns for f in files]
    gui.answers.append(False)
    ui.exportButton.click()
    assert gui.calls[-1][0] == "confirm" and "Overwrite" in gui.calls[-1][1]
    assert [f.stat().st_mtime_ns for f in files] == stamps
    gui.answers.append(True)
    ui.exportButton.click()
    assert [f.stat().st_mtime_ns for f in files] != stamps

    # a slider move after the output dose was changed by hand does not write into another node
    parameters.outputDose = None
    parameters.homogeneity = 0.3
    timer.fire()
    assert len(predictions) == 5 and widget._pending is None and dose_node.GetAttribute("DoseAI.Homogeneity") == "0"


def test_scene_close_forgets_the_prediction(gui, scene, sample, model):
    nodes_from_case(scene, sample)
    widget = gui.make_widget()
    widget.ui.predictButton.click()
    assert widget._result is not None
    widget.onSceneStartClose(None, vtk.vtkCommand.ModifiedEvent)
    assert widget._result is None and widget._parameterNode is None


def test_packages_are_installed_on_first_use_torch_first(gui, scene, monkeypatch):
    """Missing torch and MONAI: torch through the PyTorch extension (it asks), then MONAI with pip after asking."""
    import DosePreferenceLib

    widget = gui.make_widget()
    missing = [["torch>=2.2", "monai>=1.4"], []]
    monkeypatch.setattr(DosePreferenceLib, "missing_packages_for", lambda task: missing[0])
    torch_calls = []

    class PyTorchUtilsLogic:
        def torchInstalled(self):
            return False

        def installTorch(self, askConfirmation, torchVersionRequirement):
            torch_calls.append((askConfirmation, torchVersionRequirement))
            return types.ModuleType("torch")

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    gui.answers.append(False)  # "install monai?" -> no
    assert widget._installPackages("predict") is False
    assert torch_calls == [(True, ">=2.2")] and not any(call[0] == "pip" for call in gui.calls)

    gui.answers.append(True)
    monkeypatch.setattr(slicer.util, "pip_install", lambda requirements: (gui.calls.append(("pip", requirements)),
                                                                          missing.pop(0)))
    assert widget._installPackages("predict") is True
    assert ("pip", "monai>=1.4") in gui.calls

    # nothing missing: nothing asked
    asked = len(gui.calls)
    assert widget._installPackages("export") is True and len(gui.calls) == asked
