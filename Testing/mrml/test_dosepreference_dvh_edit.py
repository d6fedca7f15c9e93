"""DVH editing in DosePreference: the Qt-free edit session (undo, reset, curve checks), the logic's
prediction from a desired DVH on slicer-core (an array in the model's layout or edited curves; dose node,
chart with the predicted curves solid and the desired ones dashed; clear errors), the draggable curve's
table round trip, the plot view's move-points mode, and the Widget's Edit / Undo / Reset with the GUI
stand-ins. The DVH model is the tiny random one of ``tiny_dvh_model``: the tests check the plumbing, not
what the dose looks like (a lowered curve changes the dose; in which direction is the shipped model's
business, measured by Testing/benchmarks/bench_dvh_edit.py)."""

from __future__ import annotations


import numpy as np
import pytest
import vtk
from DosePreferenceLib import SHARED_SESSION, DesiredDVHError, DosePreferenceLogic, DVHEditSession
from slicer_stand_ins import finish_worker_update
from vtk.util import numpy_support

from doseai.errors import DoseAIError, UnreadableInputError
from doseai.mrml import (
    EDIT_ATTRIBUTE,
    REFERENCE_ATTRIBUTE,
    STRUCTURE_ATTRIBUTE,
    geometry_from_volume_node,
    nodes_from_case,
    volume_array,
)

pytestmark = pytest.mark.mrml

STRUCTURES = ["PTV_70", "Parotid_L", "Cord"]
LEVELS = np.linspace(0.0, 84.0, 8)


def _base():
    return np.vstack([np.linspace(1.0, 0.0, 8), np.linspace(1.0, 0.2, 8) ** 2, np.full(8, 0.5)]).astype(np.float32)


# --- the edit session (pure Python) -----------------------------------------------------------------------
def test_session_edits_undo_and_reset():
    session = DVHEditSession(STRUCTURES, LEVELS, _base(), editable=["Parotid_L", "PTV_70"])
    assert session.editable == ["PTV_70", "Parotid_L"] and session.edited == set() and not session.canUndo
    dose, volume = session.curve("Parotid_L")
    np.testing.assert_allclose(dose, LEVELS)
    np.testing.assert_allclose(volume, 100 * _base()[1], rtol=1e-6)

    lowered = volume * 0.5
    assert session.setCurve("Parotid_L", lowered) is True
    assert session.edited == {"Parotid_L"} and session.canUndo
    # physical: 100 % at 0 Gy, clamped to [0, 100], non-increasing with dose
    np.testing.assert_allclose(session.curve("Parotid_L")[1], [100, *lowered[1:]], rtol=1e-6)
    assert session.setCurve("Parotid_L", session.curve("Parotid_L")[1]) is False  # the same: no undo step
    assert session.setCurve("PTV_70", [100, 150, -5, 90, 80, 80, 20, 30]) is True
    np.testing.assert_allclose(session.curve("PTV_70")[1], [100, 100, 0, 0, 0, 0, 0, 0])
    vector = session.desiredVector()
    vector[:] = 0  # a copy
    assert session.desiredVector()[0, 0] == 1.0

    assert session.reset() is True and session.edited == set()
    np.testing.assert_array_equal(session.desiredVector(), _base())
    assert session.reset() is False  # nothing left to reset
    assert session.undo() is True and session.edited == {"Parotid_L", "PTV_70"}  # the reset is undone
    assert session.undo() is True and session.edited == {"Parotid_L"}
    assert session.undo() is True and session.edited == set() and not session.canUndo
    np.testing.assert_array_equal(session.desiredVector(), _base())
    assert session.undo() is False


def test_session_resamples_points_and_refuses_bad_curves():
    session = DVHEditSession(STRUCTURES, LEVELS, _base(), editable=["Parotid_L", "PTV_70"])
    # a table whose points moved along the dose axis too: resampled onto the model's doses
    assert session.setCurvePoints("Parotid_L", [60.0, 0.0, 30.0], [0.0, 100.0, 50.0]) is True
    np.testing.assert_allclose(session.curve("Parotid_L")[1], np.interp(LEVELS, [0, 30, 60], [100, 50, 0]), atol=1e-4)
    for args, message in [
        (("Brain", [50] * 8), "does not know the structure 'Brain'"),
        (("Cord", [50] * 8), "Cord is not in the segmentation"),
        (("PTV_70", [50] * 7), "needs 8 volumes"),
        (("PTV_70", [50, np.nan, 40, 30, 20, 10, 0, 0]), "NaN"),
    ]:
        with pytest.raises(ValueError, match=message):
            session.setCurve(*args)
    with pytest.raises(DesiredDVHError, match="same dose"):
        session.setCurvePoints("PTV_70", [0, 10, 10], [100, 50, 40])
    with pytest.raises(DesiredDVHError, match="as many doses as volumes"):
        session.setCurvePoints("PTV_70", [0, 10], [100])
    with pytest.raises(DesiredDVHError, match=r"shape \(2, 8\)"):
        DVHEditSession(STRUCTURES, LEVELS, _base()[:2])
    assert session.edited == {"Parotid_L"}  # nothing refused was taken


