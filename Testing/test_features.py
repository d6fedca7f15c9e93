import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (pip install -e '.[models]')")

from doseai.errors import DoseAIError  # noqa: E402
from doseai.geometry import ImageGeometry  # noqa: E402
from doseai.models.features import (  # noqa: E402
    DEFAULT_GRID, GridSpec, beam_plate, case_features, channel_names, model_geometry, with_slice_spacing)
from doseai.train.preference_loss import DEFAULT_SEMANTICS, dvh_metric_loss, plan_metrics, preference_gap  # noqa: E402

SMALL_GRID = GridSpec(shape=(16, 24, 32), spacing=(6.0, 6.0, 5.0))


def test_beam_plate_covers_target_and_fans_out():
    geometry = ImageGeometry(shape=(4, 41, 41), spacing=(2.0, 2.0, 2.0))
    target = np.zeros(geometry.shape, bool)
    target[1:3, 18:23, 18:23] = True
    plate = beam_plate(target, geometry, margin_mm=0.0)
    assert plate.min() >= 0 and plate.max() <= 1
    assert np.all(plate[target] == 1.0)  # every beam sees the target
    assert np.all(plate[0] == 0) and np.all(plate[3] == 0)  # coplanar beams stay in the target's slices
    # 9 beams at 40-degree steps: a voxel anterior of the target lies in the 0-degree beam only, a voxel
    # lateral of it in none (no beam near 90 or 270 degrees passes through both)
    assert plate[1, 2, 20] == pytest.approx(1 / 9)
    assert plate[1, 20, 2] == 0


def test_model_grid_is_centred_on_targets_and_body(small_case):
    grid = model_geometry(small_case, SMALL_GRID)
    assert grid.shape == SMALL_GRID.shape and grid.spacing == SMALL_GRID.spacing
    centre = np.array(grid.origin) + (np.array(SMALL_GRID.shape[::-1]) - 1) / 2 * np.array(SMALL_GRID.spacing)
    ptv = np.zeros(small_case.geometry.shape, bool)
    for name in small_case.prescriptions:
        ptv |= small_case.mask(name)
    idx = np.argwhere(ptv)
    ptv_z_centre = small_case.geometry.index_to_physical(((idx.min(0) + idx.max(0)) / 2)[None])[0][2]
    assert centre[2] == pytest.approx(ptv_z_centre)


def test_snapped_model_grid_sits_on_the_case_lattice(small_case):
    from doseai.resample import resample_to

    spec = GridSpec(shape=(16, 25, 25), spacing=(4.0, 4.0, 6.0))  # the case's in-plane voxel, twice its slice
    free = model_geometry(small_case, spec)
    snapped = model_geometry(small_case, GridSpec(spec.shape, spec.spacing, snap_to_case=True))
    offset = (np.array(snapped.origin) - np.array(free.origin)) / np.array(small_case.geometry.spacing)
    assert np.all(np.abs(offset) <= 0.5) and np.any(offset != 0)  # the sample's free grid is off the lattice
    index = small_case.geometry.physical_to_index(np.array([snapped.origin]))[0]
    np.testing.assert_allclose(index, np.round(index), atol=1e-6)
    # in-plane the grids now share voxel centres: a dose constant along z comes back exactly
    dose = np.repeat(np.random.default_rng(0).random((1, 48, 48), dtype=np.float32), 24, axis=0)
    inside = (slice(1, 23), slice(13, 35), slice(13, 35))  # within the model grid
    back = resample_to(resample_to(dose, small_case.geometry, snapped), snapped, small_case.geometry)
    np.testing.assert_allclose(back[inside], dose[inside], atol=1e-5)
    blurred = resample_to(resample_to(dose, small_case.geometry, free), free, small_case.geometry)
    assert np.abs(blurred[inside] - dose[inside]).mean() > 0.01  # what the snap saves
    assert GridSpec.from_card({"grid": {"shape_zyx": [16, 24, 24], "spacing_xyz_mm": [4, 4, 6],
                                        "snap_to_case_lattice": True}}).snap_to_case


def test_case_features_channels(small_case):
    features, grid = case_features(small_case, SMALL_GRID, norm_gy=70.0)
    names = channel_names()
    assert features.shape == (len(names),) + SMALL_GRID.shape and features.dtype == np.float32
    target = features[names.index("target_dose")]
    assert target.max() == pytest.approx(1.0)
    assert np.allclose(sorted(np.unique(target)), [0.0, 56 / 70, 63 / 70, 1.0])
    assert features[names.index("body")].max() == pytest.approx(1.0, abs=1e-3)
    assert np.all(features[names.index("ct")] >= -1.0) and np.all(features[names.index("ct")] <= 1.5)
    assert features[names.index("beam_plate")][target > 0].min() == pytest.approx(1.0)


