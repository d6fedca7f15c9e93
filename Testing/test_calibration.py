"""The preference model's case-grid calibration (doseai/calibration.py): what each correction moves and what it
leaves, the fit on plans, and DosePredictor applying the card's calibration. (What it buys on OpenKBP is
measured by Testing/benchmarks/bench_preference.py.)"""

import numpy as np
import pytest

from doseai.calibration import (CaseRegions, DoseCalibration, apply_calibration, fit_calibration, plan_level,
                                plan_level_scale, plan_levels_range)
from doseai.dvh import dose_at_volume_cc


def _case_with_cold_targets(small_case, cold_gy=6.0):
    """(case with its plan, a 'prediction': the plan with every target voxel cold by up to ``cold_gy``)."""
    rng = np.random.default_rng(0)
    prediction = small_case.dose.copy()
    regions = CaseRegions.of(small_case)
    flat = prediction.ravel()
    flat[regions.target_index] -= rng.uniform(0.0, cold_gy, regions.target_index.size)
    return small_case, np.clip(prediction, 0, None)


def test_target_lift_raises_only_cold_target_voxels(small_case):
    regions = CaseRegions.of(small_case)
    dose = np.full(small_case.geometry.shape, 60.0, np.float32)
    lifted = apply_calibration(dose, regions, DoseCalibration(target_lift=0.5, target_level=1.0))
    flat, rx = lifted.ravel(), regions.target_rx
    expected = np.where(rx > 60.0, 60.0 + 0.5 * (rx - 60.0), 60.0)  # PTV_56 voxels are already above Rx
    assert np.allclose(flat[regions.target_index], expected)
    outside = np.ones(flat.size, bool)
    outside[regions.target_index] = False
    assert np.all(flat[outside] == 60.0)
    assert np.array_equal(apply_calibration(dose, regions, DoseCalibration()), dose)  # all zero: unchanged
    # a lift of its own in the targets below the highest prescription (PTV_63 here; PTV_56 is above 60 Gy)
    lifted = apply_calibration(dose, regions, DoseCalibration(0.5, 1.0, lower_target_lift=1.0)).ravel()
    top = regions.target_is_top
    assert top.any() and (~top & (rx > 60.0)).any()
    assert np.allclose(lifted[regions.target_index][top], 60.0 + 0.5 * (rx[top] - 60.0))
    assert np.allclose(lifted[regions.target_index][~top], np.maximum(rx[~top], 60.0))


def test_oar_near_max_lowers_the_top_outside_targets_and_keeps_the_order(small_case):
    regions = CaseRegions.of(small_case)
    name = "Parotid_L"
    index = regions.oar_index[name]
    regions.oar_index = {name: index}  # OARs overlap in the phantom: look at one alone
    rng = np.random.default_rng(1)
    dose = np.zeros(small_case.geometry.shape, np.float32).ravel()
    dose[index] = rng.uniform(10.0, 50.0, index.size)
    dose = dose.reshape(small_case.geometry.shape)
    calibration = DoseCalibration(oar_near_max=0.03)  # 2.1 Gy at Rx 70 Gy
    out = apply_calibration(dose, regions, calibration).ravel()
    before, after = dose.ravel()[index], out[index]
    outside = regions.oar_outside_targets[name]
    median = np.median(before)
    assert np.all(after[before <= median] == before[before <= median])  # the lower half stays
    assert np.all(after[~outside] == before[~outside])  # voxels inside a target stay
    assert np.all(after <= before)
    order = np.argsort(before[outside], kind="stable")
    assert np.all(np.diff(after[outside][order]) >= -1e-4)  # monotonic: the hotter voxel stays hotter
    drop = dose_at_volume_cc(before, 0.1, regions.voxel_cc) - dose_at_volume_cc(after, 0.1, regions.voxel_cc)
    assert drop == pytest.approx(0.03 * regions.max_rx, abs=0.3)


def test_fit_finds_the_lift_that_fixes_cold_targets(small_case):
    case, prediction = _case_with_cold_targets(small_case)
    calibration, fit = fit_calibration([case], [prediction])
    assert calibration.target_lift > 0
    assert fit["after"]["dvh_score_gy"] < fit["before"]["dvh_score_gy"]
    assert fit["after"]["dose_score_gy"] < fit["before"]["dose_score_gy"]
    # on the plan itself nothing helps: the fit keeps every correction off
    plain, _ = fit_calibration([case], [case.dose])
    assert plain.target_lift == plain.lift_below_top == plain.oar_near_max == 0