# --- the logic on slicer-core with the tiny DVH model -------------------------------------------------------
@pytest.fixture(scope="module")
def sample():
    from doseai.sample import make_sample_case

    return make_sample_case(seed=5, shape=(24, 48, 48))


@pytest.fixture
def dvh_model(monkeypatch, tiny_dvh_model):
    """The tiny DVH model loaded as the shared one (restored afterwards)."""
    pytest.importorskip("torch", reason="torch not installed (pip install -e '.[models]')")
    monkeypatch.setattr(SHARED_SESSION, "dvhPredictor", SHARED_SESSION.dvhPredictor)
    DosePreferenceLogic().dvhPredictor(weights=tiny_dvh_model, device="cpu")
    return tiny_dvh_model


def _vector_of(predictor, case, dose):
    from doseai.dvh import dvh_vector

    layout = predictor.card["dvh"]
    return dvh_vector(dose, case.structures, predictor.structures, case.max_prescription, layout["n_points"],
                      layout["max_relative_dose"])


def _series(chart, attribute):
    nodes = [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
    return {node.GetAttribute(attribute): node for node in nodes if node.GetAttribute(attribute)}


def test_predict_from_dvh_array_then_edited_curves(scene, sample, dvh_model):
    ct_node, seg_node, _ = nodes_from_case(scene, sample)
    logic = DosePreferenceLogic()
    predictor = logic.dvhPredictor()
    desired = _vector_of(predictor, sample, sample.dose)  # the clinical plan's DVH as the wish
    steps = []
    result = logic.predictFromDVH(ct_node, seg_node, desired, weights=dvh_model,
                                  progress=lambda text, percent: steps.append(percent))
    assert steps[-1] == 100
    dose_node = result.doseNode
    assert geometry_from_volume_node(dose_node).matches(geometry_from_volume_node(ct_node))
    dose = volume_array(dose_node).copy()
    assert np.isfinite(dose).all() and dose.max() > 0 and np.all(dose[~sample.structures["External"]] == 0)
    assert dose_node.GetAttribute("DicomRtImport.DoseVolume") == "1"
    assert dose_node.GetAttribute("DoseAI.Model") == "tiny_dvh" and dose_node.GetAttribute("DoseAI.OarSparing") is None
    assert dose_node.GetAttribute("DoseAI.Calibration") is None
    assert dose_node.GetAttribute("DoseAI.DesiredDVH") == ", ".join(predictor.structures)
    chart = result.dvh.chartNode
    assert set(_series(chart, STRUCTURE_ATTRIBUTE)) == set(sample.structures)  # predicted: solid
    desired_series = _series(chart, REFERENCE_ATTRIBUTE)  # desired: dashed, every model structure for an array
    assert set(desired_series) == set(predictor.structures)
    assert desired_series["Parotid_L"].GetLineStyle() == desired_series["Parotid_L"].LineStyleDash
    assert desired_series["Parotid_L"].GetName().endswith("Parotid_L (desired)") and "desired" in chart.GetTitle()
    assert result.editedStructures == predictor.structures and set(result.dvhDistancePct) == set(predictor.structures)
    assert result.summary().startswith("Predicted in") and "from the desired DVH" in result.summary()
    np.testing.assert_allclose(result.desiredDVH, desired, atol=1e-6)

    # one curve lowered, the rest from the dose being edited: the dose changes, only Parotid_L is dashed
    levels = predictor.dose_levels_gy()
    row = predictor.structures.index("Parotid_L")
    lowered = 50.0 * desired[row]
    edited = logic.predictFromDVH(ct_node, seg_node, {"Parotid_L": (levels, lowered)}, doseNode=dose_node,
                                  chartNode=chart, metricsTableNode=result.dvh.metricsTableNode)
    assert edited.doseNode is dose_node and edited.dvh.chartNode is chart
    assert not np.array_equal(volume_array(dose_node), dose)
    assert edited.editedStructures == ["Parotid_L"] and list(_series(chart, REFERENCE_ATTRIBUTE)) == ["Parotid_L"]
    np.testing.assert_allclose(edited.desiredDVH[row], lowered / 100, atol=1e-6)
    base = predictor.dvh_vector(dose)  # the others: the DVH of the dose that was edited
    others = [r for r in range(len(predictor.structures)) if r != row]
    np.testing.assert_allclose(edited.desiredDVH[others], base[others], atol=1e-6)
    assert dose_node.GetAttribute("DoseAI.DesiredDVH") == "Parotid_L"
    assert logic._doseDescription(dose_node) == "DoseAI tiny_dvh DVH Parotid_L"


def test_predict_from_dvh_refuses_bad_input_clearly(scene, sample, dvh_model, tmp_path):
    ct_node, seg_node, _ = nodes_from_case(scene, sample)
    logic = DosePreferenceLogic()
    predictor = logic.dvhPredictor()
    good = _vector_of(predictor, sample, sample.dose)
    with pytest.raises(UnreadableInputError, match="DVH model is not found at .*absent.pt"):
        logic.predictFromDVH(ct_node, seg_node, good, weights=tmp_path / "absent.pt")
    assert "dose_dvh_v3.pt" in logic.dvhModelProblem(tmp_path / "absent.pt")
    bad = [
        (good[:3], r"shape \(3, 32\); the DVH model expects \(10, 32\)"),
        (np.where(np.arange(32) == 4, np.nan, good), "NaN or infinite values \\(rows: PTV_70"),
        (good * 100, "volume fractions in \\[0, 1\\].*percent instead of fractions"),
        ({"Brain": ([0, 10], [100, 0])}, "does not know the structure 'Brain'"),
        ({"Parotid_L": ([0, 10, 20], [100, 50])}, "as many doses as volumes"),
        ({"Parotid_L": ([0, 10], [100, np.nan])}, "NaN"),
        ({}, "no curve"),
    ]
    for desired, message in bad:
        with pytest.raises(DoseAIError, match=message):
            logic.predictFromDVH(ct_node, seg_node, desired)
    with pytest.raises(DoseAIError, match="does not know the structure 'Lung'"):
        logic.predictFromDVH(ct_node, seg_node, good, editedStructures=["Lung"])
    with pytest.raises(DoseAIError, match="shape"):  # the asynchronous variant refuses at once, too
        logic.predictFromDVHAsync(ct_node, seg_node, good[:, :5])
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode") == 0  # nothing was shown

    segmentation = seg_node.GetSegmentation()
    segmentation.RemoveSegment(segmentation.GetSegmentIdBySegmentName("Larynx"))
    with pytest.raises(DoseAIError, match="Larynx is not in the segmentation"):
        logic.predictFromDVH(ct_node, seg_node, {"Larynx": ([0, 10], [100, 0])})


def test_predict_from_dvh_async_updates_mrml_only_on_finish(scene, sample, dvh_model):
    ct_node, seg_node, _ = nodes_from_case(scene, sample)
    logic = DosePreferenceLogic()
    desired = _vector_of(logic.dvhPredictor(), sample, sample.dose)
    original = desired.copy()
    start = sample.dose  # every edit changes the dose it starts from (as a DVHEditSession's startDose)
    dose_node = logic.predictFromDVH(ct_node, seg_node, desired, startDose=start).doseNode
    expected = volume_array(dose_node).copy()
    np.testing.assert_allclose(expected, start, atol=1e-3)  # no edit: the start dose itself
    desired[6] *= 0.3
    changed = logic.predictFromDVH(ct_node, seg_node, desired, doseNode=dose_node, startDose=start)
    before = volume_array(dose_node).copy()
    assert not np.array_equal(before, expected)

    pending = logic.predictFromDVHAsync(ct_node, seg_node, original, doseNode=dose_node, startDose=start,
                                        chartNode=changed.dvh.chartNode, editedStructures=["Parotid_L"])
    pending._future.result(timeout=60)
    assert pending.done() and np.array_equal(volume_array(dose_node), before)  # MRML waits for finish()
    result = pending.finish()
    assert result.doseNode is dose_node and result.editedStructures == ["Parotid_L"]
    np.testing.assert_allclose(volume_array(dose_node), expected, atol=1e-5)


def test_desired_curve_table_round_trip_and_move_points_mode(scene, sample, dvh_model):
    ct_node, seg_node, _ = nodes_from_case(scene, sample)
    logic = DosePreferenceLogic()
    predictor = logic.dvhPredictor()
    first = logic.predictFromDVH(ct_node, seg_node, _vector_of(predictor, sample, sample.dose))
    dose_node, chart = first.doseNode, first.dvh.chartNode
    session = logic.dvhEditSession(ct_node, seg_node, dose_node)
    assert session.structures == predictor.structures and session.editable == predictor.structures
    np.testing.assert_allclose(session.baseVector(), predictor.dvh_vector(volume_array(dose_node)), atol=1e-6)

    table = logic.desiredDVHTableNode(chart, session, "Parotid_L", seg_node)
    series = {chart.GetNthPlotSeriesNode(i).GetAttribute(EDIT_ATTRIBUTE): chart.GetNthPlotSeriesNode(i)
              for i in range(chart.GetNumberOfPlotSeriesNodes())}["Parotid_L"]
    assert series.GetTableNode() is table and series.GetMarkerStyle() == series.MarkerStyleCircle
    assert series.GetLineStyle() == series.LineStyleDash
    segment = seg_node.GetSegmentation().GetSegment(seg_node.GetSegmentation().GetSegmentIdBySegmentName("Parotid_L"))
    np.testing.assert_allclose(series.GetColor(), segment.GetColor())
    structure, dose, volume = logic.readDesiredCurve(table)
    assert structure == "Parotid_L"
    np.testing.assert_allclose(dose, session.doseLevelsGy)
    np.testing.assert_allclose(volume, session.curve("Parotid_L")[1])

    # a plot view drags points: the values change in place and the table node reports Modified
    modified = []
    tag = table.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda caller, event: modified.append(event))
    column = numpy_support.vtk_to_numpy(table.GetTable().GetColumnByName("Volume [%]"))
    column[8:] = 0.0
    column[5] = 120.0  # above 100 % and above the points before it
    table.GetTable().Modified()
    assert modified
    assert logic.applyDesiredCurve(session, table) is True and session.edited == {"Parotid_L"}
    _, taken = session.curve("Parotid_L")
    assert np.all(np.diff(taken) <= 1e-4) and taken.max() <= 100.0 and np.all(taken[8:] == 0)
    np.testing.assert_allclose(logic.readDesiredCurve(table)[2], taken, atol=1e-4)  # the table shows what was taken
    assert logic.applyDesiredCurve(session, table) is False  # read again: nothing new
    table.RemoveObserver(tag)

    # another structure reuses the nodes; a dose column moved too is resampled onto the model's doses
    assert logic.desiredDVHTableNode(chart, session, "Parotid_R", seg_node) is table
    assert table.GetAttribute(EDIT_ATTRIBUTE) == "Parotid_R" and series.GetName().endswith("Parotid_R (drag to edit)")
    numpy_support.vtk_to_numpy(table.GetTable().GetColumnByName("Dose [Gy]"))[3] += 1.0
    numpy_support.vtk_to_numpy(table.GetTable().GetColumnByName("Volume [%]"))[3] -= 10.0
    table.GetTable().Modified()
    assert logic.applyDesiredCurve(session, table) is True and session.edited == {"Parotid_L", "Parotid_R"}
    np.testing.assert_allclose(logic.readDesiredCurve(table)[1], session.doseLevelsGy)

    # the plot view showing the chart switches to moving points (vertically), and back to panning
    view = scene.AddNewNodeByClass("vtkMRMLPlotViewNode")
    other = scene.AddNewNodeByClass("vtkMRMLPlotViewNode")
    view.SetPlotChartNodeID(chart.GetID())
    assert logic.setDVHEditMode(chart, True) == 1
    assert view.GetInteractionMode() == view.InteractionModeMovePoints and other.GetInteractionMode() == 0
    assert not view.GetEnablePointMoveAlongX() and view.GetEnablePointMoveAlongY()
    assert not chart.GetEnablePointMoveAlongX() and chart.GetEnablePointMoveAlongY()
    assert logic.setDVHEditMode(chart, False) == 1
    assert view.GetInteractionMode() == view.InteractionModePanView and view.GetEnablePointMoveAlongX()

    # the session's desired DVH predicted: the draggable curve stays in the chart beside the dashed desired ones
    result = logic.predictFromDVH(ct_node, seg_node, session.desiredVector(), doseNode=dose_node, chartNode=chart,
                                  editedStructures=session.edited)
    assert sorted(_series(chart, REFERENCE_ATTRIBUTE)) == ["Parotid_L", "Parotid_R"]
    assert result.editedStructures == ["Parotid_R", "Parotid_L"]  # in the model's order
    assert list(_series(chart, EDIT_ATTRIBUTE)) == ["Parotid_R"]
    logic.removeDesiredDVHCurve(chart)
    assert not _series(chart, EDIT_ATTRIBUTE) and table.GetScene() is None
    with pytest.raises(DoseAIError, match="not a desired-DVH curve"):
        logic.readDesiredCurve(first.dvh.metricsTableNode)


