"""DoseOptimizer's Qt-free logic on slicer-core: a desired dose node to a plan dose node with its DVH
beside the desired one, the dose-influence matrix reused for a second mode, objectives, export and the
errors a user can run into. Few beams, 10 mm bixels and 40 iterations keep it to seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import slicer
from DoseOptimizerLib import MODES, OBJECTIVE_FILES, PLAN_MODE_ATTRIBUTE, TASK_PACKAGES, DoseOptimizerLogic

from doseai.errors import DoseAIError, MissingPackageError, MissingStructureError, OutputExistsError
from doseai.geometry import ImageGeometry
from doseai.mrml import (
    DOSE_COLOR_TABLE_NAME,
    REFERENCE_ATTRIBUTE,
    STRUCTURE_ATTRIBUTE,
    create_or_update_dose_node,
    geometry_from_volume_node,
    nodes_from_case,
    volume_array,
)
from doseai.packages import PLAN_PACKAGES, PYRADPLAN_REQUIREMENT
from doseai.resample import resample_to

pytestmark = pytest.mark.mrml

FAST = dict(numberOfBeams=3, bixelWidthMm=10.0, maxIterations=40)


def _series(chart, attribute):
    nodes = [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
    return {node.GetAttribute(attribute): node for node in nodes if node.GetAttribute(attribute)}


@pytest.fixture
def engine_calls(monkeypatch):
    """The dose engine's compute() calls (the engine still runs); the influence cache starts empty."""
    from doseai.engine.pyradplan_engine import PyRadPlanEngine

    calls = []
    compute = PyRadPlanEngine.compute

    def counted(self, case, beams, progress=True):
        calls.append(len(beams.gantry_angles_deg))
        return compute(self, case, beams, progress)

    monkeypatch.setattr(PyRadPlanEngine, "compute", counted)
    DoseOptimizerLogic.clearCache()
    return calls