def test_plan_level_scale_brings_an_out_of_range_level_onto_the_nearest_bound(small_case):
    regions = CaseRegions.of(small_case)
    level = plan_level(small_case.dose, regions)
    assert 0.9 < level < 1.1  # the phantom's plan: mean dose in PTV_70 near 70 Gy
    within = DoseCalibration(plan_level_range=(level - 0.02, level + 0.02))
    assert plan_level_scale(small_case.dose, regions, within) == 1.0
    assert plan_level_scale(small_case.dose, regions, DoseCalibration()) == 1.0  # no range: off
    cold = small_case.dose * 0.8
    scale = plan_level_scale(cold, regions, within)
    assert scale == pytest.approx((level - 0.02) / (0.8 * level))
    assert plan_level(apply_calibration(cold, regions, within, scale), regions) == pytest.approx(level - 0.02)
    hot = small_case.dose * 1.2
    assert plan_level(hot * plan_level_scale(hot, regions, within), regions) == pytest.approx(level + 0.02)
    assert plan_level_scale(np.zeros_like(cold), regions, within) == 1.0  # no dose in the targets: nothing to scale
    assert plan_levels_range(np.linspace(0.9, 1.1, 401)) == pytest.approx((0.905, 1.095))


def test_fit_keeps_the_given_plan_level_range_and_it_mends_a_cold_plan(small_case):
    level = plan_level(small_case.dose, CaseRegions.of(small_case))
    level_range = (level - 0.01, level + 0.01)
    calibration, fit = fit_calibration([small_case], [small_case.dose * 0.85], plan_level_range=level_range)
    assert calibration.plan_level_range == level_range
    assert fit["after"]["dose_score_gy"] < 0.5 * fit["before"]["dose_score_gy"]


def test_card_round_trip():
    assert DoseCalibration.from_card({}) is None
    for calibration in (DoseCalibration(0.4, 1.02, 0.02), DoseCalibration(0.4, 1.02, 0.02, lower_target_lift=0.6),
                        DoseCalibration(0.4, 1.02, 0.02, plan_level_range=(0.97, 1.05))):
        assert DoseCalibration.from_card({"calibration": {**calibration.as_dict(), "text": "..."}}) == calibration
    assert DoseCalibration(0.4).lift_below_top == 0.4  # cards without a lower lift: one lift for all targets


def test_predictor_applies_the_card_calibration(small_case):
    pytest.importorskip("torch", reason="torch not installed (pip install -e '.[models]')")
    from doseai.predict import DosePredictor

    predictor = DosePredictor(device="cpu", threads=1)
    predictor.card = {key: value for key, value in predictor.card.items() if key != "calibration"}
    predictor.set_case(small_case)
    assert np.array_equal(predictor.predict(oar_sparing=0.5), predictor.calibrate(predictor.predict(oar_sparing=0.5)))
    # a calibration that arrives after set_case still applies
    predictor.card = {**predictor.card, "calibration": {"target_lift": 0.5, "target_level": 1.0, "oar_near_max": 0.02}}
    calibrated = predictor.predict(oar_sparing=0.5)
    predictor.calibrated = False
    raw = predictor.predict(oar_sparing=0.5)
    expected = apply_calibration(raw, CaseRegions.of(small_case), DoseCalibration(0.5, 1.0, 0.02))
    assert np.allclose(calibrated, expected) and not np.allclose(calibrated, raw)
    assert "calibration_s" in predictor.timings


def test_predictor_scales_each_case_once_from_its_neutral_dose(small_case):
    pytest.importorskip("torch", reason="torch not installed (pip install -e '.[models]')")
    from doseai.predict import DosePredictor

    predictor = DosePredictor(device="cpu", threads=1)
    # a range above the network's level forces the scale up; lifts off to see the scale alone
    predictor.card = {**predictor.card, "calibration": {"target_lift": 0.0, "target_level": 1.0, "oar_near_max": 0.0,
                                                        "plan_level_range": [1.5, 1.6]}}
    predictor.set_case(small_case)
    first = predictor.predict(oar_sparing=0.5)  # before any neutral prediction: the neutral dose is run for it
    assert predictor.timings["neutral_for_plan_level_s"] > 0 and predictor.timings["condition_network_s"] > 0
    predictor.calibrated = False
    neutral_raw, raw = predictor.predict(), predictor.predict(oar_sparing=0.5)
    regions = CaseRegions.of(small_case)
    scale = 1.5 / plan_level(neutral_raw, regions)
    assert scale > 1.1 and predictor.timings["plan_level_scale"] == pytest.approx(scale, rel=1e-5)
    assert np.allclose(first, raw * scale, rtol=1e-5, atol=1e-4)  # the neutral factor, not this dose's own level
    neutral_raw[:] = 0  # the caller's array is a copy of what the predictor keeps
    predictor.calibrated = True
    assert np.allclose(predictor.predict(oar_sparing=0.5), first)
    predictor.set_case(small_case)  # a new case measures its level again
    assert np.allclose(predictor.predict(), predictor.calibrate(
        predictor._prepared.neutral_network_dose[predictor.network_mode]))


