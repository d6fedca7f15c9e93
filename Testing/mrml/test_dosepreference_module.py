"""The DosePreference module: its Qt-free logic end to end, and the module files' consistency.

Importing ``DosePreference.py`` needs ``slicer.ScriptedLoadableModule`` and
``slicer.parameterNodeWrapper``, which are part of the Slicer application (they import Qt) and are
not in slicer-core. So the logic lives in ``DosePreference/DosePreferenceLib/logic.py`` (importable
here; the module file mixes it into its ``ScriptedLoadableModuleLogic``), as in SlicerNNUnet.
The last tests import the module file with those two Slicer modules replaced by minimal stand-ins
(``slicer_stand_ins``), to check that it loads, that the module's Logic class is the tested one, and
to run the module's self test on slicer-core.
"""

from __future__ import annotations

import ast
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from DosePreferenceLib import SHARED_SESSION, DosePreferenceLogic, missing_packages
from slicer_stand_ins import load_module_file, parameter_names, run_self_test, ui_widgets

from doseai.dvh import compute_dvhs, structure_metrics
from doseai.errors import DoseAIError
from doseai.mrml import create_or_update_dose_node, nodes_from_case

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULES = {"DosePreference": REPO_ROOT / "DosePreference", "DoseOptimizer": REPO_ROOT / "DoseOptimizer"}

pytestmark = pytest.mark.mrml


# --- Qt-free logic -------------------------------------------------------------------------------
def test_compute_dvh_end_to_end(scene, mrml_case):
    ct_node, seg_node, dose_node = nodes_from_case(scene, mrml_case)
    logic = DosePreferenceLogic()
    result = logic.computeDVH(ct_node, seg_node, dose_node)

    voxel_cc = mrml_case.geometry.voxel_volume_mm3 / 1000.0
    expected = compute_dvhs(mrml_case.dose, mrml_case.structures, voxel_cc)
    assert set(result.dvhs) == set(expected) == set(mrml_case.structures)
    for name, dvh in expected.items():
        np.testing.assert_allclose(result.dvhs[name].dose_gy, dvh.dose_gy)
        np.testing.assert_allclose(result.dvhs[name].volume_cc, dvh.volume_cc)
    ptv = structure_metrics(mrml_case.dose, mrml_case.structures["PTV_70"], voxel_cc, prescription_gy=70.0)
    assert {k: result.metrics["PTV_70"][k] for k in ptv} == pytest.approx(ptv, nan_ok=True)
    assert result.metrics["PTV_70"]["V95%"] == pytest.approx(
        100 * np.mean(mrml_case.dose[mrml_case.structures["PTV_70"]] >= 0.95 * 70))
    assert "HI" not in result.metrics["SpinalCord"]
    assert result.emptyStructures == []

    chart, table = result.chartNode, result.metricsTableNode
    assert chart.GetNumberOfPlotSeriesNodes() == len(mrml_case.structures)
    assert table.GetNumberOfRows() == len(mrml_case.structures)
    for index in range(chart.GetNumberOfPlotSeriesNodes()):  # segment colours are used
        series = chart.GetNthPlotSeriesNode(index)
        segmentation = seg_node.GetSegmentation()
        segment_id = segmentation.GetSegmentIdBySegmentName(series.GetAttribute("DoseAI.Structure"))
        segment = segmentation.GetSegment(segment_id)
        np.testing.assert_allclose(series.GetColor(), segment.GetColor())
    assert "11 structures" in result.summary()

    # again: the same chart and table are updated, nothing is duplicated
    classes = ("vtkMRMLPlotChartNode", "vtkMRMLPlotSeriesNode", "vtkMRMLTableNode")
    counts = [scene.GetNumberOfNodesByClass(c) for c in classes]
    again = logic.computeDVH(ct_node, seg_node, dose_node)
    assert again.chartNode is chart and again.metricsTableNode is table
    assert [scene.GetNumberOfNodesByClass(c) for c in classes] == counts

    # a second dose gets its own chart and table
    other = create_or_update_dose_node(scene, mrml_case.dose * 0.9, mrml_case.geometry, "plan B", ctNode=ct_node)
    second = logic.computeDVH(ct_node, seg_node, other)
    assert second.chartNode is not chart and second.metricsTableNode is not table
    assert second.metrics["PTV_70"]["Dmax"] == pytest.approx(0.9 * result.metrics["PTV_70"]["Dmax"], rel=1e-5)


def test_empty_segment_is_reported_not_fatal(scene, mrml_case):
    ct_node, seg_node, dose_node = nodes_from_case(scene, mrml_case)
    seg_node.GetSegmentation().AddEmptySegment("", "Brain")
    result = DosePreferenceLogic().computeDVH(ct_node, seg_node, dose_node)
    assert result.emptyStructures == ["Brain"]
    assert "Brain" in result.summary()
    assert result.chartNode.GetNumberOfPlotSeriesNodes() == len(mrml_case.structures)


