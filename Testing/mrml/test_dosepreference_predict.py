"""DosePreference logic prediction with the shipped model on slicer-core: the case is built from MRML
nodes, the dose node is created and updated on a slider change, the DVH chart and metrics follow, and
the dose exports as an RTDOSE that reloads with the same geometry."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch not installed (pip install -e '.[models]')")

from DosePreferenceLib import DosePreferenceLogic  # noqa: E402

from doseai.errors import DoseAIError  # noqa: E402
from doseai.mrml import DOSE_VOLUME_ATTRIBUTE, geometry_from_volume_node, nodes_from_case, volume_array  # noqa: E402

pytestmark = pytest.mark.mrml


@pytest.fixture(scope="module")
def sample():
    from doseai.sample import make_sample_case

    return make_sample_case(seed=2, with_dose=False)


def _mean_oar(case, dose):
    return np.mean([dose[case.structures[n]].mean() for n in case.oars])


def test_predict_creates_and_updates_dose_and_dvh(scene, sample, tmp_path):
    ct_node, seg_node, _ = nodes_from_case(scene, sample)
    logic = DosePreferenceLogic()
    result = logic.predict(ct_node, seg_node)
    dose_node = result.doseNode
    assert dose_node.GetAttribute(DOSE_VOLUME_ATTRIBUTE) == "1"
    assert dose_node.GetAttribute("DoseAI.OarSparing") == "0"
    assert geometry_from_volume_node(dose_node).matches(geometry_from_volume_node(ct_node))
    dose = volume_array(dose_node)
    assert np.isfinite(dose).all() and dose.max() > 0.8 * 70  # a dose that reaches the top prescription
    assert np.all(dose[~sample.structures["External"]] == 0)
    chart = result.dvh.chartNode
    assert chart.GetNumberOfPlotSeriesNodes() == len(sample.structures)
    assert result.dvh.metrics["PTV_70"]["Dmean"] == pytest.approx(dose[sample.structures["PTV_70"]].mean(), rel=1e-4)

    n_volumes = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    spared = logic.predict(ct_node, seg_node, oarSparing=1.0, doseNode=dose_node, chartNode=chart,
                           metricsTableNode=result.dvh.metricsTableNode)
    assert spared.doseNode is dose_node and spared.dvh.chartNode is chart  # updated in place
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == n_volumes
    assert dose_node.GetAttribute("DoseAI.OarSparing") == "1"
    spared_dose = volume_array(dose_node)
    assert not np.array_equal(spared_dose, dose)
    assert _mean_oar(sample, spared_dose) < _mean_oar(sample, dose)  # the slider does what it says

    from doseai.io.dicom import read_rtdose, write_rtdose

    path = tmp_path / "RD.dcm"
    write_rtdose(spared_dose, geometry_from_volume_node(dose_node), path)
    back, geometry, _ = read_rtdose(path)
    assert geometry.matches(geometry_from_volume_node(ct_node))
    assert np.abs(back - spared_dose).max() <= 0.01


def test_predict_needs_a_target(scene, sample):
    from doseai.case import PlanningCase

    no_target = PlanningCase(geometry=sample.geometry, ct=sample.ct,
                             structures={k: v for k, v in sample.structures.items() if not k.startswith("PTV")})
    ct_node, seg_node, _ = nodes_from_case(scene, no_target)
    with pytest.raises(DoseAIError, match="no target with a prescription"):
        DosePreferenceLogic().predict(ct_node, seg_node)


def test_predict_async_gives_the_same_dose_and_updates_only_on_finish(scene, sample):
    ct_node, seg_node, _ = nodes_from_case(scene, sample)
    logic = DosePreferenceLogic()
    dose_node = logic.predict(ct_node, seg_node, homogeneity=0.5).doseNode
    expected = volume_array(dose_node).copy()
    logic.predict(ct_node, seg_node, doseNode=dose_node)
    before = volume_array(dose_node).copy()

    pending = logic.predictAsync(ct_node, seg_node, homogeneity=0.5, doseNode=dose_node)
    pending._future.result(timeout=60)
    assert pending.done() and np.array_equal(volume_array(dose_node), before)  # MRML waits for finish()
    result = pending.finish()
    assert result.doseNode is dose_node and dose_node.GetAttribute("DoseAI.Homogeneity") == "0.5"
    assert np.array_equal(volume_array(dose_node), expected)

    failing = logic.predictAsync(ct_node, seg_node, oarSparing=3.0, doseNode=dose_node)  # outside [-1, 1]
    with pytest.raises(DoseAIError, match="oar_sparing must be within"):
        failing.finish()
