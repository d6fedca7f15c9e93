"""The diffusion model in the DosePreference module on slicer-core (a tiny random model: plumbing, not quality):
the logic draws samples into the dose node (their mean), a spread volume and the DVH chart's dotted bands; a
later one-dose prediction into the same node drops the samples' attributes; the Widget's model choice routes
Predict to the sampler and keeps slider rests from re-drawing."""

import numpy as np
import pytest

pytestmark = pytest.mark.mrml


@pytest.fixture
def diffusion_session(monkeypatch, tiny_diffusion_model):
    pytest.importorskip("torch", reason="torch not installed (pip install -e '.[models]')")
    pytest.importorskip("einops", reason="einops not installed (pip install -e '.[models]')")
    from DosePreferenceLib import SHARED_SESSION, DosePreferenceLogic

    for name in ("predictor", "diffusionPredictor"):  # restored afterwards
        monkeypatch.setattr(SHARED_SESSION, name, getattr(SHARED_SESSION, name))
    logic = DosePreferenceLogic()
    sampler = logic.diffusionPredictor(weights=tiny_diffusion_model, device="cpu")
    logic.predictor(weights=sampler.base.weights, device="cpu")  # the one-dose model: the sampler's base
    return logic


def test_logic_draws_samples_into_mean_spread_and_dvh_bands(diffusion_session, scene, small_case):
    from doseai.mrml import SPREAD_ATTRIBUTE, geometry_from_volume_node, nodes_from_case, volume_array
    from doseai.mrml.plots import BAND_ATTRIBUTES

    logic = diffusion_session
    ct_node, seg_node, _ = nodes_from_case(scene, small_case)
    result = logic.sampleDoses(ct_node, seg_node, samples=3, seed=7, sliders={"cord_margin": 1.0})
    dose_node, spread_node = result.doseNode, result.spreadNode
    assert dose_node.GetAttribute("DoseAI.Samples") == "3" and dose_node.GetAttribute("DoseAI.Seed") == "7"
    assert dose_node.GetAttribute("DoseAI.CordMargin") == "1" and dose_node.GetAttribute("DoseAI.Model") == "tiny_diffusion"
    assert spread_node.GetAttribute(SPREAD_ATTRIBUTE) == "5-95 %"
    assert spread_node.GetAttribute("DicomRtImport.DoseVolume") is None  # a spread is not a dose to plan with
    assert geometry_from_volume_node(spread_node).matches(geometry_from_volume_node(dose_node))
    expected = logic.diffusionPredictor().sample(3, 7, {"cord_margin": 1.0})
    np.testing.assert_allclose(volume_array(dose_node), expected.mean, atol=1e-4)
    np.testing.assert_allclose(volume_array(spread_node), expected.spread, atol=1e-4)
    chart = result.dvh.chartNode
    series = [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
    low = {s.GetAttribute(BAND_ATTRIBUTES[0]) for s in series} - {None}
    high = {s.GetAttribute(BAND_ATTRIBUTES[1]) for s in series} - {None}
    assert low == high == set(result.dvh.dvhs) and "dotted: 5-95 % of samples" in chart.GetTitle()
    assert "mean of 3 samples" in result.summary()

    again = logic.sampleDoses(ct_node, seg_node, samples=3, seed=7, doseNode=dose_node, spreadNode=spread_node,
                              chartNode=chart, sliders={"cord_margin": 1.0})
    assert again.doseNode is dose_node and again.spreadNode is spread_node  # updated in place
    one = logic.predict(ct_node, seg_node, doseNode=dose_node, chartNode=chart)
    assert one.doseNode.GetAttribute("DoseAI.Samples") is None and one.doseNode.GetAttribute("DoseAI.Seed") is None
    series = [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
    assert not any(s.GetAttribute(a) for s in series for a in BAND_ATTRIBUTES)  # bands gone with the samples


def test_widget_model_choice_routes_predict_to_the_sampler(monkeypatch, scene, small_case, diffusion_session):
    from slicer_stand_ins import ModuleGui

    from doseai.mrml import nodes_from_case

    gui = ModuleGui(monkeypatch, scene, "DosePreference")
    try:
        ct_node, seg_node, _ = nodes_from_case(scene, small_case)
        widget = gui.make_widget()
        parameters = widget._parameterNode
        parameters.ctVolume, parameters.segmentation = ct_node, seg_node
        parameters.predictionModel, parameters.samples, parameters.seed = "diffusion", 3, 2
        widget.ui.predictButton.click()
        assert parameters.outputDose.GetAttribute("DoseAI.Samples") == "3"
        assert parameters.spreadVolume is not None and "samples" in widget.ui.statusLabel.text
        widget.sliders.widgets["cord_margin"].value = 1.0  # a slider rest does not re-draw the samples
        widget._sliderTimer.fire()
        assert widget._pending is None and "press Predict" in widget.ui.statusLabel.text
        widget.ui.predictButton.click()  # Predict draws them at the new value, into the same volumes
        assert parameters.outputDose.GetAttribute("DoseAI.CordMargin") == "1"
    finally:
        gui.close()
