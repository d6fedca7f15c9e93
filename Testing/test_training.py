"""Train -> export -> predict on a tiny grid: the training entry points resume, the exported weights and
card load into DosePredictor, and predictions land on the case grid. (Model quality is measured by
Testing/benchmarks/bench_preference.py, not here.)"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (pip install -e '.[models]')")

from doseai.errors import DoseAIError  # noqa: E402
from doseai.models.features import GridSpec, case_features  # noqa: E402
from doseai.resample import resample_to  # noqa: E402
from doseai.train.dataset import ModelGridData  # noqa: E402

TINY = GridSpec(shape=(32, 32, 32), spacing=(6.0, 6.0, 3.0))


@pytest.fixture()
def tiny_data(small_case, monkeypatch, tmp_path):
    monkeypatch.setenv("DOSEAI_CACHE", str(tmp_path / "cache"))
    features, grid = case_features(small_case, TINY)
    dose = resample_to(small_case.dose, small_case.geometry, grid) / 70.0
    data = ModelGridData(["pt_1", "pt_2"], np.stack([features, features[..., ::-1]]).astype(np.float16),
                         np.stack([dose[None], dose[None, ..., ::-1]]).astype(np.float16), np.array([True, True]))

    def load_split(split, spec, norm_gy=70.0, need_dose=True, need_ct=False):
        assert (spec.shape, spec.spacing) == (TINY.shape, TINY.spacing)
        return data

    monkeypatch.setattr("doseai.train.train_prior.load_split", load_split)
    monkeypatch.setattr("doseai.train.train_preference.load_split", load_split)
    return tmp_path / "cache"


def _log_epochs(path):
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()]


def test_train_resume_export_predict(tiny_data, small_case, tmp_path, capsys):
    from doseai.predict import DosePredictor
    from doseai.train.export import export_model
    from doseai.train.train_preference import PreferenceTrainingConfig, train_preference
    from doseai.train.train_prior import PriorTrainingConfig, train_dose_prior

    prior = train_dose_prior(TINY, PriorTrainingConfig(run_name="tiny_prior", epochs=1, threads=1))
    assert _log_epochs(prior.parent / "log.jsonl") == [0]
    train_dose_prior(TINY, PriorTrainingConfig(run_name="tiny_prior", epochs=2, threads=1))  # continues from last.pt
    assert "resuming tiny_prior at epoch 1" in capsys.readouterr().out
    assert _log_epochs(prior.parent / "log.jsonl") == [0, 1]

    checkpoint = train_preference(TINY, prior, PreferenceTrainingConfig(
        run_name="tiny_preference", epochs=1, threads=1, neutral_fraction=0.6, metric_weight=1.0))
    state = torch.load(checkpoint, weights_only=True)
    prior_state = torch.load(prior, weights_only=True)
    frozen = {k[len("prior."):]: v for k, v in state["model"].items() if k.startswith("prior.")}
    for key, value in prior_state["model"].items():  # Stage II left the prior untouched
        assert torch.equal(frozen[key], value), key

    weights = export_model(checkpoint, prior, tmp_path / "models" / "tiny.pt")
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["grid"]["shape_zyx"] == list(TINY.shape) and card["preference"]["sliders"] == ["oar_sparing", "homogeneity"]
    assert [c["label"] for c in card["preference"]["conditions"]] == ["OAR sparing", "PTV homogeneity"]
    assert card["training"]["loss"].startswith("60% of the steps") and "1 x DVH-metric loss" in card["training"]["loss"]
    with pytest.raises(DoseAIError, match="exists"):
        export_model(checkpoint, prior, weights)
    # a prior taken out of shipped weights (config and weights only, no training record) still exports
    bare_prior = tmp_path / "bare_prior.pt"
    torch.save({"config": prior_state["config"], "model": prior_state["model"]}, bare_prior)
    bare = json.loads(export_model(checkpoint, bare_prior, tmp_path / "bare.pt").with_suffix(".json").read_text())
    assert bare["dose_prior"]["pretrained"] and "epochs" not in bare["dose_prior"]

    predictor = DosePredictor(weights, device="cpu", threads=1)
    with pytest.raises(DoseAIError, match="set_case"):
        predictor.predict()
    dose = predictor.predict_case(small_case)
    assert dose.shape == small_case.geometry.shape and dose.dtype == np.float32
    assert np.isfinite(dose).all() and dose.min() >= 0
    assert np.all(dose[~small_case.structures["External"]] == 0)
    again = predictor.predict(0.0, 0.0)
    assert np.array_equal(dose, again)  # same sliders, same dose (anatomy features cached)
    with pytest.raises(DoseAIError, match="within"):
        predictor.predict(oar_sparing=1.5)


def test_refine_film_starts_neutral_and_needs_sliders():
    from doseai.models.preference import PreferenceDoseNet

    torch.manual_seed(0)
    plain = PreferenceDoseNet(11).eval()
    with_film = PreferenceDoseNet(11, config={"refine_film": True}).eval()
    missing, unexpected = with_film.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(key.startswith("refine_film.") for key in missing)
    torch.nn.init.normal_(plain.refine[-1].weight, std=0.1)  # make the refinement head matter
    with_film.refine[-1].weight.data.copy_(plain.refine[-1].weight.data)
    x = torch.rand(1, 11, 32, 32, 32)
    sliders = torch.tensor([[0.5, -0.5]])
    with torch.no_grad():
        assert torch.allclose(plain(x, sliders), with_film(x, sliders), atol=1e-6)  # zero-initialised modulation
        latent = with_film.latent(with_film.encode_anatomy(x), sliders)
        with pytest.raises(ValueError, match="slider values"):
            with_film.decode(latent, x)
        torch.nn.init.normal_(with_film.refine_film[0].mlp[-1].weight, std=0.5)
        assert not torch.allclose(with_film.decode(latent, x, sliders), with_film.decode(latent, x, -sliders))


def test_cached_refinement_anatomy_term_gives_the_same_dose():
    """The predictors cache the refinement head's anatomy part once per case; the dose must not change."""
    from doseai.models.preference import PreferenceDoseNet

    torch.manual_seed(1)
    net = PreferenceDoseNet(11, config={"refine_film": True}).eval()
    torch.nn.init.normal_(net.refine[-1].weight, std=0.1)
    torch.nn.init.normal_(net.refine_film[0].mlp[-1].weight, std=0.5)
    x = torch.rand(1, 11, 32, 32, 32)
    sliders = torch.tensor([[0.5, -0.5]])
    with torch.no_grad():
        latent = net.latent(net.encode_anatomy(x), sliders)
        coarse = net.prior.decode(latent)
        whole = net._refinement(x, coarse, sliders)  # the correction before the final ReLU
        assert whole.abs().mean() > 1e-3
        assert torch.allclose(whole, net._refinement(x, coarse, sliders, net.refinement_anatomy_term(x)), atol=1e-5)
        assert not torch.allclose(whole, net._refinement(x, coarse, sliders, net.refinement_anatomy_term(x * 0.5)),
                                  atol=1e-5)
        assert torch.allclose(net.decode(latent, x, sliders), net.decode(latent, x, sliders,
                                                                         net.refinement_anatomy_term(x)), atol=1e-5)