def test_plan_metrics_and_preference_gap():
    dose = torch.zeros(1, 1, 4, 4, 4)
    dose[0, 0, :2] = 1.0
    dose[0, 0, 2:] = 0.5
    oars = torch.zeros(1, 7, 4, 4, 4, dtype=torch.bool)
    oars[0, 0, 2:] = True
    ptv = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool)
    ptv[0, 0, :2] = True
    metrics = plan_metrics(dose, oars, ptv)
    assert metrics.oar_means[0, 0] == pytest.approx(0.5) and torch.isnan(metrics.oar_means[0, 1:]).all()
    assert metrics.ptv_d95[0] == pytest.approx(1.0) and metrics.ptv_hi[0] == pytest.approx(0.0)
    neutral = torch.zeros(1, 2)
    assert preference_gap(metrics, metrics, neutral) == pytest.approx(0.0)
    # +1 OAR sparing asks for the OAR mean to move by oar_mean_change_at_plus1: the reference itself misses by that
    sparing = torch.tensor([[1.0, 0.0]])
    expected = abs(DEFAULT_SEMANTICS["oar_mean_change_at_plus1"]) * 0.5
    assert preference_gap(metrics, metrics, sparing) == pytest.approx(expected)
    lowered = plan_metrics(dose * torch.where(oars[:, :1], 0.8, 1.0), oars, ptv)
    assert preference_gap(lowered, metrics, sparing) == pytest.approx(0.0, abs=1e-6)


def test_dvh_metric_loss_sees_oar_and_target_errors():
    reference = torch.rand(1, 1, 8, 8, 8)
    oars = torch.zeros(1, 7, 8, 8, 8, dtype=torch.bool)
    oars[0, 0, :3] = True  # one OAR; the other six are absent and must not count
    levels = torch.zeros(1, 1, 8, 8, 8)
    levels[0, 0, 4:6] = 1.0  # two targets at two prescription levels
    levels[0, 0, 6:] = 0.9
    assert float(dvh_metric_loss(reference, reference, oars, levels)) == 0.0
    # a uniform shift moves every stand-in by the shift: OAR mean + hottest 1 % (2 terms), each target's
    # coldest 5 %, hottest 1 % and mean (3 terms); averaged over the 3 structures
    shifted = dvh_metric_loss(reference + 0.1, reference, oars, levels)
    assert float(shifted) == pytest.approx(0.1 * (2 + 3 + 3) / 3, rel=1e-4)
    # an error confined to one target's coldest voxels is seen (the voxel-averaged L1 would dilute it)
    cold = reference.clone()
    target = levels[0, 0] == 0.9
    cold[0, 0][target & (reference[0, 0] < 0.1)] -= 0.05
    assert float(dvh_metric_loss(cold, reference, oars, levels)) > 0.0
    assert float(dvh_metric_loss(reference, reference, oars, torch.zeros_like(levels))) == 0.0


@pytest.mark.parametrize("neutral_fraction", [0.4, 0.6])
def test_slider_sampling_follows_the_neutral_fraction(neutral_fraction):
    from doseai.train.train_preference import sample_sliders

    rng = np.random.default_rng(0)
    draws = np.array([sample_sliders(rng, neutral_fraction) for _ in range(4000)])
    neutral = (draws == 0).all(axis=1)
    assert neutral.mean() == pytest.approx(neutral_fraction, abs=0.03)
    moved = draws[~neutral]
    only_oar = (moved[:, 0] != 0) & (moved[:, 1] == 0)
    assert only_oar.mean() == pytest.approx(5 / 12, abs=0.04)
    assert np.abs(draws).max() <= 1.0


def test_mirror_order_swaps_every_left_right_pair_and_keeps_the_rest():
    from doseai.models.features import mirror_order

    names = ["ct", "Parotid_R", "Parotid_L", "OpticNrv_L", "Lens_L", "OpticNrv_R", "body"]
    order = mirror_order(names)
    assert [names[i] for i in order] == ["ct", "Parotid_L", "Parotid_R", "OpticNrv_R", "Lens_L", "OpticNrv_L", "body"]
    assert [order[i] for i in order] == list(range(len(names)))  # mirroring twice gives the names back


def test_unlike_training_flags_an_oar_far_outside_the_training_volumes(small_case):
    import dataclasses

    from doseai.models.features import structure_volumes_cc, unlike_training

    cord = structure_volumes_cc(small_case, ["SpinalCord"])["SpinalCord"]
    card = {"inputs": {"training_volumes_cc": {"SpinalCord": [cord / 1.5, cord * 1.5], "Brainstem": [1.0, 50.0]}}}
    assert unlike_training(small_case, card) == []
    assert unlike_training(small_case, {"inputs": {}}) == []  # a card without volumes flags nothing
    # another structure under the cord's name: 3x the largest training cord
    card["inputs"]["training_volumes_cc"]["SpinalCord"] = [cord / 10, cord / 3]
    notes = unlike_training(small_case, card)
    assert len(notes) == 1 and notes[0].startswith(f"SpinalCord is {cord:.0f} cc")
    card["inputs"]["training_volumes_cc"]["SpinalCord"] = [cord * 3, cord * 10]  # and far too small
    assert len(unlike_training(small_case, card)) == 1
    no_cord = np.zeros_like(small_case.structures["SpinalCord"])
    empty = dataclasses.replace(small_case, structures={**small_case.structures, "SpinalCord": no_cord})
    assert unlike_training(empty, card) == []  # an empty structure is a missing one, reported as such elsewhere