# --- with the shipped preference (slider) model too (fixture slider_model in conftest.py) ------------
def test_curves_without_a_dose_start_from_the_typical_plan(scene, sample, dvh_model, slider_model):
    ct_node, seg_node, _ = nodes_from_case(scene, sample)
    logic = DosePreferenceLogic()
    levels = np.array([0.0, 20.0, 40.0])
    result = logic.predictFromDVH(ct_node, seg_node, {"Parotid_L": (levels, [100.0, 30.0, 0.0])})
    predictor = logic.dvhPredictor()
    typical = predictor.dvh_vector(slider_model.predict(0.0, 0.0))
    row = predictor.structures.index("Parotid_L")
    others = [r for r in range(len(predictor.structures)) if r != row]
    np.testing.assert_allclose(result.desiredDVH[others], typical[others], atol=1e-6)
    np.testing.assert_allclose(result.desiredDVH[row], np.interp(predictor.dose_levels_gy(), levels, [1, 0.3, 0],
                                                                 right=0.0), atol=1e-6)
    # a slider prediction into the same node: the DVH tag goes, the slider tags come
    logic.predict(ct_node, seg_node, oarSparing=0.5, doseNode=result.doseNode)
    assert result.doseNode.GetAttribute("DoseAI.DesiredDVH") is None
    assert result.doseNode.GetAttribute("DoseAI.OarSparing") == "0.5"
    lift = slider_model.calibration.target_lift  # the shipped card's
    assert result.doseNode.GetAttribute("DoseAI.Calibration").startswith(f"target lift {lift:g} (lower targets")