@pytest.mark.parametrize("refine_film", [False, True])
def test_folded_inference_refinement_matches_the_layers(refine_film):
    """Prediction folds the slider modulation into the refinement convolutions and runs in place; it must
    give the layers' own correction, for every slider position, and training must keep the layers."""
    from doseai.models.preference import PreferenceDoseNet

    torch.manual_seed(2)
    net = PreferenceDoseNet(11, config={"refine_film": refine_film, "refine_channels": 8}).eval()
    for module in net.refine.modules():
        if isinstance(module, torch.nn.Conv3d):
            torch.nn.init.normal_(module.weight, std=0.2)
            torch.nn.init.normal_(module.bias, std=0.2)
    net.refine[1].weight.data.fill_(-0.3)  # PReLU slopes other than the default
    net.refine[3].weight.data.fill_(1.7)
    for modulation in net.refine_film or []:
        torch.nn.init.normal_(modulation.mlp[-1].weight, std=0.5)
        torch.nn.init.normal_(modulation.mlp[-1].bias, std=0.2)
    x, coarse = torch.rand(1, 11, 16, 16, 32), torch.rand(1, 1, 16, 16, 32)
    term = net.refinement_anatomy_term(x)
    for position in ([0.0, 0.0], [1.0, -0.4], [-0.7, 0.9]):
        sliders = torch.tensor([position])
        with torch.no_grad():
            layers = net._refinement(x, coarse, sliders)
            folded = net._refinement_inference(coarse, sliders, term)
        assert layers.abs().mean() > 1e-2
        torch.testing.assert_close(folded, layers, rtol=1e-4, atol=1e-5)
    sliders = torch.tensor([[0.5, 0.5]])
    latent = net.latent(net.encode_anatomy(x), sliders)
    net.decode(latent, x, sliders, net.refinement_anatomy_term(x)).sum().backward()  # grad on: the layers
    assert net.refine[2].weight.grad is not None and net.refine[2].weight.grad.abs().sum() > 0


