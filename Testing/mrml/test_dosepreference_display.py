"""DosePreference display on slicer-core: isodose lines as a segmentation (one segment per level), the
reference dose's DVH as dashed curves in the same chart, the dose colour window, default inputs."""

from __future__ import annotations

import numpy as np
import pytest
import slicer
from DosePreferenceLib import DosePreferenceLogic

from doseai.errors import DoseAIError
from doseai.geometry import ImageGeometry
from doseai.mrml import (
    DEFAULT_ISODOSE_LEVELS_PCT,
    REFERENCE_ATTRIBUTE,
    STRUCTURE_ATTRIBUTE,
    create_or_update_dose_node,
    isodose_levels,
    nodes_from_case,
    parse_isodose_levels,
    show_dvh,
)
from doseai.mrml.nodes import segment_masks_on_volume
from doseai.report import case_dvhs
from doseai.resample import resample_to

pytestmark = pytest.mark.mrml


# --- isodose -------------------------------------------------------------------------------------
def test_isodose_segmentation_has_one_outlined_segment_per_level(scene, mrml_case):
    ct_node, _, dose_node = nodes_from_case(scene, mrml_case)
    node = DosePreferenceLogic.isodoseSegmentation(dose_node, 70.0)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(DEFAULT_ISODOSE_LEVELS_PCT) == 8
    assert isodose_levels(node) == [30, 50, 70, 80, 90, 95, 100, 105]
    assert segmentation.GetNthSegment(5).GetName() == "95 % (66.5 Gy)"
    masks = segment_masks_on_volume(node, dose_node)  # each segment is exactly "dose >= level"
    for percent, (name, mask) in zip(DEFAULT_ISODOSE_LEVELS_PCT, masks.items()):
        np.testing.assert_array_equal(mask, mrml_case.dose >= percent / 100 * 70.0, err_msg=name)
    assert masks["30 % (21.0 Gy)"].sum() > masks["95 % (66.5 Gy)"].sum() > 0

    display = node.GetDisplayNode()  # lines, not filled regions, and no 3D surfaces
    assert display.GetVisibility2DOutline() and not display.GetVisibility2DFill() and not display.GetVisibility3D()
    colors = [segmentation.GetNthSegment(i).GetColor() for i in range(8)]
    assert colors[0][2] > colors[0][0] and colors[-1][0] > colors[-1][2]  # blue low, red high, as the dose wash
    assert node.GetAttribute("DoseAI.Isodose") == dose_node.GetID()

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.GetItemParent(sh.GetItemByDataNode(ct_node))
    assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study  # beside the dose, under the CT's study


def test_isodose_segmentation_updates_in_place(scene, mrml_case):
    _, _, dose_node = nodes_from_case(scene, mrml_case)
    node = DosePreferenceLogic.isodoseSegmentation(dose_node, 70.0)
    count = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    again = DosePreferenceLogic.isodoseSegmentation(dose_node, 63.0, levels=(50, 100, 150), segmentationNode=node)
    assert again is node and scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == count
    assert isodose_levels(node) == [50, 100, 150]
    masks = segment_masks_on_volume(node, dose_node)
    assert not masks["150 % (94.5 Gy)"].any()  # a level the dose does not reach stays listed, empty
    np.testing.assert_array_equal(masks["100 % (63.0 Gy)"], mrml_case.dose >= 63.0)
    with pytest.raises(DoseAIError, match="positive dose"):
        DosePreferenceLogic.isodoseSegmentation(dose_node, 0.0)


def test_isodose_levels_from_text():
    assert parse_isodose_levels("30, 50,70 80;90 95% 100 105") == DEFAULT_ISODOSE_LEVELS_PCT
    assert parse_isodose_levels("100 95 95") == (95.0, 100.0)
    for text in ("", "abc", "0 50", "50 250"):
        with pytest.raises(DoseAIError, match="isodose levels"):
            parse_isodose_levels(text)