def test_optimize_twice_reusing_the_influence_matrix_then_export(scene, mrml_case, plan_engine, engine_calls,
                                                                tmp_path):
    ct_node, seg_node, desired_node = nodes_from_case(scene, mrml_case)
    logic = DoseOptimizerLogic()
    first = logic.optimize(ct_node, seg_node, desired_node, numberOfBeams=2, bixelWidthMm=10.0, maxIterations=5)
    assert engine_calls == [2] and not first.influenceReused
    # other beams: the dose engine runs again (and the plan goes into a new dose volume)
    steps = []
    result = logic.optimize(ct_node, seg_node, desired_node, progress=lambda text, percent: steps.append(percent),
                            **FAST)
    assert engine_calls == [2, 3] and not result.influenceReused and result.planDoseNode is not first.planDoseNode
    assert steps[0] == 5 and steps[-1] == 100 and steps == sorted(steps)

    # the plan dose: an RT dose on the CT grid, zero outside the body, under the CT's study
    plan_node = result.planDoseNode
    assert plan_node.GetAttribute("DicomRtImport.DoseVolume") == "1"
    assert plan_node.GetAttribute(PLAN_MODE_ATTRIBUTE) == "mimic"
    assert plan_node.GetAttribute("DoseAI.PlanBeams") == "3"
    assert plan_node.GetAttribute("DoseAI.PlanBixelWidthMm") == "10"
    assert geometry_from_volume_node(plan_node).matches(geometry_from_volume_node(ct_node))
    dose = volume_array(plan_node)
    body = mrml_case.structures["External"]
    assert dose.shape == mrml_case.geometry.shape and np.all(dose[~body] == 0) and dose[body].max() > 0
    np.testing.assert_allclose(dose, result.plan.dose)
    assert plan_node.GetDisplayNode().GetColorNode().GetName() == DOSE_COLOR_TABLE_NAME
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert sh.GetItemParent(sh.GetItemByDataNode(plan_node)) == sh.GetItemParent(sh.GetItemByDataNode(ct_node))
    ptv = mrml_case.structures["PTV_70"]
    assert 0.5 * 70 < np.median(dose[ptv]) < 1.3 * 70  # toward the desired dose, even in 40 iterations

    # one chart: the plan's curves solid, the desired dose's dashed, same colours; the plan's metrics
    chart, table = result.chartNode, result.metricsTableNode
    solid, dashed = _series(chart, STRUCTURE_ATTRIBUTE), _series(chart, REFERENCE_ATTRIBUTE)
    assert set(solid) == set(dashed) == set(mrml_case.structures)
    assert chart.GetNumberOfPlotSeriesNodes() == 2 * len(mrml_case.structures)
    for name in solid:
        assert solid[name].GetLineStyle() == slicer.vtkMRMLPlotSeriesNode.LineStyleSolid
        assert dashed[name].GetLineStyle() == slicer.vtkMRMLPlotSeriesNode.LineStyleDash
        assert dashed[name].GetName().endswith("(desired)")
        np.testing.assert_allclose(dashed[name].GetColor(), solid[name].GetColor())
    assert "dashed: desired" in chart.GetTitle()
    assert table.GetNumberOfRows() == len(mrml_case.structures)
    assert result.dvh.metrics["PTV_70"]["Dmax"] == pytest.approx(float(dose[ptv].max()), abs=1e-3)
    assert result.objectives and {o.structure for o in result.objectives} >= {"PTV_70", "SpinalCord"}
    summary = result.summary()
    assert summary.startswith("Optimized (mimic): 3 beams") and "dashed: desired dose" in summary
    assert set(result.timings) == {"case_s", "engine_s", "optimize_s", "display_s", "total_s"}

    # the other mode, with the desired dose on a coarser grid (resampled): no dose engine run this time
    g = mrml_case.geometry
    coarse = ImageGeometry(shape=(g.shape[0] // 2, g.shape[1] // 2, g.shape[2] // 2),
                           spacing=tuple(2 * s for s in g.spacing), origin=g.origin, direction=g.direction)
    coarse_node = create_or_update_dose_node(scene, resample_to(mrml_case.dose, g, coarse), coarse, "coarse",
                                             ctNode=ct_node)
    counts = [scene.GetNumberOfNodesByClass(c) for c in ("vtkMRMLPlotSeriesNode", "vtkMRMLTableNode")]
    again = logic.optimize(ct_node, seg_node, coarse_node, mode="objectives", planDoseNode=plan_node,
                           chartNode=chart, metricsTableNode=table, **FAST)
    assert engine_calls == [2, 3] and again.influenceReused and again.timings["engine_s"] == 0.0
    assert "dose-influence matrix reused" in again.summary()
    assert again.planDoseNode is plan_node and plan_node.GetAttribute(PLAN_MODE_ATTRIBUTE) == "objectives"
    assert again.chartNode is chart and again.metricsTableNode is table
    assert [scene.GetNumberOfNodesByClass(c) for c in ("vtkMRMLPlotSeriesNode", "vtkMRMLTableNode")] == counts
    assert again.desiredDose.shape == g.shape  # the coarse desired dose, on the CT grid
    assert again.objectives is again.plan.objectives and ("PTV_70", "min DVH") in {
        (o.structure, o.type) for o in again.objectives}
    assert not np.array_equal(volume_array(plan_node), dose)

    # export: every file, then no overwrite without force
    folder = tmp_path / "plan"
    paths = logic.exportPlan(folder)
    names = sorted(path.name for path in paths)
    assert names == sorted(p.name for p in folder.iterdir()) and "RD_plan.dcm" in names and len(names) == 10
    assert all(path.is_file() for path in paths)
    from doseai.io.dicom import read_rtdose

    rtdose, rt_geometry, _ = read_rtdose(folder / "RD_plan.dcm")
    assert rt_geometry.matches(g) and rtdose.max() == pytest.approx(logic.lastPlan.dose.max(), rel=1e-3)
    stamps = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    with pytest.raises(OutputExistsError, match="10 file"):
        logic.exportPlan(folder)
    with pytest.raises(OutputExistsError, match="objectives.json"):
        logic.exportObjectives(folder)
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == stamps
    logic.exportPlan(folder, force=True)
    assert sorted(p.name for p in logic.exportObjectives(tmp_path / "tps")) == sorted(OBJECTIVE_FILES)


def test_clear_errors_before_any_computation(scene, mrml_case, monkeypatch, tmp_path):
    ct_node, seg_node, desired_node = nodes_from_case(scene, mrml_case)
    logic = DoseOptimizerLogic()
    with pytest.raises(DoseAIError, match="Select the desired dose"):
        logic.optimize(ct_node, seg_node, None, **FAST)
    with pytest.raises(DoseAIError, match="Select the CT"):
        logic.optimize(None, seg_node, desired_node, **FAST)
    with pytest.raises(DoseAIError, match="must not be the CT"):
        logic.optimize(ct_node, seg_node, ct_node, **FAST)
    with pytest.raises(DoseAIError, match="holds other data"):
        logic.optimize(ct_node, seg_node, desired_node, planDoseNode=ct_node, **FAST)
    with pytest.raises(DoseAIError, match="must not be the desired dose"):
        logic.optimize(ct_node, seg_node, desired_node, planDoseNode=desired_node, **FAST)
    with pytest.raises(DoseAIError, match="mode 'guess'"):
        logic.optimize(ct_node, seg_node, desired_node, mode="guess", **FAST)
    with pytest.raises(DoseAIError, match="Optimize a plan first"):
        logic.exportPlan(tmp_path)
    with pytest.raises(DoseAIError, match="first"):
        logic.exportObjectives(tmp_path)

    # pyRadPlan missing: the message says how it gets installed
    import DoseOptimizerLib.logic as logic_module

    with monkeypatch.context() as patch:
        patch.setattr(logic_module, "missing_packages",
                      lambda required: [PYRADPLAN_REQUIREMENT] if "pyRadPlan" in required else [])
        with pytest.raises(MissingPackageError) as error:
            logic.optimize(ct_node, seg_node, desired_node, **FAST)
    message = str(error.value)
    assert "pyRadPlan (the dose engine) is not installed" in message and "first click Optimize" in message
    assert "slicer.util.pip_install('--no-deps pyradplan==0.5.0')" in message

    # no target with a prescription: said before the dose engine is started
    assert logic.targetProblem(seg_node) == ""
    segmentation = seg_node.GetSegmentation()
    for index, name in enumerate(("PTV_70", "PTV_63", "PTV_56")):
        segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name)).SetName(f"Boost{index}")
    assert "No target with a prescription" in logic.targetProblem(seg_node)
    assert logic.targetProblem(seg_node, prescriptions={"Boost0": 70.0}) == ""
    with pytest.raises(MissingStructureError, match="no target with a prescription"):
        logic.optimize(ct_node, seg_node, desired_node, **FAST)