def test_time_budget_cuts_the_epochs_and_ends_the_schedule(tiny_data, tmp_path):
    from dataclasses import replace

    from doseai.predict import DosePredictor
    from doseai.train.export import export_model
    from doseai.train.train_preference import PreferenceTrainingConfig, _epochs_within, train_preference

    assert _epochs_within(600, 100, 100, 0, 50) == 6  # the first epoch took 100 s: 5 more fit in the other 500 s
    assert _epochs_within(600, 100, 100, 0, 3) == 3  # never more than asked
    assert _epochs_within(50, 100, 100, 4, 50) == 5  # the first epoch alone overran the budget: stop after it
    # a slow first epoch (warm-up: 300 s), a second at the real pace (50 s): sized again from the second
    assert _epochs_within(600, 300, 300, 0, 50) == 2 and _epochs_within(600, 350, 50, 1, 50) == 7
    snapped = replace(TINY, snap_to_case=True)
    checkpoint = train_preference(snapped, None, PreferenceTrainingConfig(
        run_name="tiny_budget", epochs=4, threads=1, freeze_prior=False, time_budget_s=1e-3))
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 0
    assert _log_epochs(checkpoint.parent / "log.jsonl") == [0]
    # trained on the snapped grid: the card says so and prediction uses the same placement
    weights = export_model(checkpoint, None, tmp_path / "snapped.pt")
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["grid"]["snap_to_case_lattice"] and "voxel centre" in card["grid"]["placement"]
    assert DosePredictor(weights, device="cpu", threads=1).spec == snapped


def test_prior_from_shipped_weights_loads_into_the_prior_and_keeps_its_record(tmp_path):
    from doseai.models.dose_prior import build_dose_prior
    from doseai.predict import DEFAULT_MODEL as weights
    from doseai.train.export import prior_from_weights

    out = prior_from_weights(weights, tmp_path / "prior.pt")
    state = torch.load(out, weights_only=True)
    build_dose_prior(state["config"]).load_state_dict(state["model"])  # strict: every weight of the prior, no more
    card = json.loads(weights.with_suffix(".json").read_text())["dose_prior"]
    assert state["epoch"] + 1 == card["epochs"] and state["training_doses"] == card["training_doses"]
    with pytest.raises(DoseAIError, match="exists"):
        prior_from_weights(weights, out)


