"""Pareto plan generation and the DVH vector (DVH-conditioned network groundwork), on a small sample."""

from __future__ import annotations

import numpy as np
import pytest

from doseai.dvh import dose_at_fraction_from_row, dose_at_volume_cc, dvh_vector, match_near_max


def test_dvh_vector_is_a_fixed_size_cumulative_dvh():
    dose = np.array([[[0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0]]], np.float32)
    ptv = np.zeros(dose.shape, bool)
    ptv[..., 4:] = True  # 40, 50, 60, 70 Gy
    vector = dvh_vector(dose, {"PTV_70": ptv}, ["PTV_70", "Brainstem"], 70.0, n_points=8, max_relative_dose=1.0)
    assert vector.shape == (2, 8) and vector.dtype == np.float32
    levels = np.linspace(0, 70, 8)  # 0, 10, ..., 70
    np.testing.assert_allclose(vector[0], [(dose[ptv] >= level).mean() for level in levels])
    assert np.all(vector[1] == 0)  # a missing structure is a row of zeros
    assert np.all(np.diff(vector[0]) <= 0)
    with pytest.raises(ValueError):
        dvh_vector(dose, {"PTV_70": ptv}, ["PTV_70"], 0.0)


def test_a_dose_is_read_off_a_dvh_vector_row_between_its_points():
    row = np.array([1.0, 1.0, 0.5, 0.1, 0.0])  # doses 0, 0.3, 0.6, 0.9, 1.2 x Rx
    assert dose_at_fraction_from_row(row, 0.5) == pytest.approx(0.6)
    assert dose_at_fraction_from_row(row, 0.3) == pytest.approx(0.75)  # halfway from 0.5 to 0.1
    assert dose_at_fraction_from_row(row, 0.05) == pytest.approx(1.05)
    assert dose_at_fraction_from_row(np.zeros(5), 0.5) == 0.0  # nothing anywhere
    assert dose_at_fraction_from_row(np.ones(5), 0.5) == pytest.approx(1.2)  # beyond the last point: its dose
    # on a fine dose sampling, the read-off D_x matches the dose itself
    dose = np.linspace(0.0, 70.0, 1001, dtype=np.float32)[None, None]
    fine = dvh_vector(dose, {"PTV_70": np.ones(dose.shape, bool)}, ["PTV_70"], 70.0, n_points=241)[0]
    assert 70.0 * dose_at_fraction_from_row(fine, 0.02) == pytest.approx(np.quantile(dose, 0.98), abs=0.5)


def test_near_max_matching_moves_only_the_upper_half_of_each_structure():
    rng = np.random.default_rng(0)
    dose = rng.uniform(10.0, 60.0, size=(20, 20, 20)).astype(np.float32)
    oar = np.zeros(dose.shape, bool)
    oar[:10] = True
    masks = {"Brainstem": oar, "PTV_70": np.zeros(dose.shape, bool)}  # an empty structure is left alone
    names = ["PTV_70", "Brainstem"]
    hotter = dose * 1.1
    vector = dvh_vector(hotter, masks, names, 70.0, n_points=241)  # a fine vector: reads D0.1cc closely
    voxel_cc = 0.001
    matched = match_near_max(dose, masks, names, vector, 70.0, voxel_cc)
    wanted = dose_at_volume_cc(hotter[oar], 0.1, voxel_cc)
    assert dose_at_volume_cc(matched[oar], 0.1, voxel_cc) == pytest.approx(wanted, abs=0.5)
    lower_half = oar & (dose <= np.median(dose[oar]))
    assert np.array_equal(matched[lower_half], dose[lower_half]) and np.array_equal(matched[~oar], dose[~oar])
    # the offset lowers the target D0.1cc by that fraction of the prescription
    offset = match_near_max(dose, masks, names, vector, 70.0, voxel_cc, offset_relative=0.05)
    assert dose_at_volume_cc(offset[oar], 0.1, voxel_cc) == pytest.approx(wanted - 3.5, abs=0.5)


