"""The DosePreference workflow in logic form on slicer-core, with the shipped model: structure mapping ->
predict (progress, reference dose dashed) -> slider updates in place (only the slider half re-runs) ->
isodose lines follow -> export. The module's Widget calls exactly these logic functions."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch not installed (pip install -e '.[models]')")

from DosePreferenceLib import SHARED_SESSION, DosePreferenceLogic, check_mapping, mapping_arguments, model_oars  # noqa: E402

from doseai.mrml import REFERENCE_ATTRIBUTE, isodose_levels, nodes_from_case, volume_array  # noqa: E402
from doseai.predict import DEFAULT_MODEL  # noqa: E402

pytestmark = pytest.mark.mrml
# the shipped model; DOSEAI_TEST_WEIGHTS points at another one (e.g. a throwaway model while it trains)
WEIGHTS = Path(os.environ.get("DOSEAI_TEST_WEIGHTS") or DEFAULT_MODEL)


@pytest.fixture(scope="module")
def model():
    if not WEIGHTS.is_file():
        pytest.skip(f"model weights not found at {WEIGHTS}")
    previous = SHARED_SESSION.predictor
    yield DosePreferenceLogic().predictor(weights=WEIGHTS, device="cpu")
    SHARED_SESSION.predictor = previous


@pytest.fixture(scope="module")
def sample():
    from doseai.sample import make_sample_case

    return make_sample_case(seed=7, shape=(32, 64, 64))  # its dose serves as the clinical reference


def test_predict_sliders_isodose_export(scene, model, sample, tmp_path):
    ct_node, seg_node, reference_node = nodes_from_case(scene, sample)
    logic = DosePreferenceLogic()
    rows = logic.structureRows(seg_node)
    assert check_mapping(rows, model_oars(model.card)).ok
    overrides, prescriptions = mapping_arguments(rows)

    steps = []
    result = logic.predict(ct_node, seg_node, overrides=overrides, prescriptions=prescriptions,
                           referenceDoseNode=reference_node, progress=lambda text, percent: steps.append((percent, text)))
    assert [percent for percent, _ in steps] == sorted(percent for percent, _ in steps) and steps[-1][0] == 100
    assert any("Preparing the case" in text for _, text in steps)
    dose_node, chart, table = result.doseNode, result.dvh.chartNode, result.dvh.metricsTableNode
    assert dose_node.GetAttribute("DoseAI.Model") == model.card["name"] and result.missingStructures == []
    display = dose_node.GetDisplayNode()  # colours fixed to 0 .. 110 % of the top prescription
    assert display.GetWindowLevelMax() == pytest.approx(1.1 * 70.0)
    n = len(sample.structures)
    assert chart.GetNumberOfPlotSeriesNodes() == 2 * n  # solid prediction + dashed reference
    assert table.GetNumberOfRows() == n
    first = volume_array(dose_node)
    isodose = logic.isodoseSegmentation(dose_node, 70.0)

    # a slider move: the same nodes are updated, the case is not prepared again
    steps.clear()
    n_volumes = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    start = time.perf_counter()
    moved = logic.predict(ct_node, seg_node, oarSparing=0.75, homogeneity=-0.5, doseNode=dose_node,
                          overrides=overrides, prescriptions=prescriptions, chartNode=chart, metricsTableNode=table,
                          referenceDoseNode=reference_node, progress=lambda text, percent: steps.append((percent, text)))
    slider_seconds = time.perf_counter() - start
    assert not any("Preparing" in text for _, text in steps)
    assert moved.doseNode is dose_node and moved.dvh.chartNode is chart and moved.dvh.metricsTableNode is table
    assert moved.dvh.referenceDVHs is result.dvh.referenceDVHs  # the reference is not recomputed either
    assert chart.GetNumberOfPlotSeriesNodes() == 2 * n
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == n_volumes
    moved_dose = volume_array(dose_node)
    assert not np.array_equal(moved_dose, first)
    assert (dose_node.GetAttribute("DoseAI.OarSparing"), dose_node.GetAttribute("DoseAI.Homogeneity")) == ("0.75", "-0.5")
    assert moved.dvh.metrics["PTV_70"]["Dmean"] == pytest.approx(moved_dose[sample.structures["PTV_70"]].mean(),
                                                                  rel=1e-4)
    print(f"first prediction {result.totalSeconds:.2f} s, slider update {slider_seconds:.2f} s")

    again = logic.isodoseSegmentation(dose_node, 70.0, segmentationNode=isodose)
    assert again is isodose and isodose_levels(isodose) == [30, 50, 70, 80, 90, 95, 100, 105]

    paths = logic.exportResults(ct_node, seg_node, dose_node, tmp_path, overrides, prescriptions)
    assert paths["rtdose"].name == f"{dose_node.GetName().replace(' ', '_')}_RTDOSE.dcm"
    from doseai.io.dicom import read_rtdose

    exported, _, meta = read_rtdose(paths["rtdose"])
    assert np.abs(exported - moved_dose).max() <= 0.01
    assert meta["SeriesDescription"] == f"DoseAI {model.card['name']} OAR +0.75 HI -0.50"

    # without a reference the dashed curves go away
    logic.predict(ct_node, seg_node, doseNode=dose_node, overrides=overrides, prescriptions=prescriptions,
                  chartNode=chart, metricsTableNode=table)
    series = [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
    assert len(series) == n and not any(s.GetAttribute(REFERENCE_ATTRIBUTE) for s in series)


def test_missing_model_structures_are_stated_not_fatal(scene, model, sample):
    ct_node, seg_node, _ = nodes_from_case(scene, sample)
    segmentation = seg_node.GetSegmentation()
    segmentation.RemoveSegment(segmentation.GetSegmentIdBySegmentName("Larynx"))
    result = DosePreferenceLogic().predict(ct_node, seg_node)
    assert result.missingStructures == ["Larynx"]
    assert "empty model inputs): Larynx" in result.summary()


def test_a_structure_unlike_the_training_cases_is_warned_of_not_fatal(scene, model, sample):
    import dataclasses

    # the body outlined as the spinal cord: far larger than any training case's cord
    odd = dataclasses.replace(sample, structures={**sample.structures, "SpinalCord": sample.structures["External"]})
    ct_node, seg_node, _ = nodes_from_case(scene, odd, name="odd")
    result = DosePreferenceLogic().predict(ct_node, seg_node)
    assert len(result.caseWarnings) == 1 and "Warning: SpinalCord is" in result.summary()
    ct_node, seg_node, _ = nodes_from_case(scene, sample, name="usual")
    assert DosePreferenceLogic().predict(ct_node, seg_node).caseWarnings == []


def test_the_dose_provenance_names_a_plan_level_scale():
    from types import SimpleNamespace

    from DosePreferenceLib.results import calibrationText as _calibrationText

    from doseai.calibration import DoseCalibration

    calibration = DoseCalibration(0.4, 1.04, 0.01, plan_level_range=(0.97, 1.05))
    predictor = SimpleNamespace(calibration=calibration, calibrated=True, timings={"plan_level_scale": 1.0})
    assert _calibrationText(predictor).startswith("target lift 0.4")
    predictor.timings["plan_level_scale"] = 1.125
    assert _calibrationText(predictor).startswith("dose x 1.125: the network's plan level fell outside the "
                                                  "training plans' 0.970-1.050 x Rx; target lift 0.4")


def test_two_logic_instances_share_the_model_not_the_wrong_case(scene, model, sample):
    """The model (and the case it holds) is shared by every logic instance; a case prepared by another
    instance must never be used for this one."""
    from doseai.sample import make_sample_case

    nodes_a = nodes_from_case(scene, sample, name="a")
    other = make_sample_case(seed=8, shape=(32, 64, 64), with_dose=False)
    nodes_b = nodes_from_case(scene, other, name="b")
    logic_a, logic_b = DosePreferenceLogic(), DosePreferenceLogic()
    dose_a = logic_a.predict(*nodes_a[:2]).doseNode
    first_a = volume_array(dose_a)
    logic_b.predict(*nodes_b[:2])
    again_a = logic_a.predict(*nodes_a[:2], doseNode=dose_a)
    assert DosePreferenceLogic().predictor() is model
    np.testing.assert_array_equal(volume_array(again_a.doseNode), first_a)  # a's case again, not b's