def _drag(table, scale):
    """What a plot view in move-points mode does: volumes change in the table, which reports Modified."""
    column = numpy_support.vtk_to_numpy(table.GetTable().GetColumnByName("Volume [%]"))
    column[1:] *= scale
    table.GetTable().Modified()


def _table_volumes(widget):
    return DosePreferenceLogic.readDesiredCurve(widget.dvhEditor.table)[2]


def test_widget_edit_undo_reset_drive_the_session(preference_gui, scene, sample, dvh_model, slider_model):
    ct_node, seg_node, _ = nodes_from_case(scene, sample)
    widget = preference_gui.make_widget()
    parameters, ui = widget._parameterNode, widget.ui
    assert not ui.dvhEditButton.enabled and ui.dvhEditButton.toolTip == "Predict a dose first"
    ui.predictButton.click()
    dose_node, chart = parameters.outputDose, parameters.dvhChart
    assert ui.dvhEditButton.enabled and not ui.dvhUndoButton.enabled and not ui.dvhResetButton.enabled
    view = scene.AddNewNodeByClass("vtkMRMLPlotViewNode")  # the layout's plot view, showing the DVH chart
    view.SetPlotChartNodeID(chart.GetID())

    ui.dvhEditButton.toggle()
    session = widget.dvhEditor.session
    assert widget.dvhEditor.editing and ui.dvhStructureComboBox.items == session.editable
    assert ui.dvhStructureComboBox.currentText == "Parotid_R"  # the first parotid: the usual thing to spare
    assert view.GetInteractionMode() == view.InteractionModeMovePoints
    assert ("chart", chart.GetID()) in preference_gui.calls
    table = widget.dvhEditor.table
    assert table.GetAttribute(EDIT_ATTRIBUTE) == "Parotid_R" and "Drag the markers" in ui.dvhStatusLabel.text
    ui.dvhStructureComboBox.setCurrentIndex(session.editable.index("Parotid_L"))
    assert widget.dvhEditor.table is table and table.GetAttribute(EDIT_ATTRIBUTE) == "Parotid_L"
    assert not widget.dvhEditor.timer.active  # the module's own writes are no drag

    # a drag: predicted from the desired DVH once the curve rests, on the worker thread
    slider_dose = volume_array(dose_node).copy()
    _drag(table, 0.5)
    assert widget.dvhEditor.timer.active
    widget.dvhEditor.timer.fire()
    assert session.edited == {"Parotid_L"} and widget._pending is not None and widget._pendingSliders is None
    assert ui.statusLabel.text == "Updating the dose from the desired DVH..."
    finish_worker_update(widget)
    assert dose_node.GetAttribute("DoseAI.DesiredDVH") == "Parotid_L" and parameters.outputDose is dose_node
    assert not np.array_equal(volume_array(dose_node), slider_dose)
    assert "Edited: Parotid_L." in ui.dvhStatusLabel.text and "Parotid_L" in widget._result.dvhDistancePct
    assert list(_series(chart, REFERENCE_ATTRIBUTE)) == ["Parotid_L"] and list(_series(chart, EDIT_ATTRIBUTE))
    assert ui.dvhUndoButton.enabled and ui.dvhResetButton.enabled

    # drags while the worker computes: only the latest desired DVH is predicted next
    _drag(table, 0.8)
    widget.dvhEditor.timer.fire()
    first = widget._pending
    _drag(table, 0.8)
    widget.dvhEditor.timer.fire()
    assert widget._pending is first and widget.dvhEditor.changedWhileBusy
    finish_worker_update(widget)
    assert widget._pending is not first and not widget.dvhEditor.changedWhileBusy
    finish_worker_update(widget)
    edited_twice = session.desiredVector()

    # undo: the desired DVH before the last drag, shown in the table and predicted again
    ui.dvhUndoButton.click()
    assert not np.array_equal(session.desiredVector(), edited_twice)
    np.testing.assert_allclose(_table_volumes(widget), session.curve("Parotid_L")[1], atol=1e-4)
    finish_worker_update(widget)
    # reset: no edits left -> the dose before editing (the sliders' prediction) again
    ui.dvhResetButton.click()
    assert session.edited == set() and widget._pendingSliders == (("oar_sparing", 0.0), ("homogeneity", 0.0))
    finish_worker_update(widget)
    np.testing.assert_array_equal(volume_array(dose_node), slider_dose)
    assert dose_node.GetAttribute("DoseAI.DesiredDVH") is None and not ui.dvhResetButton.enabled
    ui.dvhUndoButton.click()  # the reset undone: the edits are back
    assert session.edited == {"Parotid_L"}
    finish_worker_update(widget)
    assert dose_node.GetAttribute("DoseAI.DesiredDVH") == "Parotid_L"

    # Edit off: the plot view pans, the draggable curve goes, the edits stay
    ui.dvhEditButton.toggle()
    assert not widget.dvhEditor.editing and view.GetInteractionMode() == view.InteractionModePanView
    assert not _series(chart, EDIT_ATTRIBUTE) and widget.dvhEditor.session is session
    ui.dvhEditButton.toggle()  # on again: the same session
    assert widget.dvhEditor.session is session and ui.dvhStructureComboBox.currentText == "Parotid_L"

    # a slider move starts over from the sliders: the session and the draggable curve go
    widget.sliders.widgets["oar_sparing"].value = 0.5
    widget._sliderTimer.fire()
    assert widget.dvhEditor.session is None and not widget.dvhEditor.editing and not _series(chart, EDIT_ATTRIBUTE)
    assert "DVH edits discarded" in ui.dvhStatusLabel.text
    finish_worker_update(widget)
    assert dose_node.GetAttribute("DoseAI.OarSparing") == "0.5" and dose_node.GetAttribute("DoseAI.DesiredDVH") is None


def test_widget_says_why_dvh_editing_is_unavailable(preference_gui, scene, sample, slider_model, monkeypatch, tmp_path):
    """No DVH model: the Edit button is disabled with the reason; forced, the status line says it."""
    from doseai import predict

    monkeypatch.setattr(SHARED_SESSION, "dvhPredictor", None)
    monkeypatch.setattr(predict, "DEFAULT_DVH_MODEL", tmp_path / "dose_dvh_v3.pt")
    nodes_from_case(scene, sample)
    widget = preference_gui.make_widget()
    widget.ui.predictButton.click()
    assert not widget.ui.dvhEditButton.enabled and "DVH model is not found" in widget.ui.dvhEditButton.toolTip
    widget.ui.dvhEditButton.toggle()
    assert "DVH editing unavailable" in widget.ui.dvhStatusLabel.text and not widget.ui.dvhEditButton.checked
    assert widget.dvhEditor.session is None and not widget.dvhEditor.editing