def test_predictor_lists_the_case_warnings_and_the_cli_prints_them(small_case, tmp_path, capsys, caplog):
    import json
    import shutil

    from doseai.cli import main
    from doseai.io import save_case
    from doseai.predict import DEFAULT_MODEL, DosePredictor

    weights = tmp_path / "model.pt"
    shutil.copy(DEFAULT_MODEL, weights)
    card = json.loads(DEFAULT_MODEL.with_suffix(".json").read_text())
    assert "SpinalCord" in card["inputs"]["training_volumes_cc"]  # the shipped card has them
    card["inputs"]["training_volumes_cc"]["SpinalCord"] = [0.01, 0.02]
    weights.with_suffix(".json").write_text(json.dumps(card))
    predictor = DosePredictor(weights, device="cpu", threads=1)
    predictor.set_case(small_case)
    assert len(predictor.case_warnings) == 1 and "SpinalCord" in caplog.text
    case_folder = save_case(small_case, tmp_path / "case", "nrrd")
    assert main(["predict", "--case", str(case_folder), "--weights", str(weights), "--out",
                 str(tmp_path / "dose.nrrd")]) == 0
    assert "warning: SpinalCord is" in capsys.readouterr().err


def test_targets_outside_the_model_field_are_measured_and_named(small_case):
    from doseai.models.features import outside_field, share_outside_grid

    grid = model_geometry(small_case, SMALL_GRID)  # 192 x 144 x 80 mm around a 192 x 192 x 72 mm phantom
    targets = np.any([small_case.mask(name) for name in small_case.prescriptions], axis=0)
    assert share_outside_grid(targets, small_case.geometry, grid) == 0.0
    assert outside_field(small_case, grid) == []
    assert share_outside_grid(np.ones(small_case.geometry.shape, bool), small_case.geometry, grid) > 0.2
    # a field 4 slices (20 mm) tall around the targets' centre: their upper and lower slices fall outside
    short = model_geometry(small_case, GridSpec(shape=(4, 24, 32), spacing=(6.0, 6.0, 5.0)))
    z_inside = short.physical_to_index(small_case.geometry.index_to_physical(np.argwhere(targets)))[:, 0]
    expected = np.mean((z_inside < -0.5) | (z_inside > 3.5))
    assert 0 < expected < 1
    assert share_outside_grid(targets, small_case.geometry, short) == pytest.approx(expected)
    notes = outside_field(small_case, short)
    assert len(notes) == 1 and notes[0].startswith(f"{expected:.1%} of the target voxels lie outside")
    assert "192 x 144 x 20 mm" in notes[0]


def test_finer_slices_keep_the_field_along_z_and_the_rest_of_the_grid():
    fine = with_slice_spacing(DEFAULT_GRID, 2.5)
    assert fine.shape == (128, *DEFAULT_GRID.shape[1:]) and fine.spacing == (*DEFAULT_GRID.spacing[:2], 2.5)
    assert fine.snap_to_case == DEFAULT_GRID.snap_to_case
    assert with_slice_spacing(DEFAULT_GRID, 3.0).shape[0] == 107  # 320 mm / 3 mm, to the nearest slice
    for bad in (0.0, -2.5, float("nan")):
        with pytest.raises(DoseAIError, match="positive"):
            with_slice_spacing(DEFAULT_GRID, bad)


def test_turn_augmentation_moves_inputs_and_dose_together():
    from doseai.train.train_preference import TARGET, augment

    names = channel_names()
    features = torch.zeros(1, len(names), 16, 24, 24)
    brainstem = names.index("Brainstem")
    features[0, brainstem, 6:10, 4:10, 14:20] = 1.0  # off centre, so that a turn moves it
    features[0, TARGET, 4:12, 12:20, 4:12] = 56 / 70
    features[0, TARGET, 6:10, 14:18, 6:10] = 1.0
    dose = features[:, brainstem:brainstem + 1].clone() * 0.9

    def binary(volume):  # mirror and whole-voxel shifts keep the values 0 / 1; a linear turn does not
        return bool(torch.all((volume == 0) | (volume == 1)))

    rng = np.random.default_rng(0)
    turned = 0
    for _ in range(12):
        new_features, new_dose = augment(features, dose, rng, rotate_deg=20.0, scale=0.1)
        assert new_features.shape == features.shape and new_dose.shape == dose.shape
        # the dose is resampled exactly as the inputs: it stays 0.9 x the Brainstem channel
        torch.testing.assert_close(new_dose[0, 0].float(), 0.9 * new_features[0, brainstem].float(), atol=1e-5,
                                   rtol=0)
        # the prescription channel keeps its levels (nearest neighbour), one per target
        assert set(torch.unique(new_features[0, TARGET]).tolist()) <= set(torch.tensor([0.0, 56 / 70, 1.0]).tolist())
        turned += not binary(new_features[0, brainstem])
    assert 3 <= turned <= 9  # about half the steps turn
    assert all(binary(augment(features, dose, rng)[0][0, brainstem]) for _ in range(6))  # off by default
