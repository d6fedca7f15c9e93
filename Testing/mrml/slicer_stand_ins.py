"""Small stand-ins for Qt and the Slicer application, so that a module file (DosePreference.py,
DoseOptimizer.py) loads on slicer-core and its Widget's Python runs: widgets with plain attributes and
signals, a table, a combo box, timers that fire when told, a parameter node wrapper over a real
``vtkMRMLScriptedModuleNode``, ctk sliders and form layouts (the sliders the Widget builds from the model
card), ``slicer.util`` dialogs that answer from a list, and ``slicer.app``.

What they cannot show: real Qt widgets, layouts, dialogs and connectGui. Those need the Slicer
application (each module's self test covers them there).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import pathlib
import sys
import tempfile
import types
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

import slicer

REPO_ROOT = Path(__file__).resolve().parents[2]


# --- Qt ----------------------------------------------------------------------------------------------
class Connectable:
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


class Widget(Connectable):
    """Any widget of the .ui: properties are plain attributes."""

    def __init__(self, name=""):
        super().__init__()
        self.objectName, self.enabled, self.toolTip, self.text, self.visible = name, True, "", "", True
        self.checked = False

    def setMRMLScene(self, scene):
        pass

    def click(self):
        self.emit("clicked(bool)", False)

    def toggle(self):
        """What a user's click on a checkable button does."""
        self.checked = not self.checked
        self.emit("toggled(bool)", self.checked)


class Item:
    def __init__(self, text=""):
        self._text, self._flags = text, Qt.ItemIsEditable | Qt.ItemIsEnabled | Qt.ItemIsSelectable

    def text(self):
        return self._text

    def setText(self, text):
        self._text = text

    def flags(self):
        return self._flags

    def setFlags(self, flags):
        self._flags = flags


class ComboBox(Widget):
    def __init__(self, name=""):
        super().__init__(name)
        self._items, self._index = [], -1

    def addItems(self, items):
        self._items += list(items)
        if self._index < 0 and self._items:
            self.setCurrentIndex(0)

    def clear(self):
        self._items = []
        self.setCurrentIndex(-1)

    @property
    def count(self):
        return len(self._items)

    def setCurrentIndex(self, index):
        changed = index != self._index
        self._index = index
        if changed:
            self.emit("currentIndexChanged(int)", index)

    @property
    def currentText(self):
        return self._items[self._index] if self._index >= 0 else ""

    @property
    def items(self):
        return list(self._items)


class Header:
    visible = True

    def setSectionResizeMode(self, mode):
        pass


class Table(Widget):
    def __init__(self, name):
        super().__init__(name)
        self.rowCount, self._items, self._widgets, self._blocked = 0, {}, {}, False

    def setColumnCount(self, count):
        self.columnCount = count

    def setHorizontalHeaderLabels(self, labels):
        self.headers = labels

    def horizontalHeader(self):
        return Header()

    def verticalHeader(self):
        return Header()

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


class Qt:
    ItemIsSelectable, ItemIsEditable, ItemIsEnabled = 1, 2, 32
    BusyCursor = WaitCursor = 16


pending = []  # QTimer.singleShot(0, ...) callbacks, run by process_events()


class Timer(Connectable):
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
        pending.append(callback)


class SliderWidget(Widget):
    """ctkSliderWidget: setting ``value`` emits valueChanged(double), as the real one does."""

    def __init__(self, name=""):
        super().__init__(name)
        self.decimals, self.singleStep, self.pageStep, self.minimum, self.maximum = 2, 1.0, 1.0, 0.0, 99.0
        self._value = 0.0

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, value):
        value = min(max(float(value), self.minimum), self.maximum)
        if value != self._value:
            self._value = value
            self.emit("valueChanged(double)", value)


class FormLayout:
    """QFormLayout: its rows as (label text or None, widget)."""

    def __init__(self, parent=None):
        self.rows = []
        if parent is not None:
            parent.layout_ = self

    def addRow(self, label, widget=None):
        self.rows.append((label, widget) if widget is not None else (None, label))

    def rowCount(self):
        return len(self.rows)

    def removeRow(self, row):
        self.rows.pop(row)


def ctk_module():
    ctk = types.ModuleType("ctk")
    ctk.ctkSliderWidget = SliderWidget
    return ctk


def process_events():
    while pending:
        pending.pop(0)()


def qt_module():
    qt = types.ModuleType("qt")
    qt.Qt, qt.QTimer, qt.QComboBox, qt.QTableWidgetItem = Qt, Timer, ComboBox, Item
    qt.QFormLayout, qt.QLabel = FormLayout, Widget
    qt.QHeaderView = types.SimpleNamespace(Stretch=1)
    return qt


# --- .ui files ------------------------------------------------------------------------------------------
def ui_widgets(ui_file: Path) -> dict[str, ET.Element]:
    """The widgets of a Qt Designer file by name."""
    root = ET.parse(ui_file).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def parameter_names(widget: ET.Element) -> list[str]:
    """The SlicerParameterName properties of a widget (what connectGui binds it to)."""
    return [p.findtext("string") for p in widget.findall("property") if p.get("name") == "SlicerParameterName"]


