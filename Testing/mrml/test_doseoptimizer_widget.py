"""The DoseOptimizer Widget's Python on slicer-core, with the stand-ins for Qt and the Slicer application
of ``slicer_stand_ins``: default inputs, the Optimize button's gating, Optimize (progress, views, status),
the second mode reusing the dose-influence matrix, export with the overwrite question, the scene closing,
and the packages installed on first use (pyRadPlan without its dependencies).

What the stand-ins cannot show: real Qt widgets, dialogs and connectGui (``DoseOptimizerTest.test_Widget``
covers them in the Slicer application).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import slicer
import vtk
from DoseOptimizerLib import PLAN_MODE_ATTRIBUTE
from slicer_stand_ins import ModuleGui

from doseai.mrml import nodes_from_case

pytestmark = pytest.mark.mrml


@pytest.fixture
def gui(monkeypatch, scene):
    """The module loaded with the GUI stand-ins (make_widget, answers, calls) on a fresh scene."""
    gui = ModuleGui(monkeypatch, scene, "DoseOptimizer")
    yield gui
    gui.close()


def test_optimize_gating(gui, scene, mrml_case):
    ct_node, seg_node, desired_node = nodes_from_case(scene, mrml_case)
    widget = gui.make_widget()
    parameters, ui = widget._parameterNode, widget.ui
    # the obvious inputs are picked, nothing is computed yet
    assert (parameters.ctVolume, parameters.segmentation, parameters.desiredDose) == (ct_node, seg_node, desired_node)
    assert parameters.exportFolder == Path(slicer.app.defaultScenePath) / "DoseAI" / "plan"
    assert ui.optimizeButton.enabled and ui.optimizeButton.toolTip == "Optimize 9 beams (mimic, lbfgsb from the uniform start) toward the desired dose"
    assert not ui.exportPlanButton.enabled and not ui.exportObjectivesButton.enabled
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode") == 0

    parameters.desiredDose = None
    assert not ui.optimizeButton.enabled and ui.optimizeButton.toolTip.startswith("Select the desired dose")
    parameters.desiredDose = desired_node
    parameters.planDose = ct_node
    assert not ui.optimizeButton.enabled and "holds other data" in ui.optimizeButton.toolTip
    parameters.planDose = None
    segmentation = seg_node.GetSegmentation()
    for index, name in enumerate(("PTV_70", "PTV_63", "PTV_56")):
        segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name)).SetName(f"Boost{index}")
    parameters.numberOfBeams = 5  # any change of the parameters updates the buttons
    assert not ui.optimizeButton.enabled and "No target with a prescription" in ui.optimizeButton.toolTip


def test_optimize_both_modes_export_and_scene_close(gui, scene, mrml_case, plan_engine, tmp_path):
    ct_node, seg_node, desired_node = nodes_from_case(scene, mrml_case)
    widget = gui.make_widget()
    parameters, ui = widget._parameterNode, widget.ui
    parameters.numberOfBeams, parameters.bixelWidthMm = 3, 10.0

    ui.optimizeButton.click()
    plan_node = parameters.planDose
    assert plan_node is not None and plan_node.GetAttribute(PLAN_MODE_ATTRIBUTE) == "mimic"
    assert plan_node.GetAttribute("DoseAI.PlanBeams") == "3"
    chart, table = parameters.dvhChart, parameters.metricsTable
    assert chart.GetNumberOfPlotSeriesNodes() == 2 * len(mrml_case.structures)  # plan + dashed desired
    assert table.GetNumberOfRows() == len(mrml_case.structures)
    assert ("progress",) in gui.calls
    assert ("chart", chart.GetID()) in gui.calls and ("table", table.GetID()) in gui.calls
    assert ("layers", {"background": ct_node, "foreground": plan_node, "foregroundOpacity": 0.4}) in gui.calls
    assert ui.statusLabel.text.startswith("Optimized (mimic): 3 beams")
    assert ui.exportPlanButton.enabled and ui.exportObjectivesButton.enabled

    # the other mode: the same plan dose, chart and table; the dose engine is not run again
    parameters.mode = "objectives"
    assert ui.optimizeButton.toolTip == "Optimize 3 beams (objectives, lbfgsb from the uniform start) toward the desired dose"
    ui.optimizeButton.click()
    assert (parameters.planDose, parameters.dvhChart, parameters.metricsTable) == (plan_node, chart, table)
    assert plan_node.GetAttribute(PLAN_MODE_ATTRIBUTE) == "objectives"
    assert "(dose-influence matrix reused)" in ui.statusLabel.text

    # export, then the overwrite question: "no" leaves the files, "yes" writes them again
    parameters.exportFolder = tmp_path
    ui.exportPlanButton.click()
    files = sorted(tmp_path.iterdir())
    assert len(files) == 10 and ui.statusLabel.text.startswith("Exported plan_dose.nrrd")
    stamps = [f.stat().st_mtime_ns for f in files]
    gui.answers.append(False)
    ui.exportPlanButton.click()
    assert gui.calls[-1][0] == "confirm" and "Overwrite them?" in gui.calls[-1][1]
    assert [f.stat().st_mtime_ns for f in files] == stamps
    gui.answers.append(True)
    ui.exportObjectivesButton.click()  # objectives.json and .csv exist: asked, then written again
    assert "objectives.json" in gui.calls[-1][1] and ui.statusLabel.text.startswith("Exported objectives.json")
    changed = [f.name for f, stamp in zip(files, stamps) if f.stat().st_mtime_ns != stamp]
    assert sorted(changed) == ["objectives.csv", "objectives.json"]

    # the scene closes: the plan is forgotten, nothing to export
    widget.onSceneStartClose(None, vtk.vtkCommand.ModifiedEvent)
    assert widget._parameterNode is None and widget.logic.lastPlan is None
    widget.onSceneEndClose(None, vtk.vtkCommand.ModifiedEvent)
    assert not ui.exportPlanButton.enabled


def test_packages_are_installed_on_first_optimize(gui, scene, mrml_case, monkeypatch):
    """Missing pyRadPlan and one of its dependencies: asked once, then the dependency with pip and pyRadPlan
    with --no-deps; declined: nothing is installed and nothing computed."""
    import DoseOptimizerLib

    nodes_from_case(scene, mrml_case)
    widget = gui.make_widget()
    missing = [["scipy>=1.13", "pyradplan==0.5.0"], []]
    monkeypatch.setattr(DoseOptimizerLib, "missing_packages_for", lambda task: missing[0])

    class Optimized(Exception):
        """Raised by the stand-in optimize: the installing is what is tested here."""

    def optimize(*args, **kwargs):
        raise Optimized(kwargs)

    monkeypatch.setattr(widget.logic, "optimize", optimize)

    gui.answers.append(False)
    widget.ui.optimizeButton.click()  # declined: returns without optimizing
    assert gui.calls[-1][0] == "confirm" and "pyradplan==0.5.0" in gui.calls[-1][1]

    def pip_install(requirements):
        gui.calls.append(("pip", requirements))
        if requirements.startswith("--no-deps"):
            missing.pop(0)

    monkeypatch.setattr(slicer.util, "pip_install", pip_install)
    gui.answers.append(True)
    with pytest.raises(Optimized) as optimized:
        widget.ui.optimizeButton.click()
    assert [call for call in gui.calls if call[0] == "pip"] == [("pip", "scipy>=1.13"),
                                                                ("pip", "--no-deps pyradplan==0.5.0")]
    assert optimized.value.args[0]["numberOfBeams"] == 9 and optimized.value.args[0]["mode"] == "mimic"
    assert optimized.value.args[0]["optimizer"] == "lbfgsb" and optimized.value.args[0]["start"] == "uniform"


def test_the_optimizer_and_start_choices_reach_the_plan(gui, scene, mrml_case, plan_engine):
    nodes_from_case(scene, mrml_case)
    widget = gui.make_widget()
    parameters, ui = widget._parameterNode, widget.ui
    parameters.numberOfBeams, parameters.bixelWidthMm = 3, 10.0
    parameters.mode, parameters.start = "objectives", "generator"  # the generator needs a dose to mimic
    assert not ui.optimizeButton.enabled and "needs mode mimic" in ui.optimizeButton.toolTip
    parameters.mode, parameters.start, parameters.optimizer = "mimic", "uniform", "learned"
    assert ui.optimizeButton.toolTip == "Optimize 3 beams (mimic, learned from the uniform start) toward the desired dose"
    ui.optimizeButton.click()
    plan = widget.logic.lastPlan
    assert plan.settings.solver == "learned" and plan.start == "uniform"
    assert plan.fluence.iterations <= plan.settings.max_iterations == 30  # the learned optimizer's trained steps
