"""The DVH-conditioned model: network start-up, training-pair sampling, the predictor, desired-DVH CSVs and
``doseai predict --desired-dvh``, on small inputs (a random tiny model; quality: bench_dvh.py)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from doseai.cli import main
from doseai.dvh import dvh_vector_from_curves
from doseai.errors import DoseAIError, UnreadableInputError
from doseai.models.dvh_conditioned import (DEFAULT_DVH_LAYOUT, as_condition, build_dvh_net, condition_size,
                                           load_matching_weights)
from doseai.models.preference import PreferenceDoseNet
from doseai.predict import DVHDosePredictor
from doseai.report import read_dvh_csv
from doseai.train.train_dvh import (CHANNELS, EDIT_EMPHASIS, ParetoPatient, difference_loss, dose_loss,
                                    nearest_mix, nearest_plan, projection_target, reference_plan,
                                    sample_desired_dvh, stretch_curve, structure_masks, structure_metric_loss,
                                    training_step_loss)

SMALL = {"down_channels": [4, 8, 8, 8], "film_hidden": 8, "refine_channels": 4}
SMALL_PRIOR = {"channels": [4, 8], "num_embeddings": 16, "embedding_dim": 4}


def test_dvh_net_starts_as_the_preference_model_at_neutral_sliders():
    torch.manual_seed(0)
    preference = PreferenceDoseNet(11, SMALL_PRIOR, {**SMALL, "refine_film": True}).eval()
    for module in preference.modules():  # non-trivial slider layers, so the check can fail
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.5)
            torch.nn.init.normal_(module.bias, std=0.5)
    net = build_dvh_net(11, SMALL_PRIOR, DEFAULT_DVH_LAYOUT, SMALL).eval()
    zeroed = load_matching_weights(net, preference.state_dict())
    assert zeroed and all(name.endswith("mlp.0.weight") for name in zeroed)
    x = torch.rand(1, 11, 32, 32, 32)
    dvh = torch.rand(1, condition_size(DEFAULT_DVH_LAYOUT))
    with torch.no_grad():
        expected = preference(x, torch.zeros(1, 2))
        torch.testing.assert_close(net(x, dvh), expected)
        torch.testing.assert_close(net(x, torch.zeros_like(dvh)), expected)
    with pytest.raises(ValueError):
        load_matching_weights(build_dvh_net(11, SMALL_PRIOR, DEFAULT_DVH_LAYOUT, {**SMALL, "film_hidden": 4}),
                              preference.state_dict())
    # with the mean-offset layer: its gains start at 0, so the network is still the preference model
    with_offset = build_dvh_net(11, SMALL_PRIOR, DEFAULT_DVH_LAYOUT, {**SMALL, "mean_offset_sigma_zyx": [0.5, 0.6, 0.6]})
    assert "offset.gain" in load_matching_weights(with_offset.eval(), preference.state_dict())
    masks = structure_masks(x, DEFAULT_DVH_LAYOUT["structures"], 70.0)
    assert masks
    with torch.no_grad():
        features = with_offset.encode_anatomy(x)
        torch.testing.assert_close(with_offset.decode(with_offset.latent(features, dvh), x, dvh, masks=masks), expected)


def test_mean_offset_moves_each_structure_toward_its_desired_mean():
    from doseai.dvh import dvh_vector
    from doseai.models.dvh_conditioned import MeanDoseOffset

    layout = DEFAULT_DVH_LAYOUT
    structures = layout["structures"]
    shape = (12, 12, 24)
    ptv, parotid = np.zeros(shape, bool), np.zeros(shape, bool)
    ptv[3:9, 3:9, 2:8] = True
    parotid[3:9, 3:9, 10:22] = True
    parotid[3:9, 3:9, 6:10] = True  # partly inside the PTV: no sparing there
    dose = np.zeros(shape, np.float32)
    dose[ptv] = 1.0
    dose[parotid & ~ptv] = 0.5
    desired_dose = dose.copy()
    desired_dose[parotid & ~ptv] = 0.3  # the user asks for less parotid dose
    desired = dvh_vector(desired_dose, {"PTV_70": ptv, "Parotid_L": parotid}, structures, 1.0,
                         layout["n_points"], layout["max_relative_dose"])
    layer = MeanDoseOffset(layout)
    condition = torch.from_numpy(desired.reshape(1, -1))
    means = layer.desired_means(condition)
    assert float(means[structures.index("Parotid_L")]) == pytest.approx(desired_dose[parotid].mean(), abs=0.02)
    masks = [(structures.index("PTV_70"), torch.from_numpy(ptv)), (structures.index("Parotid_L"), torch.from_numpy(parotid))]
    x = torch.from_numpy(dose)[None, None]
    torch.testing.assert_close(layer(x, condition, masks), x)  # gains 0: unchanged
    with torch.no_grad():
        layer.gain.fill_(1.0)
    moved = layer(x, condition, masks)[0, 0].detach().numpy()
    assert moved[6, 6, 16] == pytest.approx(0.5 + (desired_dose[parotid].mean() - dose[parotid].mean()), abs=0.03)
    assert moved[6, 6, 16] < 0.4  # well inside the parotid: lowered toward 0.3
    assert moved[6, 6, 4] == pytest.approx(1.0, abs=0.02)  # the PTV was on its desired mean: kept
    assert moved[0, 0, 0] == 0.0 and moved[6, 6, 23] < 0.1  # far outside: untouched; next to it: smoothed, small


def test_condition_is_checked():
    layout = DEFAULT_DVH_LAYOUT
    shape = (len(layout["structures"]), layout["n_points"])
    assert as_condition(np.full(shape, 0.5), layout).shape == (1, condition_size(layout))
    for bad in (np.zeros((3, 32)), np.full(shape, np.nan), np.full(shape, 1.5)):
        with pytest.raises(ValueError):
            as_condition(bad, layout)


def test_training_pairs_project_onto_the_pareto_set():
    rng = np.random.default_rng(0)
    levels = np.linspace(1, 0, 32, dtype=np.float32)
    plans = np.stack([np.stack([np.clip(levels * 1.5 - s, 0, 1)] * 4) for s in (0.0, 0.2, 0.4)])  # 3 plans
    assert nearest_plan(plans, plans[1]) == 1
    assert nearest_plan(plans, plans[2] - 0.01) == 2
    for _ in range(50):
        desired, weights, start = sample_desired_dvh(plans, rng)
        assert desired.shape == plans.shape[1:] and desired.dtype == np.float32
        assert np.all(np.diff(desired, axis=1) <= 1e-6)  # still cumulative DVHs
        assert weights.shape == (4,) and set(np.unique(weights)) <= {1.0, EDIT_EMPHASIS}
        assert 0 <= nearest_plan(plans, desired, weights) < 3
        reference = reference_plan(plans, desired, start, rng)
        if EDIT_EMPHASIS in weights:  # an edit is paired with the plan it edits
            assert reference == start
        assert not np.array_equal(plans[reference], desired)  # a pair never differs by nothing


def test_single_curve_edit_projects_onto_the_plan_that_follows_the_edit():
    levels = np.linspace(1, 0, 32, dtype=np.float32)
    unedited = np.stack([levels] * 4)
    spares_row_0 = unedited.copy()
    spares_row_0[0] = stretch_curve(levels, 0.7)
    spares_row_0[1:] = stretch_curve(levels, 1.1)  # the other curves pay for it
    plans = np.stack([unedited, spares_row_0])
    desired = unedited.copy()
    desired[0] = stretch_curve(levels, 0.75)
    assert nearest_plan(plans, desired) == 0  # plain l1: the other three curves outvote the edit
    weights = np.ones(4, np.float32)
    weights[0] = EDIT_EMPHASIS
    assert nearest_plan(plans, desired, weights) == 1
    curve = np.linspace(1, 0, 32).astype(np.float32)
    np.testing.assert_allclose(stretch_curve(curve, 1.0), curve)
    assert np.all(stretch_curve(curve, 0.8) <= curve + 1e-6)  # squeezed toward lower doses: less volume


def test_desired_dvh_from_curves_interpolates_and_keeps_the_base():
    names = ["PTV_70", "Brainstem"]
    levels = np.linspace(0, 84, 8)
    base = np.full((2, 8), 0.25, np.float32)
    curves = {"Brainstem": (np.array([0.0, 42.0, 84.0]), np.array([100.0, 50.0, 0.0])), "Other": (levels, levels)}
    vector, used = dvh_vector_from_curves(curves, names, levels, base)
    assert used == ["Brainstem"]
    np.testing.assert_allclose(vector[0], base[0])
    np.testing.assert_allclose(vector[1], 1 - levels / 84, atol=1e-6)
    rising = {"Brainstem": (np.array([0.0, 42.0, 84.0]), np.array([50.0, 80.0, 0.0]))}  # not a cumulative DVH
    vector, _ = dvh_vector_from_curves(rising, names, levels, base)
    assert np.all(np.diff(vector[1]) <= 0)


def test_read_dvh_csv_round_trip_and_errors(tmp_path, small_case):
    from doseai.report import case_dvhs, write_dvh_csv

    path = write_dvh_csv(case_dvhs(small_case, small_case.dose), tmp_path / "dvh.csv")
    curves = read_dvh_csv(path)
    assert set(curves) == set(case_dvhs(small_case, small_case.dose))
    dose, volume = curves["PTV_70"]
    assert volume[0] == pytest.approx(100.0) and np.all(np.diff(dose) > 0)
    for text in ("", "gy,a\n1,2\n", "dose_gy,PTV_70_volume_pct\n0,100\n1,nan\n", "dose_gy,PTV\n0,100\n0,90\n",
                 "dose_gy,PTV\n0,140\n1,90\n"):
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(UnreadableInputError):
            read_dvh_csv(bad)


def test_dvh_predictor_on_the_case_grid(tiny_dvh_model, small_case):
    predictor = DVHDosePredictor(tiny_dvh_model)
    predictor.set_case(small_case)
    base = predictor.dvh_vector(small_case.dose)
    assert base.shape == (len(predictor.structures), 32)
    dose = predictor.predict(base)
    assert dose.shape == small_case.geometry.shape and dose.dtype == np.float32
    assert np.all(dose >= 0) and np.all(np.isfinite(dose))
    lowered = base.copy()
    lowered[predictor.structures.index("Brainstem")] *= 0.3
    assert not np.allclose(predictor.predict(lowered), dose)  # the condition reaches the dose
    with pytest.raises(DoseAIError):
        predictor.predict(base[:3])
    curves = predictor.as_dvhs(base, ["PTV_70"])
    assert list(curves) == ["PTV_70"] and curves["PTV_70"].volume_pct[0] == pytest.approx(100.0)
    # with near-max matching in the card, each structure's D0.1cc is the one the desired curve gives
    from doseai.dvh import dose_at_fraction_from_row, dose_at_volume_cc

    predictor.card["near_max_matching"] = {"offset_relative": 0.0}
    matched = predictor.predict(base)
    mask, row = small_case.structures["Brainstem"], predictor.structures.index("Brainstem")
    voxel_cc = float(np.prod(small_case.geometry.spacing)) / 1000.0
    wanted = dose_at_fraction_from_row(base[row], 0.1 / (mask.sum() * voxel_cc)) * max(small_case.prescriptions.values())
    assert dose_at_volume_cc(matched[mask], 0.1, voxel_cc) == pytest.approx(wanted, abs=0.05)
    assert abs(dose_at_volume_cc(dose[mask], 0.1, voxel_cc) - wanted) > 0.5  # the tiny network alone is not there
    predictor.near_max_matching = False
    np.testing.assert_array_equal(predictor.predict(base), dose)


def test_dvh_predictor_needs_its_weights(tmp_path):
    with pytest.raises(UnreadableInputError):
        DVHDosePredictor(tmp_path / "missing.pt")


def test_cli_predict_from_a_desired_dvh(tmp_path, tiny_dvh_model, capsys):
    case_path = tmp_path / "case"
    assert main(["sample", "--out", str(case_path)]) == 0
    assert main(["dvh", "--case", str(case_path), "--out", str(tmp_path / "ref")]) == 0
    edited = tmp_path / "edited.csv"
    lines = (tmp_path / "ref" / "dvh.csv").read_text().splitlines()
    header = lines[0].split(",")
    keep = [0, header.index("Brainstem_volume_pct")]
    edited.write_text("\n".join(",".join(line.split(",")[i] for i in keep) for line in lines))
    out = tmp_path / "dose.nrrd"
    code = main(["predict", "--case", str(case_path), "--desired-dvh", str(edited), "--dvh-weights",
                 str(tiny_dvh_model), "--out", str(out), "--report", str(tmp_path / "report")])
    assert code == 0 and out.is_file()
    assert (tmp_path / "report" / "dvh_vs_desired.png").is_file()
    printed = capsys.readouterr().out
    assert "from the desired DVH of Brainstem" in printed and "other structures' mean change" in printed
    assert re.search(r"Brainstem +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+", printed)  # achieved vs asked, mean and D0.1cc
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("dose_gy,Liver_volume_pct\n0,100\n10,0\n")
    assert main(["predict", "--case", str(case_path), "--desired-dvh", str(unknown), "--dvh-weights",
                 str(tiny_dvh_model), "--out", str(tmp_path / "x.nrrd")]) == 2


def test_demo_dvh_edit_writes_an_editable_csv(tmp_path, tiny_dvh_model, small_case, capsys):
    from doseai.cli import _demo_dvh_edit

    _demo_dvh_edit(small_case, tmp_path, "cpu", False, weights=tiny_dvh_model)
    curves = read_dvh_csv(tmp_path / "desired_dvh.csv")  # the format predict --desired-dvh reads back
    assert len(curves) == 1 and next(iter(curves)).startswith("Parotid")
    assert (tmp_path / "dvh_vs_desired.png").is_file()
    assert "curve moved to 80 % of its doses" in capsys.readouterr().out


def test_shipped_dvh_model_matches_its_card(small_case):
    from doseai.models.dvh_conditioned import DEFAULT_DVH_LAYOUT
    from doseai.predict import DEFAULT_DVH_MODEL

    if not DEFAULT_DVH_MODEL.is_file():
        pytest.skip(f"{DEFAULT_DVH_MODEL} not shipped")
    predictor = DVHDosePredictor()
    assert predictor.card["dvh"]["structures"] == DEFAULT_DVH_LAYOUT["structures"]
    assert set(predictor.card["validation"]) >= {"accuracy", "responsiveness", "latency_s"}
    predictor.set_case(small_case)
    dose = predictor.predict(predictor.dvh_vector(small_case.dose))
    assert dose.shape == small_case.geometry.shape and np.isfinite(dose).all() and dose.max() > 0


def test_near_max_calibration_on_training_plans(tmp_path, monkeypatch):
    import json
    import shutil

    from doseai.dvh import dvh_vector
    from doseai.io import openkbp
    from doseai.models.features import GridSpec, model_geometry
    from doseai.paths import REPO_ROOT, openkbp_root
    from doseai.resample import resample_to
    from doseai.train.train_dvh import calibrate_near_max

    source = openkbp_root() / "train"
    if not source.is_dir():
        pytest.skip(f"OpenKBP data not found at {source} (../shared/data)")
    monkeypatch.setenv("DOSEAI_CACHE", str(tmp_path / "cache"))
    card = json.loads((REPO_ROOT / "Resources/Models/dose_dvh_v3.json").read_text())
    weights = tmp_path / "model.pt"
    weights.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(DoseAIError, match="no training Pareto plans"):
        calibrate_near_max(weights, "tiny")
    # one "plan": the patient's own dose, its vector from the case grid, its dose through the model grid
    case = openkbp.load_npz(openkbp.list_patients(source)["pt_1"])
    grid = model_geometry(case, GridSpec.from_card(card))
    rx = case.max_prescription
    folder = tmp_path / "cache" / "pareto" / "tiny" / "train"
    folder.mkdir(parents=True)
    np.savez(folder / "pt_1.npz", doses=resample_to(case.dose, case.geometry, grid)[None].astype(np.float16),
             dvh_vectors=dvh_vector(case.dose, case.structures, card["dvh"]["structures"], rx)[None])
    matching = calibrate_near_max(weights, "tiny")
    # the model grid smooths the hottest 0.1 cc, so the curve reads higher: a small positive offset
    assert 0.0 < matching["offset_relative"] < 0.1
    assert json.loads(weights.with_suffix(".json").read_text())["near_max_matching"] == matching
    shutil.rmtree(folder)


def test_projection_onto_mixes_of_two_plans():
    levels = np.linspace(1, 0, 32, dtype=np.float32)
    plans = np.stack([np.stack([stretch_curve(levels, f)] * 3) for f in (0.6, 1.0, 1.2)])  # 3 plans, 3 curves
    assert nearest_mix(plans, plans[2]) in {(0, 2, 0.0), (1, 2, 0.0)}  # a plan itself: mix weight 0 on the other
    i, j, a = nearest_mix(plans, 0.3 * plans[0] + 0.7 * plans[1])
    assert (i, j) == (0, 1) and a == pytest.approx(0.3)
    doses = np.stack([np.full((2, 2, 2), value, np.float16) for value in (0.2, 0.5, 0.9)])
    patient = ParetoPatient("pt", np.zeros((1, 2, 2, 2), np.float16), doses, plans)
    np.testing.assert_allclose(projection_target(patient, 0.3 * plans[0] + 0.7 * plans[1], np.ones(3), "mixes"),
                               0.3 * 0.2 + 0.7 * 0.5, atol=1e-3)
    np.testing.assert_allclose(projection_target(patient, 0.3 * plans[0] + 0.7 * plans[1], np.ones(3), "plans"),
                               0.5, atol=1e-3)
    with pytest.raises(ValueError, match="targets"):
        projection_target(patient, plans[0], np.ones(3), "nearest")


def test_structure_metric_loss_sees_mean_and_near_max_errors():
    norm_gy = 70.0
    x = torch.zeros(1, len(CHANNELS), 8, 8, 8)
    x[0, CHANNELS.index("target_dose"), :4] = 70.0 / norm_gy
    x[0, CHANNELS.index("Parotid_R"), 4:] = 1.0
    masks = structure_masks(x, ["PTV_70", "PTV_63", "Parotid_R"], norm_gy)
    assert [index for index, _ in masks] == [0, 2]  # no PTV_63 voxels: left out
    assert int(masks[0][1].sum()) == 256 and bool(masks[1][1][5].all())
    y = torch.rand(1, 1, 8, 8, 8)
    assert float(structure_metric_loss(y, y, masks)) == 0.0
    assert float(structure_metric_loss(y + 0.1, y, masks)) == pytest.approx(0.1 * (1.0 + 0.5), rel=1e-4)
    # an edited Parotid_R counting 10x: (1 x PTV_70 + 10 x Parotid_R) / 2 structures
    weights = np.array([1.0, 1.0, 10.0])
    assert float(structure_metric_loss(y + 0.1, y, masks, weights)) == pytest.approx(0.1 * 1.5 * 11 / 2, rel=1e-4)
    # the near-max term alone: only the hottest voxels move, the means barely
    hot = y.clone()
    for _, mask in masks:
        values = hot[0, 0][mask]
        values[values.topk(max(2, int(0.02 * values.numel()))).indices] += 0.5
        hot[0, 0][mask] = values
    base, heavier = (float(structure_metric_loss(hot, y, masks, near_max_weight=w)) for w in (0.5, 2.0))
    mean_part = float(structure_metric_loss(hot, y, masks, near_max_weight=0.0))
    assert heavier - mean_part == pytest.approx(4 * (base - mean_part), rel=1e-4) and base - mean_part > 0.2


def test_difference_loss_sees_only_how_the_dose_follows_the_condition():
    norm_gy = 70.0
    x = torch.zeros(1, len(CHANNELS), 8, 8, 8)
    x[0, CHANNELS.index("target_dose"), :4] = 70.0 / norm_gy
    x[0, CHANNELS.index("Parotid_R"), 4:] = 1.0
    x[0, CHANNELS.index("body")] = 1.0
    masks = structure_masks(x, ["PTV_70", "Parotid_R"], norm_gy)
    body = x[:, CHANNELS.index("body"):CHANNELS.index("body") + 1] > 0.5
    target_change = torch.zeros(1, 1, 8, 8, 8)
    target_change[..., 4:, :, :] = -0.05  # the edit lowers the parotid
    # both predictions off by the same anatomy error: their difference is exact, no loss
    anatomy_error = torch.rand(1, 1, 8, 8, 8)
    unedited = torch.rand(1, 1, 8, 8, 8)
    exact = (unedited + target_change + anatomy_error) - (unedited + anatomy_error)
    assert float(difference_loss(exact, target_change, body, masks)) == pytest.approx(0.0, abs=1e-6)
    # a prediction that ignores the edit: voxel term 0.05 on half the body + mean term 0.05 on one of two structures
    ignored = torch.zeros_like(target_change)
    assert float(difference_loss(ignored, target_change, body, masks)) == pytest.approx(0.025 + 0.05 / 2, rel=1e-4)
    weights = np.array([1.0, 10.0])
    assert float(difference_loss(ignored, target_change, body, masks, weights)) == pytest.approx(0.025 + 0.5 / 2,
                                                                                                rel=1e-4)


def test_training_step_loss_pairs_a_sample_with_its_reference():
    torch.manual_seed(0)
    net = build_dvh_net(len(CHANNELS), SMALL_PRIOR, DEFAULT_DVH_LAYOUT, SMALL)
    x = torch.rand(1, len(CHANNELS), 32, 32, 32)
    y = torch.rand(1, 1, 32, 32, 32)
    condition = torch.rand(1, condition_size(DEFAULT_DVH_LAYOUT))
    weights = np.ones(len(DEFAULT_DVH_LAYOUT["structures"]))
    single, parts = training_step_loss(net, x, y, condition, [], weights, pair_weight=1.0)
    assert single.item() == pytest.approx(dose_loss(net, x, y, condition)[0].item(), rel=1e-5)
    assert "difference" not in parts
    # a pair of identical samples: no difference loss, the same loss as one sample
    paired, parts = training_step_loss(net, x, y.repeat(2, 1, 1, 1, 1), condition.repeat(2, 1), [], weights, 1.0)
    assert parts["difference"] == pytest.approx(0.0, abs=1e-6) and paired.item() == pytest.approx(single.item(), rel=1e-5)
    # a pair whose targets differ: the difference loss counts and gradients reach the condition layers
    other = torch.cat([y, y * 0.5])
    paired, parts = training_step_loss(net, x, other, torch.cat([condition, condition * 0.5]), [], weights, 1.0)
    assert parts["difference"] > 0
    paired.backward()
    film = [p.grad for name, p in net.named_parameters() if ".mlp." in name]  # the condition's FiLM layers
    assert film and any(g is not None and g.abs().sum() > 0 for g in film)


def test_train_export_and_predict_a_dvh_model(small_case, monkeypatch, tmp_path):
    """``train_dvh`` on two tiny Pareto sets (scaled copies of the sample dose), resumed, exported with its
    card, and loaded by the predictor: the plumbing from training to a dose on the case grid."""
    import json
    from dataclasses import replace

    import doseai.train.train_dvh as train_module
    from doseai.dvh import dvh_vector
    from doseai.models.features import GridSpec, case_features
    from doseai.predict import DEFAULT_MODEL
    from doseai.resample import resample_to
    from doseai.train.export import export_dvh_model

    if not DEFAULT_MODEL.is_file():
        pytest.skip(f"{DEFAULT_MODEL} (the preference weights DVH training starts from) not shipped")
    monkeypatch.setenv("DOSEAI_CACHE", str(tmp_path / "cache"))
    tiny = GridSpec(shape=(32, 32, 32), spacing=(6.0, 6.0, 3.0))
    features, grid = case_features(small_case, tiny)
    rx = max(small_case.prescriptions.values())
    scales = (0.8, 1.0, 1.1)
    plans = [small_case.dose * s for s in scales]
    dvh = np.stack([dvh_vector(d, small_case.structures, DEFAULT_DVH_LAYOUT["structures"], rx) for d in plans])
    doses = np.stack([resample_to(d, small_case.geometry, grid) / 70.0 for d in plans]).astype(np.float16)
    patient = ParetoPatient("pt_1", features.astype(np.float16), doses, dvh.astype(np.float32))
    loaded = []

    def load_pareto_patients(folder, split, spec, norm_gy, known=None):
        assert spec == tiny
        loaded.append(split)
        return {"pt_1": patient}

    monkeypatch.setattr(train_module, "load_pareto_patients", load_pareto_patients)
    config = train_module.DVHTrainingConfig(run_name="tiny_dvh", epochs=1, threads=1, edit_metric_weight=10.0,
                                            pair_weight=1.0, mean_offset=True)
    checkpoint = train_module.train_dvh(tiny, "tiny", DEFAULT_MODEL, config)
    assert loaded == ["validation", "train"]
    train_module.train_dvh(tiny, "tiny", DEFAULT_MODEL, replace(config, epochs=2))  # resumes at epoch 2
    log = [json.loads(line) for line in (checkpoint.parent / "log.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in log] == [0, 1] and all(np.isfinite(r["held_out_body_mae_gy"]) for r in log)
    assert all(np.isfinite(r["difference"]) for r in log)
    assert all(0 < r["seconds"] < 600 for r in log)  # the epoch's own time (a shadowed timer once logged hours)
    assert any(g != 0 for g in log[-1]["offset_gains"])  # the mean-offset gains learn

    weights = export_dvh_model(checkpoint, tmp_path / "models" / "tiny_dvh.pt")
    with pytest.raises(DoseAIError, match="exists"):
        export_dvh_model(checkpoint, weights)
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["network"]["config"]["n_sliders"] == condition_size(DEFAULT_DVH_LAYOUT)
    assert card["network"]["epochs"] == 2 and card["grid"]["shape_zyx"] == [32, 32, 32]
    assert f"weighs {EDIT_EMPHASIS:g}x" in card["training"]["pairs"] and "mix of two" in card["training"]["pairs"]
    assert "edited structure's term counts 10x" in card["training"]["loss"]
    assert "1 x the difference loss" in card["training"]["loss"]

    assert card["network"]["config"]["mean_offset_sigma_zyx"]
    assert set(card["network"]["mean_offset"]["gains"]) == set(DEFAULT_DVH_LAYOUT["structures"])
    predictor = DVHDosePredictor(weights, device="cpu", threads=1)
    predictor.set_case(small_case)
    assert predictor.net.offset is not None and predictor._prepared.decode_extras["masks"]
    dose = predictor.predict(predictor.dvh_vector(small_case.dose))
    assert dose.shape == small_case.geometry.shape and np.isfinite(dose).all() and dose.max() > 0
    # the shipped fp16 weights are the trained ones, rounded
    trained = torch.load(checkpoint, weights_only=True)["model"]
    shipped = torch.load(weights, weights_only=True)
    assert shipped.keys() == trained.keys()
    for key, value in trained.items():
        if value.is_floating_point():
            assert shipped[key].dtype == torch.float16
            torch.testing.assert_close(shipped[key].float(), value, rtol=1e-3, atol=1e-4)


def test_mirroring_swaps_the_parotid_rows_and_their_weights():
    from doseai.train.train_dvh import augment

    class MirrorNoShift:  # an rng that always mirrors and never shifts
        def random(self):
            return 0.0

        def integers(self, low, high, size):
            return np.zeros(size, int)

    structures = DEFAULT_DVH_LAYOUT["structures"]
    right, left = structures.index("Parotid_R"), structures.index("Parotid_L")
    features = np.random.default_rng(0).random((len(CHANNELS), 2, 3, 4)).astype(np.float32)
    dose = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    desired = np.random.default_rng(1).random((len(structures), 32)).astype(np.float32)
    weights = np.ones(len(structures), np.float32)
    weights[right] = EDIT_EMPHASIS
    new_features, new_dose, new_desired, new_weights = augment(features, dose, desired, weights, structures,
                                                               MirrorNoShift())
    np.testing.assert_array_equal(new_dose, dose[..., ::-1])
    np.testing.assert_array_equal(new_features[CHANNELS.index("Parotid_L")], features[CHANNELS.index("Parotid_R"), ..., ::-1])
    np.testing.assert_array_equal(new_desired[left], desired[right])
    assert new_weights[left] == EDIT_EMPHASIS and new_weights[right] == 1.0
    assert weights[right] == EDIT_EMPHASIS  # the caller's arrays are left as they were
    # a stack of DVH vectors (a sample and its reference plan) is mirrored row by row
    stack = np.stack([desired, desired[::-1]])
    mirrored = augment(features, np.concatenate([dose, dose]), stack, weights, structures, MirrorNoShift())[2]
    for one, original in zip(mirrored, stack):
        np.testing.assert_array_equal(one[left], original[right])
        np.testing.assert_array_equal(one[right], original[left])


def test_an_edit_changes_the_start_dose_by_the_networks_difference(tiny_dvh_model, small_case):
    """predict_edit: no edit returns the start dose itself; an edit adds f(desired) - f(DVH of start) to it."""
    from doseai.predict import DVHDosePredictor
    from doseai.train.train_dvh import stretch_curve

    predictor = DVHDosePredictor(tiny_dvh_model, device="cpu")
    predictor.set_case(small_case)
    start = small_case.dose
    unedited = predictor.dvh_vector(start)
    assert np.array_equal(predictor.predict_edit(start, unedited), start)
    desired = unedited.copy()
    row = predictor.structures.index("Parotid_L")
    desired[row] = stretch_curve(desired[row], 0.8)
    expected = np.clip(start + predictor.predict(desired) - predictor.predict(unedited), 0, None)
    expected *= small_case.structures["External"] if "External" in small_case.structures else 1
    edited = predictor.predict_edit(start, desired)
    np.testing.assert_allclose(edited, expected, atol=1e-4)
    assert not np.allclose(edited, start)
    report = predictor.edit_report(edited, desired, ["Parotid_L"])
    mask = small_case.structures["Parotid_L"]
    assert report["Parotid_L"]["mean_gy"] == pytest.approx(float(edited[mask].mean()))
    assert report["Parotid_L"]["desired_mean_gy"] < float(start[mask].mean())  # the curve asks for less
    with pytest.raises(DoseAIError, match="starts from has shape"):
        predictor.predict_edit(start[:-1], desired)
