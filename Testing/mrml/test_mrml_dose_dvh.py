"""Dose volume nodes (RT attributes, colour table, subject hierarchy) and DVH table/plot nodes."""

from __future__ import annotations

import numpy as np
import pytest
import slicer
from vtk.util import numpy_support

from doseai.dvh import compute_dvhs, structure_metrics
from doseai.errors import InvalidDoseError
from doseai.mrml import (
    DOSE_COLOR_TABLE_NAME,
    DOSE_VOLUME_ATTRIBUTE,
    create_or_update_dose_node,
    is_dose_volume,
    metrics_table,
    nodes_from_case,
    show_dvh,
    structure_color,
    volume_array,
)
from doseai.mrml.plots import DOSE_COLUMN, EDIT_ATTRIBUTE, VOLUME_CC_COLUMN, VOLUME_PCT_COLUMN, editable_curve

pytestmark = pytest.mark.mrml


def _column(table_node, name: str) -> np.ndarray:
    return numpy_support.vtk_to_numpy(table_node.GetTable().GetColumnByName(name)).copy()


def _count(scene, class_name: str) -> int:
    return scene.GetNumberOfNodesByClass(class_name)


# --- dose node -----------------------------------------------------------------------------------
def test_dose_node_behaves_like_rtdose(scene, mrml_case):
    ct_node, _, dose_node = nodes_from_case(scene, mrml_case)

    assert dose_node.GetAttribute(DOSE_VOLUME_ATTRIBUTE) == "1"
    assert is_dose_volume(dose_node) and not is_dose_volume(ct_node)
    np.testing.assert_allclose(volume_array(dose_node), mrml_case.dose)

    display = dose_node.GetDisplayNode()
    color = display.GetColorNode()
    assert color.GetName() == DOSE_COLOR_TABLE_NAME
    assert color.GetNumberOfColors() == 256
    low, high = color.GetLookupTable().GetTableValue(0), color.GetLookupTable().GetTableValue(255)
    assert low[2] > 0.9 and low[0] < 0.1  # blue at 0 Gy
    assert high[0] > 0.9 and high[2] < 0.1  # red at the maximum
    assert not display.GetAutoWindowLevel()
    assert display.GetWindowLevelMin() == pytest.approx(0.0)
    assert display.GetWindowLevelMax() == pytest.approx(float(mrml_case.dose.max()), rel=1e-5)
    assert display.GetApplyThreshold()

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.GetItemParent(sh.GetItemByDataNode(ct_node))
    assert sh.GetItemLevel(study) == slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMLevelStudy()
    assert sh.GetItemParent(sh.GetItemByDataNode(dose_node)) == study


def test_dose_node_update_and_shared_color_table(scene, mrml_case):
    ct_node, _, dose_node = nodes_from_case(scene, mrml_case)
    volumes = _count(scene, "vtkMRMLScalarVolumeNode")
    halved = create_or_update_dose_node(scene, mrml_case.dose * 0.5, mrml_case.geometry, "ignored",
                                        ctNode=ct_node, node=dose_node)
    assert halved is dose_node
    assert _count(scene, "vtkMRMLScalarVolumeNode") == volumes
    np.testing.assert_allclose(volume_array(dose_node), mrml_case.dose * 0.5)
    assert dose_node.GetDisplayNode().GetWindowLevelMax() == pytest.approx(float(mrml_case.dose.max()) * 0.5, rel=1e-5)

    second = create_or_update_dose_node(scene, mrml_case.dose, mrml_case.geometry, "second dose", ctNode=ct_node)
    assert second is not dose_node
    assert scene.GetNodesByClassByName("vtkMRMLColorTableNode", DOSE_COLOR_TABLE_NAME).GetNumberOfItems() == 1
    assert second.GetDisplayNode().GetColorNodeID() == dose_node.GetDisplayNode().GetColorNodeID()


def test_dose_node_without_study_and_bad_dose(scene, mrml_case):
    plain_ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "plain CT")  # no subject hierarchy parent
    node = create_or_update_dose_node(scene, mrml_case.dose, mrml_case.geometry, "dose", ctNode=plain_ct)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = sh.GetItemByDataNode(node)
    assert not item or sh.GetItemParent(item) == sh.GetSceneItemID()
    bad = mrml_case.dose.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InvalidDoseError):
        create_or_update_dose_node(scene, bad, mrml_case.geometry, "bad")


# --- DVH chart -----------------------------------------------------------------------------------
def _dvhs(case):
    return compute_dvhs(case.dose, case.structures, case.geometry.voxel_volume_mm3 / 1000.0)


