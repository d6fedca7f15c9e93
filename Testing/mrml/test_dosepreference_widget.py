"""The DosePreference Widget's Python on slicer-core, with small stand-ins for Qt and the Slicer
application (``slicer_stand_ins``): the mapping table round trip, the Predict button gating, the
debounced slider updates, Reset, the reference dose, the isodose settings and the export overwrite question.

What the stand-ins cannot show: real Qt widgets, layouts, dialogs and connectGui. Those need the Slicer
application (the module's self test ``DosePreferenceTest.test_Widget`` covers them there).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import slicer
import vtk
from DosePreferenceLib import rows_from_json
from slicer_stand_ins import Qt, finish_worker_update, process_events

from doseai.mrml import REFERENCE_ATTRIBUTE, isodose_levels, nodes_from_case

pytestmark = pytest.mark.mrml

MODULE_DIR = Path(__file__).resolve().parents[2] / "DosePreference"


@pytest.fixture(scope="module")
def sample():
    from doseai.sample import make_sample_case

    return make_sample_case(seed=9, shape=(32, 64, 64))


# --- without a model -----------------------------------------------------------------------------------
def test_mapping_table_round_trip_and_predict_gating(preference_gui, scene, sample):
    ct_node, seg_node, dose_node = nodes_from_case(scene, sample)
    widget = preference_gui.make_widget()
    parameters, ui = widget._parameterNode, widget.ui
    # obvious inputs picked; the clinical dose becomes the reference, without computing anything yet
    assert (parameters.ctVolume, parameters.segmentation, parameters.referenceDose) == (ct_node, seg_node, dose_node)
    assert parameters.exportFolder == Path(slicer.app.defaultScenePath) / "DoseAI"
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode") == 0

    table = ui.mappingTable
    assert table.rowCount == len(sample.structures)
    assert [table.item(r, 0).text() for r in range(table.rowCount)] == list(sample.structures)
    assert not table.item(0, 0).flags() & Qt.ItemIsEditable  # the segment column is read-only
    ptv_row = list(sample.structures).index("PTV_70")
    assert table.item(ptv_row, 3).text() == "70" and table.cellWidget(ptv_row, 2).currentText == "target"
    oar_row = list(sample.structures).index("Brainstem")
    assert not table.item(oar_row, 3).flags() & Qt.ItemIsEditable  # no prescription for an OAR
    assert ui.predictButton.enabled and ui.mappingStatusLabel.text == ""
    assert widget.sliders.widgets["oar_sparing"].toolTip == "oar_sparing = w in [-1, 1] spares. 0 = typical. Range [-1, 1]."

    # the user edits a prescription and a name: both land in the parameter node (saved with the scene)
    table.edit(ptv_row, 3, "66,5")
    table.edit(oar_row, 1, "BrainStem_PRV")
    process_events()
    rows = {row.segment: row for row in rows_from_json(parameters.structureMapping)}
    assert rows["PTV_70"].prescriptionGy == 66.5 and rows["Brainstem"].canonical == "BrainStem_PRV"
    assert "Brainstem" in ui.mappingStatusLabel.text  # the model's Brainstem input is now missing: a note

    # every target ignored: Predict is disabled and the warning says why
    for name in ("PTV_70", "PTV_63", "PTV_56"):
        table.cellWidget(list(sample.structures).index(name), 2).setCurrentIndex(3)  # "ignored"
        process_events()
    assert not ui.predictButton.enabled and "Fix the structure table" in ui.predictButton.toolTip
    assert "Missing required structure" in ui.mappingStatusLabel.text and "#c00000" in ui.mappingStatusLabel.text
    # a segment made a target again gets the prescription its name states
    table.cellWidget(list(sample.structures).index("PTV_63"), 2).setCurrentIndex(0)
    process_events()
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


def test_segments_added_later_refresh_the_table(preference_gui, scene, sample):
    _, seg_node, _ = nodes_from_case(scene, sample)
    widget = preference_gui.make_widget()
    seg_node.GetSegmentation().AddEmptySegment("", "z_ring")
    assert widget.ui.mappingTable.rowCount == len(sample.structures) + 1


# --- with the model ------------------------------------------------------------------------------------
def test_predict_sliders_reset_reference_isodose_export(preference_gui, scene, sample, slider_model, tmp_path,
                                                        monkeypatch):
    ct_node, seg_node, reference_node = nodes_from_case(scene, sample)
    widget = preference_gui.make_widget()
    parameters, ui = widget._parameterNode, widget.ui
    predictions = []
    original, original_async = widget.logic.predict, widget.logic.predictAsync
    monkeypatch.setattr(widget.logic, "predict", lambda *a, **k: predictions.append(k) or original(*a, **k))
    monkeypatch.setattr(widget.logic, "predictAsync",
                        lambda *a, **k: predictions.append({**k, "async": tuple(a[2].values())}) or original_async(*a, **k))

    ui.predictButton.click()
    dose_node = parameters.outputDose
    assert dose_node is not None and dose_node.GetAttribute("DoseAI.Model") == slider_model.card["name"]
    assert len(predictions) == 1 and predictions[0]["progress"] is not None and ("progress",) in preference_gui.calls
    layers = {"background": ct_node, "foreground": dose_node, "foregroundOpacity": 0.4}
    assert ("layers", layers) in preference_gui.calls
    chart = parameters.dvhChart
    assert chart.GetNumberOfPlotSeriesNodes() == 2 * len(sample.structures)  # prediction + dashed reference
    assert parameters.metricsTable.GetNumberOfRows() == len(sample.structures)
    assert isodose_levels(parameters.isodoseSegmentation) == [30, 50, 70, 80, 90, 95, 100, 105]
    assert ui.statusLabel.text.startswith("Predicted in") and ui.exportButton.enabled
    assert "oar_sparing = w" in widget.sliders.widgets["oar_sparing"].toolTip  # from the model card

    # slider steps restart the single-shot timer; one prediction runs when it fires
    timer = widget._sliderTimer
    assert timer.interval == 150 and timer.singleShot_
    for value in (0.05, 0.1, 0.15, 0.5):
        widget.sliders.widgets["oar_sparing"].value = value
    assert timer.active and timer.starts == 4 and len(predictions) == 1
    timer.fire()
    assert len(predictions) == 2 and predictions[1]["async"] == (0.5, 0.0)  # live: on the worker thread
    assert ui.statusLabel.text == "Updating the dose..." and dose_node.GetAttribute("DoseAI.OarSparing") == "0"
    finish_worker_update(widget)
    assert not widget._pollTimer.active and widget._pending is None
    assert ui.statusLabel.text.startswith("Predicted in")
    assert parameters.outputDose is dose_node and dose_node.GetAttribute("DoseAI.OarSparing") == "0.5"
    assert parameters.dvhChart is chart and ui.resetButton.enabled

    # a slider that moves while the worker computes: only the latest values are predicted next
    widget.sliders.widgets["oar_sparing"].value = 0.7
    timer.fire()
    widget.sliders.widgets["oar_sparing"].value = 0.8
    timer.fire()
    widget.sliders.widgets["oar_sparing"].value = 0.9
    timer.fire()
    assert len(predictions) == 3 and widget._sliderMovedWhileBusy
    finish_worker_update(widget)  # 0.7 shown, 0.9 started at once
    assert dose_node.GetAttribute("DoseAI.OarSparing") == "0.7" and predictions[-1]["async"] == (0.9, 0.0)
    finish_worker_update(widget)
    assert len(predictions) == 4 and dose_node.GetAttribute("DoseAI.OarSparing") == "0.9"

    ui.resetButton.click()
    assert widget._sliderValues() == {"oar_sparing": 0.0, "homogeneity": 0.0}
    assert [slider.value for slider in widget.sliders.widgets.values()] == [0.0, 0.0]
    timer.fire()
    finish_worker_update(widget)
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
    assert ui.isodoseLevelsLineEdit.text == "50, 100"  # the field shows what the node holds
    # typing changes nothing until editing ends (Enter or focus out)
    ui.isodoseLevelsLineEdit.text = "50, 9"
    ui.isodoseLevelsLineEdit.emit("textChanged(QString)", "50, 9")
    assert isodose_levels(parameters.isodoseSegmentation) == [50, 100] and parameters.isodoseLevels == "50, 100"
    ui.isodoseLevelsLineEdit.text = "50, 90, 100"
    ui.isodoseLevelsLineEdit.emit("editingFinished()")
    assert parameters.isodoseLevels == "50, 90, 100"
    assert isodose_levels(parameters.isodoseSegmentation) == [50, 90, 100]
    parameters.isodoseLevels = "fifty"
    assert "isodose levels" in ui.statusLabel.text
    parameters.showIsodose = False
    assert not parameters.isodoseSegmentation.GetDisplayNode().GetVisibility()

    # export, then the overwrite question: "no" leaves the files, "yes" writes them again
    parameters.exportFolder = tmp_path
    ui.exportButton.click()
    files = sorted(tmp_path.iterdir())
    assert len(files) == 4 and "Exported" in ui.statusLabel.text
    stamps = [f.stat().st_mtime_ns for f in files]
    preference_gui.answers.append(False)
    ui.exportButton.click()
    assert preference_gui.calls[-1][0] == "confirm" and "Overwrite" in preference_gui.calls[-1][1]
    assert [f.stat().st_mtime_ns for f in files] == stamps
    preference_gui.answers.append(True)
    ui.exportButton.click()
    assert [f.stat().st_mtime_ns for f in files] != stamps

    # a slider move after the output dose was changed by hand does not write into another node
    parameters.outputDose = None
    widget.sliders.widgets["homogeneity"].value = 0.3
    timer.fire()
    assert len(predictions) == 5 and widget._pending is None and dose_node.GetAttribute("DoseAI.Homogeneity") == "0"


def test_scene_close_forgets_the_prediction(preference_gui, scene, sample, slider_model):
    nodes_from_case(scene, sample)
    widget = preference_gui.make_widget()
    widget.ui.predictButton.click()
    assert widget._result is not None
    widget.onSceneStartClose(None, vtk.vtkCommand.ModifiedEvent)
    assert widget._result is None and widget._parameterNode is None


def test_packages_are_installed_on_first_use_torch_first(preference_gui, scene, monkeypatch):
    """Missing torch and MONAI: one question lists both; declined, nothing is installed; accepted, torch
    through the PyTorch extension (which does not ask again), then MONAI with pip."""
    import DosePreferenceLib

    widget = preference_gui.make_widget()
    missing = [["torch>=2.2", "monai>=1.4"], []]
    monkeypatch.setattr(DosePreferenceLib, "missing_packages_for", lambda task: missing[0])
    torch_calls = []

    class PyTorchUtilsLogic:
        def torchInstalled(self):
            return True  # an older torch: installed, but not what the requirement asks

        def installTorch(self, askConfirmation, torchVersionRequirement):
            torch_calls.append((askConfirmation, torchVersionRequirement))
            return types.ModuleType("torch")

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    preference_gui.answers.append(False)  # the one question -> no
    assert widget._installPackages("predict") is False
    questions = [call for call in preference_gui.calls if call[0] == "confirm"]
    assert len(questions) == 1 and "torch>=2.2" in questions[0][1] and "monai>=1.4" in questions[0][1]
    assert torch_calls == [] and not any(call[0] == "pip" for call in preference_gui.calls)

    preference_gui.answers.append(True)
    calls = preference_gui.calls
    monkeypatch.setattr(slicer.util, "pip_install", lambda requirements: (calls.append(("pip", requirements)),
                                                                          missing.pop(0)))
    assert widget._installPackages("predict") is True
    assert torch_calls == [(False, ">=2.2")] and ("pip", "monai>=1.4") in preference_gui.calls
    assert len([call for call in preference_gui.calls if call[0] == "confirm"]) == 2  # one per click

    # nothing missing: nothing asked
    asked = len(preference_gui.calls)
    assert widget._installPackages("export") is True and len(preference_gui.calls) == asked


def test_cancel_in_the_progress_dialog_stops_the_prediction(preference_gui, scene, sample, slider_model, monkeypatch):
    """The progress dialog's Cancel is read between steps: the prediction stops, nothing is shown as an error."""
    nodes_from_case(scene, sample)
    widget = preference_gui.make_widget()
    dialogs = []

    def cancelled_dialog(**kwargs):
        dialogs.append(types.SimpleNamespace(wasCanceled=True, close=lambda: None))
        return dialogs[-1]

    monkeypatch.setattr(slicer.util, "createProgressDialog", cancelled_dialog)
    widget.ui.predictButton.click()
    assert dialogs and widget._result is None
    assert widget.ui.statusLabel.text == "Prediction cancelled."
    assert widget._parameterNode.outputDose is None