def test_objectives_of_any_dose(scene, mrml_case, tmp_path):
    pytest.importorskip("torch", reason="torch not installed (pip install -e '.[models]')")
    ct_node, seg_node, dose_node = nodes_from_case(scene, mrml_case)
    logic = DoseOptimizerLogic()
    objectives = logic.objectives(ct_node, seg_node, dose_node)
    assert logic.lastObjectives is objectives
    kinds = {(o.structure, o.type) for o in objectives}
    assert ("PTV_70", "min DVH") in kinds and ("Parotid_L", "max mean") in kinds and ("SpinalCord", "max") in kinds
    assert not any(o.structure == "External" for o in objectives)
    with pytest.raises(DoseAIError, match="Select the dose"):
        logic.objectives(ct_node, seg_node, None)
    paths = logic.exportObjectives(tmp_path)
    assert sorted(p.name for p in paths) == sorted(OBJECTIVE_FILES)
    with pytest.raises(OutputExistsError, match="2 file"):
        logic.exportObjectives(tmp_path)
    logic.forget()
    assert logic.lastObjectives is None and logic.lastPlan is None


def test_default_inputs_prefer_the_predicted_dose(scene, mrml_case):
    logic = DoseOptimizerLogic()
    assert logic.defaultInputs(scene) == (None, None, None)
    ct_node, seg_node, clinical = nodes_from_case(scene, mrml_case)
    assert logic.defaultInputs(scene) == (ct_node, seg_node, clinical)
    plan = create_or_update_dose_node(scene, mrml_case.dose, mrml_case.geometry, "plan", ctNode=ct_node)
    plan.SetAttribute(PLAN_MODE_ATTRIBUTE, "mimic")
    predicted = create_or_update_dose_node(scene, mrml_case.dose, mrml_case.geometry, "predicted", ctNode=ct_node)
    predicted.SetAttribute("DoseAI.Model", "model")
    assert logic.defaultInputs(scene) == (ct_node, seg_node, predicted)
    assert logic.outputProblem(plan) == "" and logic.outputProblem(None) == ""
    assert "holds other data" in logic.outputProblem(predicted)


def test_packages_per_task_match_pyproject():
    tomllib = pytest.importorskip("tomllib")
    pytest.importorskip("torch", reason="torch not installed (pip install -e '.[models]')")
    extras = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    plan_extra = extras["project"]["optional-dependencies"]["plan"]
    assert sorted(PLAN_PACKAGES.values()) == sorted(plan_extra)
    assert TASK_PACKAGES["optimize"]["pyRadPlan"] == PYRADPLAN_REQUIREMENT == "pyradplan==0.5.0"
    assert set(PLAN_PACKAGES.items()) <= set(TASK_PACKAGES["optimize"].items())
    assert "torch" in TASK_PACKAGES["optimize"] and "pydicom" in TASK_PACKAGES["export"]
    from doseai.optimize.plan import MODES as CORE_MODES

    assert MODES == CORE_MODES