def test_inputs_and_defaults(scene, mrml_case):
    logic = DosePreferenceLogic()
    assert logic.defaultInputs(scene) == (None, None, None)
    ct_node, seg_node, dose_node = nodes_from_case(scene, mrml_case)
    scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")  # never picked as CT
    assert logic.defaultInputs(scene) == (ct_node, seg_node, dose_node)
    assert logic.missingInputs(ct_node, seg_node, dose_node) == ""
    assert "CT" in logic.missingInputs(None, seg_node, dose_node)
    assert "segmentation" in logic.missingInputs(ct_node, None, dose_node)
    assert "dose" in logic.missingInputs(ct_node, seg_node, None)
    assert logic.missingInputs(ct_node, seg_node, ct_node)
    with pytest.raises(DoseAIError, match="dose"):
        logic.computeDVH(ct_node, seg_node, None)


def test_missing_packages():
    assert missing_packages() == []  # numpy and SimpleITK are here (and bundled with Slicer)
    assert missing_packages({"numpy": "numpy", "doseai_no_such_module": "no-such-package>=1"}) == ["no-such-package>=1"]


# --- module files --------------------------------------------------------------------------------
def test_dosepreference_ui_matches_module_file():
    module_file = MODULES["DosePreference"] / "DosePreference.py"
    tree = ast.parse(module_file.read_text())
    widgets = ui_widgets(MODULES["DosePreference"] / "Resources/UI/DosePreference.ui")

    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"}
    assert used and used <= set(widgets), f"widgets missing from the .ui: {used - set(widgets)}"

    parameter_class = next(
        n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DosePreferenceParameterNode"
    )
    assert any(getattr(d, "id", None) == "parameterNodeWrapper" for d in parameter_class.decorator_list)
    fields = {n.target.id: ast.unparse(n.annotation) for n in parameter_class.body if isinstance(n, ast.AnnAssign)}
    # every setting is in the parameter node (a saved scene restores the module), typed
    assert fields == {
        "ctVolume": "vtkMRMLScalarVolumeNode", "segmentation": "vtkMRMLSegmentationNode", "structureMapping": "str",
        "outputDose": "vtkMRMLScalarVolumeNode", "doseGridMm": "Annotated[float, WithinRange(0.0, 10.0)]",
        "predictionModel": "Annotated[str, Choice(['preference', 'diffusion'])]",
        "samples": "Annotated[int, WithinRange(2, 32)]", "seed": "Annotated[int, WithinRange(0, 99999)]",
        "spreadVolume": "vtkMRMLScalarVolumeNode", "showIsodose": "bool", "isodoseLevels": "str",
        "isodoseSegmentation": "vtkMRMLSegmentationNode", "referenceDose": "vtkMRMLScalarVolumeNode",
        "dvhChart": "vtkMRMLPlotChartNode", "metricsTable": "vtkMRMLTableNode", "exportFolder": "pathlib.Path"}
    bound = {name: w.get("class") for w in widgets.values() for name in parameter_names(w)}
    assert bound == {"ctVolume": "qMRMLNodeComboBox", "segmentation": "qMRMLNodeComboBox",
                     "outputDose": "qMRMLNodeComboBox", "doseGridMm": "QDoubleSpinBox",
                     "predictionModel": "QComboBox", "samples": "QSpinBox", "seed": "QSpinBox",
                     "showIsodose": "QCheckBox",
                     "referenceDose": "qMRMLNodeComboBox", "exportFolder": "ctkDirectoryButton"}

    # the isodose levels reach the parameter node when editing ends (the Widget connects editingFinished), so the
    # isodose lines are not rebuilt at every keystroke
    assert widgets["isodoseLevelsLineEdit"].get("class") == "QLineEdit"

    def properties(name):
        return {p.get("name"): p[0].text for p in widgets[name].findall("property")}

    # the sliders are built from the model card into this container (Testing/mrml/test_dosepreference_conditions.py)
    assert widgets["slidersWidget"].get("class") == "QWidget"
    # enabled by the Widget only when there is something to do
    for button in ("predictButton", "exportButton", "dvhEditButton", "dvhUndoButton", "dvhResetButton"):
        assert properties(button)["enabled"] == "false"
    buttons = ("QPushButton", "QToolButton", "ctkPushButton")
    push_buttons = [name for name, w in widgets.items() if w.get("class") in buttons]
    assert push_buttons == ["predictButton", "resetButton", "dvhEditButton", "dvhUndoButton", "dvhResetButton",
                            "exportButton"]
    # each button is connected to a handler that exists (a checkable one through toggled)
    source = module_file.read_text()
    for name in push_buttons:
        handler = "on" + name[0].upper() + name[1:]
        signal = "toggled(bool)" if properties(name).get("checkable") == "true" else "clicked(bool)"
        assert f'self.ui.{name}.connect("{signal}", self.{handler})' in source and f"def {handler}(" in source
    root = ET.parse(MODULES["DosePreference"] / "Resources/UI/DosePreference.ui").getroot()
    receivers = {c.findtext("receiver") for c in root.iter("connection")}
    selectors = {name for name, w in widgets.items() if w.get("class") == "qMRMLNodeComboBox"}
    assert receivers == selectors  # every node selector gets the scene