def test_average_of_shipped_weights_is_their_midpoint_with_the_first_card_less_its_calibration(tmp_path, small_case):
    import shutil

    from doseai.predict import DEFAULT_MODEL as shipped
    from doseai.predict import DosePredictor
    from doseai.cli import main
    from doseai.train.export import average_weights

    first, second = tmp_path / "seed1.pt", tmp_path / "seed2.pt"
    shutil.copy(shipped, first)
    shutil.copy(shipped.with_suffix(".json"), first.with_suffix(".json"))
    state = torch.load(shipped, weights_only=True)
    moved = next(key for key, value in state.items() if key.startswith("down.") and value.is_floating_point())
    torch.save({**state, moved: state[moved] + 1.0}, second)

    out = tmp_path / "soup.pt"
    assert main(["train", "average", "--weights", str(first), str(second), "--out", str(out)]) == 0
    soup = torch.load(out, weights_only=True)
    assert soup.keys() == state.keys() and soup[moved].dtype == state[moved].dtype
    assert torch.allclose(soup[moved].float(), state[moved].float() + 0.5, atol=2e-3)
    untouched = next(key for key in state if key != moved and state[key].is_floating_point())
    assert torch.equal(soup[untouched], state[untouched])
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["name"] == "soup" and card["network"]["averaged_from"] == ["seed1.pt", "seed2.pt"]
    assert "calibration" not in card and card["validation"] == {}
    assert DosePredictor(out, device="cpu", threads=1).calibration is None  # until calibrate-preference fits one
    with pytest.raises(DoseAIError, match="exists"):
        average_weights([first, second], out)
    torch.save({k: v for k, v in state.items() if k != moved}, second)
    with pytest.raises(DoseAIError, match="not the same network"):
        average_weights([first, second], tmp_path / "other.pt")


def test_with_ct_less_trains_on_patients_without_ct_and_says_so_in_the_card(tiny_data, tmp_path, monkeypatch):
    from doseai.train import train_preference as module
    from doseai.train.export import export_model
    from doseai.train.train_preference import PreferenceTrainingConfig
    from doseai.train.train_prior import PriorTrainingConfig, train_dose_prior

    asked = {}
    load = module.load_split

    def recording_load_split(split, spec, norm_gy=70.0, need_dose=True, need_ct=False):
        asked[split] = need_ct
        return load(split, spec, norm_gy, need_dose, need_ct)

    monkeypatch.setattr(module, "load_split", recording_load_split)
    prior = train_dose_prior(TINY, PriorTrainingConfig(run_name="tiny_prior", epochs=1, threads=1))
    checkpoint = module.train_preference(TINY, prior, PreferenceTrainingConfig(
        run_name="tiny_ct_less", epochs=1, threads=1, with_ct_less=True, rotate_deg=10.0, scale=0.05))
    assert asked == {"train": False, "validation": True}  # the monitor stays on patients with a CT
    card = json.loads(export_model(checkpoint, prior, tmp_path / "m.pt").with_suffix(".json").read_text())
    assert "water-equivalent body" in card["training"]["data"]
    assert "turn about z of up to 10 deg and a zoom of up to 5%" in card["training"]["augmentation"]
    checkpoint = module.train_preference(TINY, prior, PreferenceTrainingConfig(run_name="tiny_with_ct", epochs=1,
                                                                               threads=1))
    assert asked == {"train": True, "validation": True}
    card = json.loads(export_model(checkpoint, prior, tmp_path / "n.pt").with_suffix(".json").read_text())
    assert "augmentation" not in card["training"]  # no turn: the card reads as up to v2.5
    with pytest.raises(DoseAIError, match="turn must be within"):
        module.train_preference(TINY, prior, PreferenceTrainingConfig(run_name="tiny_bad_turn", epochs=1, threads=1,
                                                                      rotate_deg=-5.0))