def test_mirror_average_runs_the_network_on_the_swapped_mirror_and_averages(small_case):
    torch = pytest.importorskip("torch", reason="torch not installed (pip install -e '.[models]')")
    from doseai.errors import DoseAIError
    from doseai.predict import DosePredictor, DVHDosePredictor

    predictor = DosePredictor(device="cpu", threads=1)
    predictor.calibrated, predictor.mirror_average = False, False
    predictor.set_case(small_case)
    plain = predictor.predict(oar_sparing=0.5)
    p = predictor._prepared
    mirrored = predictor._mirrored(p)
    names = predictor.card["inputs"]["channels"]
    for channel, source in ((names.index("Parotid_L"), names.index("Parotid_R")),
                            (names.index("Parotid_R"), names.index("Parotid_L")), (names.index("body"),) * 2):
        assert torch.equal(mirrored.anatomy[:, channel], p.anatomy[:, source].flip(-1))
    assert torch.equal(predictor._mirrored(mirrored).anatomy, p.anatomy)  # mirroring twice gives the case back

    predictor.mirror_average = True
    averaged = predictor.predict(oar_sparing=0.5)
    assert averaged.shape == plain.shape and np.isfinite(averaged).all() and not np.array_equal(averaged, plain)
    # the mirrored dose was flipped back: the average stays close to the case's own dose
    body = small_case.structures["External"]
    assert np.abs(averaged - plain)[body].mean() < 0.05 * plain[body].max()

    dvh = DVHDosePredictor(device="cpu", threads=1)  # its condition names sides: no mirror average
    dvh.set_case(small_case)
    dvh.mirror_average = True
    with pytest.raises(DoseAIError, match="mirror"):
        dvh.predict(dvh.dvh_vector(small_case.dose))
    dvh.mirror_average, dvh.mirror_neutral = False, True
    with pytest.raises(DoseAIError, match="mirror_neutral"):
        dvh.predict(dvh.dvh_vector(small_case.dose))


def test_mirror_neutral_adds_the_neutral_mirror_correction_to_every_slider_position(small_case):
    pytest.importorskip("torch", reason="torch not installed (pip install -e '.[models]')")
    from doseai.predict import DosePredictor

    predictor = DosePredictor(device="cpu", threads=1)
    predictor.calibrated, predictor.mirror_average, predictor.mirror_neutral = False, False, False
    predictor.set_case(small_case)
    plain_neutral, plain_spared = predictor.predict(), predictor.predict(oar_sparing=0.8)
    predictor.mirror_average = True
    averaged_neutral, averaged_spared = predictor.predict(), predictor.predict(oar_sparing=0.8)

    predictor.mirror_average, predictor.mirror_neutral = False, True
    assert predictor.network_mode == "mirror_neutral"
    predictor.set_case(small_case)  # a fresh case: nothing mirrored yet
    spared = predictor.predict(oar_sparing=0.8)  # first: the correction is computed here
    assert predictor._prepared.mirrored is None  # the mirror, used once, is not kept with the case
    assert 0 < predictor.timings["mirror_correction_s"] < predictor.timings["condition_network_s"]
    neutral = predictor.predict()
    assert "mirror_correction_s" not in predictor.timings  # once per case
    # at neutral sliders: the mirror average; elsewhere: the network's slider effect on top of it
    assert np.allclose(neutral, averaged_neutral, atol=1e-4)
    dosed = np.minimum.reduce([neutral, spared, plain_neutral, plain_spared]) > 1.0  # no clipping at 0 there
    assert dosed.sum() > 1000
    assert np.allclose((spared - neutral)[dosed], (plain_spared - plain_neutral)[dosed], atol=1e-3)
    assert not np.allclose(spared, averaged_spared, atol=1e-3)  # not the mirror average at that position
    assert not np.allclose(neutral, plain_neutral, atol=1e-3)
    predictor.mirror_average = True  # takes precedence
    assert predictor.network_mode == "mirror_average" and np.allclose(predictor.predict(), averaged_neutral)


def test_calibration_fit_with_mirror_average_records_it_in_the_card(small_case, tmp_path, monkeypatch):
    pytest.importorskip("torch", reason="torch not installed (pip install -e '.[models]')")
    import json
    import shutil

    from doseai.predict import DEFAULT_MODEL, DosePredictor
    from doseai.train.calibrate_preference import calibrate_preference

    weights = tmp_path / "model.pt"
    shutil.copy(DEFAULT_MODEL, weights)
    shutil.copy(DEFAULT_MODEL.with_suffix(".json"), weights.with_suffix(".json"))
    monkeypatch.setattr("doseai.io.openkbp.list_patients", lambda folder: {"pt_1": "pt_1.npz"})
    monkeypatch.setattr("doseai.io.openkbp.load_npz", lambda path: small_case)
    calibrate_preference(weights, limit=1, threads=1, mirror_average=True)
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["inference"]["mirror_average"] is True and card["calibration"]["fit"]["patients"] == 1
    assert DosePredictor(weights, device="cpu", threads=1).mirror_average
    calibrate_preference(weights, limit=1, threads=1, mirror_average=False)
    assert json.loads(weights.with_suffix(".json").read_text())["inference"]["mirror_average"] is False
    calibrate_preference(weights, limit=1, threads=1, mirror_neutral=True)
    assert json.loads(weights.with_suffix(".json").read_text())["inference"]["mirror_neutral"] is True
    assert DosePredictor(weights, device="cpu", threads=1).network_mode == "mirror_neutral"