def test_dosepreference_keeps_gui_imports_out_of_the_logic():
    source = (MODULES["DosePreference"] / "DosePreferenceLib" / "logic.py").read_text()
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(source))
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
    assert not imported & {"qt", "ctk", "slicer", "PythonQt"}, imported


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_folder_layout(module):
    folder = MODULES[module]
    for relative in (f"{module}.py", "CMakeLists.txt", f"Resources/UI/{module}.ui", f"Resources/Icons/{module}.png",
                     "Testing/CMakeLists.txt", "Testing/Python/CMakeLists.txt"):
        assert (folder / relative).is_file(), relative
    assert (folder / f"Resources/Icons/{module}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cmake = (folder / "CMakeLists.txt").read_text()
    assert f"set(MODULE_NAME {module})" in cmake and "slicerMacroBuildScriptedModule(" in cmake
    assert "slicer_add_python_unittest(" in (folder / "Testing/Python/CMakeLists.txt").read_text()
    top = (REPO_ROOT / "CMakeLists.txt").read_text()
    assert f"add_subdirectory({module})" in top and 'EXTENSION_CATEGORY "Radiotherapy"' in top


def test_dosepreference_cmake_installs_every_lib_file_and_doseai():
    cmake = (MODULES["DosePreference"] / "CMakeLists.txt").read_text()
    for path in sorted((MODULES["DosePreference"] / "DosePreferenceLib").glob("*.py")):
        assert f"${{MODULE_NAME}}Lib/{path.name}" in cmake, path.name
    assert "Scripts/batch_predict.py" in cmake  # installed next to the module (doseai is found one folder up)
    assert "../doseai" in cmake and "GLOB_RECURSE" in cmake and "DOSEAI_PYTHON_SCRIPTS" in cmake


# --- module files imported with stand-ins for the Qt-dependent Slicer base modules ----------------
def test_dosepreference_module_file_loads_and_its_logic_works(monkeypatch, scene, mrml_case):
    module = load_module_file(monkeypatch, scene, "DosePreference")
    parent = types.SimpleNamespace()
    module.DosePreference(parent)
    assert parent.categories == ["Radiotherapy"] and parent.title == "Dose Preference"
    help_text = " ".join(parent.helpText.split())
    for promise in ("<b>Predict dose</b>", "<i>OAR sparing</i>", "<i>PTV homogeneity</i>", "<i>Reset</i>",
                    "isodose lines", "<i>reference dose</i>", "dashed", "<b>Export</b>", "RTDOSE",
                    "logic.predict(ctNode, segNode, oarSparing=0.5)", "batch_predict.py", "PyTorch extension",
                    "logic.predictor().mirror_average = True"):
        assert promise in help_text, promise
    assert "Not available yet" not in help_text and "Compute DVH" not in help_text

    assert issubclass(module.DosePreferenceLogic, DosePreferenceLogic)
    logic = module.DosePreferenceLogic()
    assert logic.moduleName == "DosePreference" and logic.dvhBinWidthGy == 0.1
    ct_node, seg_node, dose_node = nodes_from_case(scene, mrml_case)
    result = logic.computeDVH(ct_node, seg_node, dose_node)
    assert result.chartNode.GetNumberOfPlotSeriesNodes() == len(mrml_case.structures)


def test_dosepreference_self_test_runs_on_slicer_core(monkeypatch, scene, slider_model):
    """The self test's logic workflow (predict, slider, isodose, export, DVH edit) with the shipped models; its GUI
    part needs the Slicer application and is left out here."""
    monkeypatch.setattr(SHARED_SESSION, "dvhPredictor", SHARED_SESSION.dvhPredictor)  # restored afterwards
    module = load_module_file(monkeypatch, scene, "DosePreference")
    outcome = run_self_test(module.DosePreferenceTest)
    assert outcome.wasSuccessful(), outcome.errors + outcome.failures
    assert outcome.testsRun == 3 and [test._testMethodName for test, _ in outcome.skipped] == ["test_Widget"]


def test_self_test_with_missing_packages_returns_with_a_message(monkeypatch, scene):
    """Slicer's ScriptedLoadableModule.runTest reports a raised SkipTest as an error: a self test whose packages
    are missing says so and returns."""
    import DosePreferenceLib as lib

    module = load_module_file(monkeypatch, scene, "DosePreference")
    monkeypatch.setattr(lib, "missing_packages_for", lambda task: ["torch>=99"] if task == "predict" else [])
    shown = []
    test = module.DosePreferenceTest("runTest")
    monkeypatch.setattr(test, "delayDisplay", lambda message, msec=None: shown.append(message))
    test.runTest()  # returns, raises nothing
    assert shown == ["DosePreferenceTest left out: it needs these packages: torch>=99"]