# --- reference DVH -------------------------------------------------------------------------------
def _series(chart, attribute):
    nodes = [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
    return {node.GetAttribute(attribute): node for node in nodes if node.GetAttribute(attribute)}


def test_reference_dose_dvh_is_dashed_in_the_same_chart(scene, mrml_case):
    ct_node, seg_node, dose_node = nodes_from_case(scene, mrml_case)
    # the reference: another plan on a coarser grid, so it is resampled onto the CT grid
    g = mrml_case.geometry
    coarse = ImageGeometry(shape=(g.shape[0] // 2, g.shape[1] // 2, g.shape[2] // 2),
                           spacing=tuple(2 * s for s in g.spacing), origin=g.origin, direction=g.direction)
    reference_dose = resample_to(0.8 * mrml_case.dose, g, coarse)
    reference_node = create_or_update_dose_node(scene, reference_dose, coarse, "clinical plan", ctNode=ct_node)

    logic = DosePreferenceLogic()
    result = logic.computeDVH(ct_node, seg_node, dose_node, referenceDoseNode=reference_node)
    chart = result.chartNode
    solid, dashed = _series(chart, STRUCTURE_ATTRIBUTE), _series(chart, REFERENCE_ATTRIBUTE)
    assert set(solid) == set(dashed) == set(mrml_case.structures)
    for name in solid:
        assert solid[name].GetLineStyle() == slicer.vtkMRMLPlotSeriesNode.LineStyleSolid
        assert dashed[name].GetLineStyle() == slicer.vtkMRMLPlotSeriesNode.LineStyleDash
        np.testing.assert_allclose(dashed[name].GetColor(), solid[name].GetColor())
        assert dashed[name].GetName().endswith("(reference)")
    expected = case_dvhs(result.case, resample_to(reference_dose, coarse, g).clip(0, None))
    for name, dvh in expected.items():
        np.testing.assert_allclose(result.referenceDVHs[name].volume_cc, dvh.volume_cc)
    table = dashed["PTV_70"].GetTableNode()
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(table, "Volume [%]"),
                               expected["PTV_70"].volume_pct)
    assert "dashed" in chart.GetTitle() and "dashed: reference dose" in result.summary()

    # without the reference the dashed curves and their tables go, the plan's curves stay
    n_tables = scene.GetNumberOfNodesByClass("vtkMRMLTableNode")
    logic.computeDVH(ct_node, seg_node, dose_node, chartNode=chart, metricsTableNode=result.metricsTableNode)
    assert _series(chart, REFERENCE_ATTRIBUTE) == {} and len(_series(chart, STRUCTURE_ATTRIBUTE)) == len(solid)
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == n_tables - len(dashed)
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode") == len(solid)


def test_reference_dvhs_are_cached_until_the_reference_changes(scene, mrml_case):
    ct_node, seg_node, dose_node = nodes_from_case(scene, mrml_case)
    logic = DosePreferenceLogic()
    case = logic.computeDVH(ct_node, seg_node, dose_node).case
    first = logic.referenceDVHs(case, dose_node)
    assert logic.referenceDVHs(case, dose_node) is first  # a slider move does not recompute them
    create_or_update_dose_node(scene, 0.5 * mrml_case.dose, mrml_case.geometry, "x", node=dose_node)
    changed = logic.referenceDVHs(case, dose_node)
    assert changed is not first
    assert changed["PTV_70"].dose_gy.max() < first["PTV_70"].dose_gy.max()
    assert logic.referenceDVHs(case, None) is None


def test_show_dvh_reference_only_for_structures_given(scene, mrml_case):
    voxel_cc = mrml_case.geometry.voxel_volume_mm3 / 1000
    from doseai.dvh import compute_dvhs

    dvhs = compute_dvhs(mrml_case.dose, mrml_case.structures, voxel_cc)
    chart = show_dvh(scene, dvhs, reference={"PTV_70": dvhs["PTV_70"]}, name_prefix="t")
    assert list(_series(chart, REFERENCE_ATTRIBUTE)) == ["PTV_70"]
    assert chart.GetNumberOfPlotSeriesNodes() == len(dvhs) + 1


# --- dose display and default inputs --------------------------------------------------------------
def test_dose_colour_window_can_be_fixed(scene, mrml_case):
    node = create_or_update_dose_node(scene, mrml_case.dose, mrml_case.geometry, "d", display_max_gy=77.0)
    display = node.GetDisplayNode()
    assert display.GetWindowLevelMin() == pytest.approx(0.0) and display.GetWindowLevelMax() == pytest.approx(77.0)
    create_or_update_dose_node(scene, 0.5 * mrml_case.dose, mrml_case.geometry, "d", node=node, display_max_gy=77.0)
    assert display.GetWindowLevelMax() == pytest.approx(77.0)  # colours keep their meaning while the dose changes
    create_or_update_dose_node(scene, 0.5 * mrml_case.dose, mrml_case.geometry, "d", node=node)
    assert display.GetWindowLevelMax() == pytest.approx(0.5 * mrml_case.dose.max(), rel=1e-5)


def test_default_inputs_skip_isodose_displays_and_predictions(scene, mrml_case):
    ct_node, seg_node, dose_node = nodes_from_case(scene, mrml_case)
    predicted = create_or_update_dose_node(scene, mrml_case.dose, mrml_case.geometry, "predicted", ctNode=ct_node)
    predicted.SetAttribute("DoseAI.Model", "m")
    DosePreferenceLogic.isodoseSegmentation(dose_node, 70.0)
    assert DosePreferenceLogic.defaultInputs(scene) == (ct_node, seg_node, dose_node)
    scene.RemoveNode(dose_node)
    scene.RemoveNode(seg_node)
    ct, segmentation, dose = DosePreferenceLogic.defaultInputs(scene)
    assert ct is ct_node and segmentation is None and dose is None