# --- Slicer application ------------------------------------------------------------------------------
class WrappedParameters:
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


def base_modules(module_name: str) -> dict[str, types.ModuleType]:
    """``slicer.ScriptedLoadableModule`` and ``slicer.parameterNodeWrapper`` (they import Qt, so
    slicer-core lacks them); the parameter node of a module is one node per scene, as in Slicer."""
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
            return str(REPO_ROOT / module_name / "Resources" / path)

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            super().__init__()
            self.moduleName = self.__class__.__name__.removesuffix("Logic")

        def getParameterNode(self):
            scene = slicer.mrmlScene
            node = scene.GetFirstNodeByName(self.moduleName)
            return node or scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", self.moduleName)

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)

    pnw = types.ModuleType("slicer.parameterNodeWrapper")

    def parameterNodeWrapper(cls):
        def wrap(node):
            return wrappers.setdefault(node.GetID(), WrappedParameters(cls, node))
        return wrap

    pnw.parameterNodeWrapper = parameterNodeWrapper
    pnw.WithinRange = lambda minimum, maximum: (minimum, maximum)
    pnw.Choice = lambda choices: tuple(choices)
    return {"slicer.ScriptedLoadableModule": slm, "slicer.parameterNodeWrapper": pnw}


def application(module_name: str, answers: list, calls: list):
    """``(ui widgets by name, slicer.util functions, slicer.app)``: confirm dialogs answer from
    ``answers`` (and are recorded in ``calls``, as are progress dialogs, views and pip)."""
    widgets = ui_widgets(REPO_ROOT / module_name / f"Resources/UI/{module_name}.ui")
    kinds = {"QTableWidget": Table, "QComboBox": ComboBox}
    ui = {name: kinds.get(w.get("class"), Widget)(name) for name, w in widgets.items()}

    @contextlib.contextmanager
    def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
        yield  # errors fail the test

    def confirm(text, **kwargs):
        calls.append(("confirm", text))
        return answers.pop(0)

    util = {
        "loadUI": lambda path: ui[module_name],
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
                                                       SetActiveTableID=lambda i: calls.append(("table", i))),
        PropagatePlotChartSelection=lambda: None, PropagateTableSelection=lambda: None)
    app = types.SimpleNamespace(processEvents=lambda: None, setOverrideCursor=lambda cursor: None,
                                restoreOverrideCursor=lambda: None, layoutManager=lambda: None,
                                applicationLogic=lambda: app_logic, defaultScenePath=tempfile.gettempdir())
    return ui, util, app


def load_module_file(monkeypatch, scene, module_name: str, gui: bool = False, answers=None, calls=None):
    """Import ``<module_name>/<module_name>.py`` with the stand-ins, ``slicer.mrmlScene`` = ``scene``.
    ``gui``: Qt, ``slicer.util`` dialogs and ``slicer.app`` too (so its Widget runs); without, there is no
    ``slicer.app``, as on slicer-core (its self test then leaves its GUI part out)."""
    modules = base_modules(module_name)
    if gui:
        modules["qt"], modules["ctk"] = qt_module(), ctk_module()
        ui, util, app = application(module_name, answers if answers is not None else [],
                                    calls if calls is not None else [])
        for name, function in util.items():
            monkeypatch.setattr(slicer.util, name, function)
        monkeypatch.setattr(slicer, "app", app, raising=False)
    for name, stand_in in modules.items():
        monkeypatch.setitem(sys.modules, name, stand_in)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    folder = REPO_ROOT / module_name
    monkeypatch.syspath_prepend(str(folder))
    spec = importlib.util.spec_from_file_location(module_name, folder / f"{module_name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, module_name, module)
    spec.loader.exec_module(module)
    pending.clear()
    return module


class ModuleGui:
    """A module file loaded with the GUI stand-ins: ``make_widget()`` sets up a Widget, ``answers`` are
    what the confirm dialogs answer, ``calls`` what the Widget asked of the application; ``close()``
    cleans the Widgets up, as Slicer does when the application closes (no observer outlives a test)."""

    def __init__(self, monkeypatch, scene, module_name: str):
        self.answers, self.calls, self._widgets = [], [], []
        self.module = load_module_file(monkeypatch, scene, module_name, gui=True, answers=self.answers,
                                       calls=self.calls)
        self._widget_class = getattr(self.module, f"{module_name}Widget")

    def make_widget(self):
        widget = self._widget_class()
        widget.setup()
        self._widgets.append(widget)
        return widget

    def close(self) -> None:
        for widget in self._widgets:
            widget.cleanup()


def run_self_test(test_class) -> unittest.TestResult:
    """Run a module's ScriptedLoadableModuleTest class (every test_ method) quietly."""
    return unittest.TextTestRunner(stream=io.StringIO(), verbosity=0).run(
        unittest.defaultTestLoader.loadTestsFromTestCase(test_class))


def finish_worker_update(widget):
    """Let the widget's worker thread finish, then its poll timer picks the result up on the 'main thread'."""
    assert widget._pollTimer.active and widget._pending is not None
    widget._pending._future.result(timeout=60)
    widget._pollTimer.fire()
