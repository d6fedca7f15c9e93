"""A model whose card lists a third slider reaches the module GUI with no code naming it: the Widget builds one
slider per condition (label, range, tooltip from the card), keeps their values in the parameter node, predicts
with all of them and records each on the dose node (the core and CLI side: Testing/test_conditions.py)."""

import pytest

pytestmark = pytest.mark.mrml


@pytest.fixture
def three_slider_gui(monkeypatch, scene, tiny_preference_model):
    pytest.importorskip("torch", reason="torch not installed (pip install -e '.[models]')")
    from DosePreferenceLib import SHARED_SESSION, DosePreferenceLogic
    from slicer_stand_ins import ModuleGui

    monkeypatch.setattr(SHARED_SESSION, "predictor", SHARED_SESSION.predictor)  # restored afterwards
    DosePreferenceLogic().predictor(weights=tiny_preference_model, device="cpu")  # the session's model now
    gui = ModuleGui(monkeypatch, scene, "DosePreference")
    yield gui
    gui.close()


def test_a_third_slider_from_the_card_reaches_the_gui_and_the_dose_node(three_slider_gui, scene, small_case):
    from slicer_stand_ins import finish_worker_update

    from doseai.mrml import nodes_from_case

    ct_node, seg_node, _ = nodes_from_case(scene, small_case)
    widget = three_slider_gui.make_widget()
    sliders = widget.sliders.widgets
    assert list(sliders) == ["oar_sparing", "homogeneity", "cord_margin"]
    third = sliders["cord_margin"]
    assert (third.minimum, third.maximum, third.value) == (-0.5, 2.0, 0.0)
    assert third.toolTip == "cord_margin = x moves it. 0 = the typical plan. Range [-0.5, 2]."
    layout_rows = widget.ui.slidersWidget.layout_.rows
    assert [label for label, _ in layout_rows] == ["OAR sparing:", "PTV homogeneity:", "Cord margin:"]

    parameters = widget._parameterNode
    parameters.ctVolume, parameters.segmentation = ct_node, seg_node
    widget.ui.predictButton.click()
    dose_node = parameters.outputDose
    assert dose_node.GetAttribute("DoseAI.CordMargin") == "0" and not widget.ui.resetButton.enabled

    third.value = 1.5  # the user moves the third slider: parameter node, then a live update with it
    assert parameters.parameterNode.GetParameter("DoseAI.Slider.cord_margin") == "1.5"
    widget._sliderTimer.fire()
    finish_worker_update(widget)
    assert dose_node.GetAttribute("DoseAI.CordMargin") == "1.5" and widget.ui.resetButton.enabled
    assert widget.logic._doseDescription(dose_node).endswith("OAR +0.00 HI +0.00 CM +1.50")

    widget.ui.resetButton.click()
    assert third.value == 0.0 and widget._sliderValues()["cord_margin"] == 0.0
