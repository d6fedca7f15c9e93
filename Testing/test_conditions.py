"""The model's conditions (sliders) come from its card alone: names, order, ranges and texts
(doseai.conditions), through the predictor, the CLI and the batch script. The GUI's share is in
Testing/mrml/test_dosepreference_conditions.py."""

import sys

import numpy as np
import pytest

from doseai.conditions import ConditionSpace
from doseai.errors import DoseAIError
from doseai.predict import DEFAULT_MODEL, DosePredictor, load_card


def test_the_shipped_card_lists_its_two_sliders_in_the_network_s_order():
    space = ConditionSpace.from_card(load_card(DEFAULT_MODEL))
    assert space.names == ["oar_sparing", "homogeneity"]
    oar, hi = space
    assert (oar.label, oar.option, oar.keyword, oar.attribute, oar.short) == (
        "OAR sparing", "--oar-sparing", "oarSparing", "DoseAI.OarSparing", "OAR")
    assert (hi.label, hi.attribute, hi.short, hi.low, hi.high) == ("PTV homogeneity", "DoseAI.Homogeneity", "HI",
                                                                     -1.0, 1.0)
    assert oar.tooltip.startswith("oar_sparing = w in [-1, 1]") and "homogeneity = h" not in oar.tooltip


def test_the_training_objective_defines_the_conditions_the_card_lists():
    """The preference loss reads its columns by name from PREFERENCE_CONDITIONS; the export writes them into the
    card; the shipped card agrees (so the network's columns mean what the sliders say)."""
    pytest.importorskip("torch")
    from doseai.train.preference_loss import HOMOGENEITY, OAR_SPARING, PREFERENCE_CONDITIONS

    card = load_card(DEFAULT_MODEL)
    assert card["preference"]["conditions"] == PREFERENCE_CONDITIONS.to_card()
    assert (OAR_SPARING, HOMOGENEITY) == (0, 1) and card["network"]["config"]["n_sliders"] == len(PREFERENCE_CONDITIONS)


def test_values_by_mapping_order_or_keyword_are_checked_and_complete():
    space = ConditionSpace.from_card({"preference": {"sliders": ["a_b", "c"], "range": [-1, 1]}})
    assert space.values() == {"a_b": 0.0, "c": 0.0}
    assert space.values({"a_b": 0.5}) == space.values([0.5]) == space.values(aB=0.5) == {"a_b": 0.5, "c": 0.0}
    assert space.vector(space.values(c=-0.25)).tolist() == [[0.0, -0.25]]
    assert space.describe(space.values([0.5, -1])) == "a_b +0.50, c -1.00"
    with pytest.raises(DoseAIError, match="a_b must be within"):
        space.values(a_b=1.5)
    with pytest.raises(DoseAIError, match="a_b must be within"):
        space.values(a_b=float("nan"))
    with pytest.raises(DoseAIError, match="no condition 'x'.*a_b, c"):
        space.values({"x": 0.1})
    with pytest.raises(DoseAIError, match="3 slider values for a model with 2"):
        space.values([0.1, 0.2, 0.3])
    with pytest.raises(DoseAIError, match="no 'preference' section"):
        ConditionSpace.from_card({"dvh": {}})


def test_a_third_condition_reaches_the_network_the_cli_and_the_batch_script(tiny_preference_model, small_case,
                                                                            tmp_path, capsys, monkeypatch):
    """A model whose card lists a third slider: the predictor takes it by name (in the card's column), the CLI
    and the batch script offer its option with its range, with no code naming it."""
    import importlib.util

    from doseai.cli import main
    from doseai.io import save_case
    from doseai.paths import REPO_ROOT

    predictor = DosePredictor(tiny_preference_model, device="cpu")
    assert predictor.conditions.names == ["oar_sparing", "homogeneity", "cord_margin"]
    predictor.set_case(small_case)
    neutral = predictor.predict()
    moved = predictor.predict(sliders={"cord_margin": 1.5})
    assert not np.allclose(neutral, moved)  # the third column reaches the network
    assert np.array_equal(moved, predictor.predict(0.0, 0.0, 1.5)) and np.array_equal(moved,
                                                                                     predictor.predict(cord_margin=1.5))
    with pytest.raises(DoseAIError, match=r"cord_margin must be within \[-0.5, 2\]"):
        predictor.predict(cord_margin=-1.0)

    case = save_case(small_case, tmp_path / "case", "nrrd")
    assert main(["predict", "--case", str(case), "--weights", str(tiny_preference_model), "--cord-margin", "1.5",
                 "--device", "cpu", "--out", str(tmp_path / "dose.nrrd")]) == 0
    assert "cord_margin +1.50" in capsys.readouterr().out
    assert main(["predict", "--case", str(case), "--weights", str(tiny_preference_model), "--cord-margin", "3",
                 "--out", str(tmp_path / "other.nrrd")]) == 2
    assert "--cord-margin must be within [-0.5, 2]" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the shipped model has no such slider
        main(["predict", "--case", str(case), "--cord-margin", "1", "--out", str(tmp_path / "x.nrrd")])

    spec = importlib.util.spec_from_file_location("batch_predict", REPO_ROOT / "DosePreference/Scripts/batch_predict.py")
    batch = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "batch_predict", batch)  # dataclasses look their module up while it runs
    spec.loader.exec_module(batch)
    help_text = batch.build_parser(["--weights", str(tiny_preference_model)]).format_help()
    assert "--cord-margin" in help_text and "Cord margin slider in [-0.5, 2]" in help_text
    assert "--cord-margin" not in batch.build_parser([]).format_help()