def test_pareto_plans_trade_coverage_for_sparing():
    pytest.importorskip("pyRadPlan", reason="pyRadPlan not installed (see README: pip install --no-deps pyradplan)")
    import torch

    from doseai.sample import make_sample_case
    from doseai.train.pareto import DVH_STRUCTURES, pareto_plans

    torch.set_num_threads(1)
    case = make_sample_case(seed=3, shape=(24, 48, 48))  # targets clear of the CT edge (pyRadPlan needs that)
    plans = pareto_plans(case, n_plans=4, n_beams=3, bixel_width_mm=10.0, max_iterations=60,
                         oar_weight_range=(0.01, 100.0), n_varied=1, seed=5)
    assert plans["doses"].shape == (4, *case.geometry.shape)
    assert plans["dvh_vectors"].shape == (4, len(DVH_STRUCTURES), 32)
    oars = np.zeros(case.geometry.shape, bool)
    for name in case.oars:
        oars |= case.structures[name]
    sweep = plans["doses"][:3]
    mean_oar = [d[oars].mean() for d in sweep]
    coverage = [np.percentile(d[case.structures["PTV_70"]], 5) for d in sweep]
    assert mean_oar[0] > mean_oar[-1]  # more OAR weight: lower OAR dose ...
    assert coverage[0] > coverage[-1]  # ... at the cost of target coverage
    # ... not of hot spots: the DVH vector ends at 1.2 x Rx (the body term at priority 10 above Rx let this case
    # reach 1.34 x Rx; the hot-spot control keeps it at 1.12)
    assert plans["doses"].max() <= 1.15 * max(case.prescriptions.values())
    columns = [DVH_STRUCTURES.index(name) for name in case.oars]
    weights = plans["oar_weights"][:, columns]
    assert np.all(np.diff(weights[:3], axis=0) > 0) and np.all(weights[:3] == weights[:3, :1])  # one level each
    assert np.unique(weights[3]).size == len(columns)  # the varied plan: a weight of its own per OAR
    assert np.all(plans["oar_weights"][:, :3] == 0)  # targets carry no OAR weight


def test_generation_skips_a_failing_patient_and_keeps_the_reason(tmp_path, monkeypatch):
    import doseai.train.pareto as pareto
    from doseai.cli import main

    split = tmp_path / "data" / "openkbp" / "train"
    split.mkdir(parents=True)
    for number in (1, 2):
        assert main(["sample", "--format", "openkbp-npz", "--out", str(split / f"pt_{number}.npz"),
                     "--seed", str(number)]) == 0
    monkeypatch.setenv("DOSEAI_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("DOSEAI_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_plans(case, n_plans, *args, **kwargs):  # the engine fails on the first patient only
        calls.append(case.patient_id)
        if len(calls) == 1:
            raise ValueError("rays miss the body")
        shape = case.geometry.shape
        return {"doses": np.zeros((n_plans, *shape), np.float32),
                "dvh_vectors": np.zeros((n_plans, len(DVH_STRUCTURES), 32), np.float32),
                "oar_weights": np.zeros((n_plans, len(DVH_STRUCTURES)), np.float32)}

    from doseai.train.pareto import DVH_STRUCTURES

    monkeypatch.setattr(pareto, "pareto_plans", fake_plans)
    folder = pareto.generate_pareto("t", n_plans=2)
    assert (folder / "pt_1.failed.txt").read_text().startswith("ValueError: rays miss the body")
    assert np.load(folder / "pt_2.npz")["doses"].shape[0] == 2
    pareto.generate_pareto("t", n_plans=2)  # resumed: neither patient is planned again
    assert len(calls) == 2


def test_pareto_plans_need_a_body():
    from doseai.sample import make_sample_case
    from doseai.train.pareto import pareto_plans

    case = make_sample_case(seed=3, shape=(24, 48, 48))
    case.structures.pop("External", None)
    case.possible_dose_mask = None
    with pytest.raises(ValueError, match="no body"):
        pareto_plans(case, n_plans=2)