def test_show_dvh_one_table_and_series_per_structure(scene, mrml_case):
    dvhs = _dvhs(mrml_case)
    colors = {"PTV_70": (0.1, 0.2, 0.3)}
    chart = show_dvh(scene, dvhs, colors=colors)

    assert _count(scene, "vtkMRMLPlotChartNode") == 1
    assert chart.GetNumberOfPlotSeriesNodes() == len(dvhs) == len(mrml_case.structures)
    assert _count(scene, "vtkMRMLPlotSeriesNode") == len(dvhs)
    assert _count(scene, "vtkMRMLTableNode") == len(dvhs)
    assert chart.GetXAxisTitle() == "Dose [Gy]" and chart.GetYAxisTitle() == "Volume [%]"
    shown = set()
    for index in range(chart.GetNumberOfPlotSeriesNodes()):
        series = chart.GetNthPlotSeriesNode(index)
        name = series.GetAttribute("DoseAI.Structure")
        shown.add(name)
        table = series.GetTableNode()
        assert series.GetXColumnName() == DOSE_COLUMN and series.GetYColumnName() == VOLUME_PCT_COLUMN
        np.testing.assert_allclose(_column(table, DOSE_COLUMN), dvhs[name].dose_gy)
        np.testing.assert_allclose(_column(table, VOLUME_PCT_COLUMN), dvhs[name].volume_pct)
        np.testing.assert_allclose(_column(table, VOLUME_CC_COLUMN), dvhs[name].volume_cc)
        np.testing.assert_allclose(series.GetColor(), colors.get(name, structure_color(name)))
    assert shown == set(dvhs)


def test_show_dvh_again_updates_without_duplicates(scene, mrml_case):
    dvhs = _dvhs(mrml_case)
    chart = show_dvh(scene, dvhs)
    counts = {cls: _count(scene, cls) for cls in ("vtkMRMLPlotChartNode", "vtkMRMLPlotSeriesNode", "vtkMRMLTableNode")}

    hotter = compute_dvhs(mrml_case.dose * 1.1, mrml_case.structures, mrml_case.geometry.voxel_volume_mm3 / 1000.0)
    assert show_dvh(scene, hotter, chartNode=chart) is chart
    assert show_dvh(scene, hotter) is chart  # found again by its name prefix
    assert {cls: _count(scene, cls) for cls in counts} == counts
    for index in range(chart.GetNumberOfPlotSeriesNodes()):
        series = chart.GetNthPlotSeriesNode(index)
        name = series.GetAttribute("DoseAI.Structure")
        np.testing.assert_allclose(_column(series.GetTableNode(), DOSE_COLUMN), hotter[name].dose_gy)

    fewer = {name: dvh for name, dvh in hotter.items() if name != "External"}
    show_dvh(scene, fewer, chartNode=chart)
    assert chart.GetNumberOfPlotSeriesNodes() == len(fewer)
    assert _count(scene, "vtkMRMLPlotSeriesNode") == len(fewer)
    assert _count(scene, "vtkMRMLTableNode") == len(fewer)

    other = show_dvh(scene, fewer, name_prefix="Predicted DVH")  # a second chart to compare with
    assert other is not chart and _count(scene, "vtkMRMLPlotChartNode") == 2


def test_draggable_curve_stays_the_last_series(scene, mrml_case):
    """A plot view grabs the point of the last series under the mouse; the dashed desired curve of the edited
    structure lies under the draggable one, so the draggable one must stay last when curves are added."""
    dvhs = _dvhs(mrml_case)
    chart = show_dvh(scene, dvhs)
    parotid = dvhs["Parotid_L"]
    editable_curve(scene, chart, "Parotid_L", parotid.dose_gy, parotid.volume_pct)
    show_dvh(scene, dvhs, chartNode=chart, reference={"Parotid_L": parotid}, reference_label="desired")
    last = chart.GetNthPlotSeriesNode(chart.GetNumberOfPlotSeriesNodes() - 1)
    assert last.GetAttribute(EDIT_ATTRIBUTE) == "Parotid_L"
    assert chart.GetNumberOfPlotSeriesNodes() == len(dvhs) + 2  # solid curves, one dashed, the draggable one


def test_metrics_table(scene, mrml_case):
    voxel_cc = mrml_case.geometry.voxel_volume_mm3 / 1000.0
    metrics = {name: structure_metrics(mrml_case.dose, mask, voxel_cc, name=name,
                                       prescription_gy=mrml_case.prescriptions.get(name))
               for name, mask in mrml_case.structures.items()}
    table = metrics_table(scene, metrics)
    vtk_table = table.GetTable()
    assert vtk_table.GetNumberOfRows() == len(metrics)
    names = [vtk_table.GetColumnByName("Structure").GetValue(row) for row in range(vtk_table.GetNumberOfRows())]
    assert names == list(metrics)
    for row, name in enumerate(names):
        for key in ("Dmean", "Dmax", "D95", "volume_cc"):
            assert _column(table, key)[row] == pytest.approx(metrics[name][key])
        if name in mrml_case.prescriptions:
            assert _column(table, "HI")[row] == pytest.approx(metrics[name]["HI"])
        else:
            assert np.isnan(_column(table, "HI")[row])  # target-only metric
    assert table.GetColumnUnitLabel("Dmean") == "Gy"

    again = metrics_table(scene, {"PTV_70": metrics["PTV_70"]}, tableNode=table)
    assert again is table and table.GetTable().GetNumberOfRows() == 1
    assert metrics_table(scene, metrics) is table  # found again by name
    assert _count(scene, "vtkMRMLTableNode") == 1