def test_cli_trains_on_finer_slices_when_asked(monkeypatch, tmp_path, capsys):
    from doseai.cli import main
    from doseai.models.features import DEFAULT_GRID

    grids = []

    def recording_train(spec, *args, **kwargs):
        grids.append(spec)
        return tmp_path / "last.pt"

    monkeypatch.setattr("doseai.train.train_preference.train_preference", recording_train)
    common = ["train", "preference", "--run", "r", "--prior", str(tmp_path / "prior.pt"), "--snap-to-case"]
    assert main(common) == 0 and main([*common, "--slice-mm", "2.5"]) == 0
    assert grids[0].shape == DEFAULT_GRID.shape and grids[0].snap_to_case
    assert grids[1].shape == (128, *DEFAULT_GRID.shape[1:]) and grids[1].spacing[2] == 2.5 and grids[1].snap_to_case
    capsys.readouterr()
    assert main([*common, "--slice-mm", "0"]) == 2 and len(grids) == 2  # refused before any training
    assert capsys.readouterr().err.strip() == ("doseai train: error: slice spacing must be a positive number of mm, "
                                               "got 0.0")


@pytest.mark.parametrize("lower, upper", [((4, 5, 9), (11, 12, 20)), ((0, 0, 0), (15, 15, 31)), ((0, 3, 25), (6, 15, 31))])
def test_refinement_on_the_case_box_is_the_whole_grid_s_there(lower, upper):
    """Prediction runs the refinement head only on the box of model-grid voxels the dose is read at (the head
    has no normalisation): inside the box the dose equals the whole grid's, at the grid's edges too; outside it
    the correction is 0. The mirrored case's box is the box flipped."""
    from doseai.models.preference import PreferenceDoseNet, RefinementBox

    torch.manual_seed(3)
    net = PreferenceDoseNet(11, config={"refine_film": True, "refine_channels": 8}).eval()
    for module in net.refine.modules():
        if isinstance(module, torch.nn.Conv3d):
            torch.nn.init.normal_(module.weight, std=0.2)
    torch.nn.init.normal_(net.refine_film[1].mlp[-1].weight, std=0.5)
    x, sliders = torch.rand(1, 11, 16, 16, 32), torch.tensor([[0.4, -0.8]])
    box = RefinementBox.around(lower, upper, (16, 16, 32))
    with torch.no_grad():
        latent = net.latent(net.encode_anatomy(x), sliders)
        whole = net.decode(latent, x, sliders, net.refinement_anatomy_term(x))
        boxed = net.decode(latent, x, sliders, net.refinement_anatomy_term(x, box), box)
        coarse = torch.relu(net.prior.decode(latent))
    assert (whole - coarse)[(..., *box.inner)].abs().mean() > 1e-2  # the head does change the dose there
    torch.testing.assert_close(boxed[(..., *box.inner)], whole[(..., *box.inner)], rtol=1e-5, atol=1e-6)
    outside = torch.ones_like(whole, dtype=torch.bool)
    outside[(..., *box.inner)] = False
    torch.testing.assert_close(boxed[outside], coarse[outside])
    flipped = box.mirrored(32)
    assert flipped.mirrored(32) == box
    assert [flipped.inner[2].start, flipped.inner[2].stop] == [32 - box.inner[2].stop, 32 - box.inner[2].start]


def test_predictor_dose_with_the_case_box_is_the_whole_grid_s(small_case):
    """The shipped model's dose on the case grid (neutral and moved sliders, with the mirror correction) is the
    same whether its refinement runs on the case's box or on the whole model grid."""
    from doseai.models.preference import RefinementBox
    from doseai.predict import DosePredictor

    predictor = DosePredictor(threads=2)
    predictor.set_case(small_case)
    boxed = [predictor.predict(), predictor.predict(0.6, -0.4)]
    prepared = predictor._prepared
    assert np.prod([s.stop - s.start for s in prepared.refinement_box.inner]) < np.prod(prepared.grid.shape)
    whole_box = RefinementBox.around((0, 0, 0), prepared.grid.shape, prepared.grid.shape)
    predictor.set_case(small_case)
    prepared = predictor._prepared
    prepared.refinement_box = whole_box
    with torch.no_grad():
        prepared.refinement_anatomy = predictor.net.refinement_anatomy_term(prepared.anatomy, whole_box)
    whole = [predictor.predict(), predictor.predict(0.6, -0.4)]
    for a, b in zip(boxed, whole):
        assert b.max() > 30
        np.testing.assert_allclose(a, b, atol=1e-3)
