"""Fluence optimization, objective terms and objectives derived from a dose, on tiny synthetic problems."""

import csv
import json

import numpy as np
import pytest
import torch

from doseai.engine.influence import BeamSet, DoseInfluence
from doseai.errors import OutputExistsError
from doseai.geometry import ImageGeometry
from doseai.optimize import (
    CSV_COLUMNS, DoseMimicking, FluenceObjective, FromDoseRules, MaxDVH, MeanDose, MinDVH, PlanObjective,
    SquaredDeviation, SquaredOverdose, SquaredUnderdose, mimicking_terms, neighbour_pairs, objective_from_dict,
    objectives_from_dose, objectives_from_json, objectives_to_csv, objectives_to_dicts, objectives_to_json,
    objectives_to_terms, optimize_fluence, uniform_initial_weights, voxel_indices,
)
from doseai.optimize.fluence_setup import _csr_parts_of, _transpose

SHAPE = (6, 8, 8)
LATTICE = 4  # bixels per side per beam


def _influence(seed=0, beams=2, density=0.35):
    """A random non-negative sparse influence matrix on a tiny grid, beams with LATTICE^2 bixels each."""
    rng = np.random.default_rng(seed)
    n_voxels, n_bixels = int(np.prod(SHAPE)), beams * LATTICE**2
    dense = rng.uniform(0.2, 1.0, (n_voxels, n_bixels)) * (rng.random((n_voxels, n_bixels)) < density)
    dense[:, :] += 0.05 * (rng.random((n_voxels, n_bixels)) < 0.5)  # every voxel sees some bixels
    matrix = torch.from_numpy(dense.astype(np.float32)).to_sparse_csr()
    beam = np.repeat(np.arange(beams), LATTICE**2)
    cells = np.stack(np.meshgrid(np.arange(LATTICE), np.arange(LATTICE), indexing="xy"), -1).reshape(-1, 2)
    position = np.tile(cells * 5.0 - 7.5, (beams, 1))  # half-bixel offsets, as engines place bixel centres
    return DoseInfluence(matrix, ImageGeometry(SHAPE, (3.0, 3.0, 3.0)),
                         BeamSet(tuple(float(a) for a in np.linspace(0, 360, beams, endpoint=False)), (0.0, 0.0, 0.0)),
                         beam, position, engine="synthetic"), dense


def _masks():
    target = np.zeros(SHAPE, bool)
    target[2:4, 3:6, 3:6] = True
    oar = np.zeros(SHAPE, bool)
    oar[2:5, 0:2, 0:3] = True
    body = np.ones(SHAPE, bool)
    return {"PTV_60": target, "SpinalCord": oar, "External": body}


@pytest.fixture(scope="module")
def problem():
    influence, dense = _influence()
    return influence, dense, _masks()


# --- objective terms ----------------------------------------------------------------------------------------
def _all_terms(n, rng):
    idx = torch.arange(n)
    reference = torch.from_numpy(rng.uniform(20, 40, n))
    return [
        SquaredUnderdose("t", idx, 2.0, dose_gy=32.0),
        SquaredOverdose("t", idx, 1.5, dose_gy=28.0),
        SquaredDeviation("t", idx, 1.0, dose_gy=30.0),
        MeanDose("t", idx, 1.0, dose_gy=25.0),
        MeanDose("t", idx, 1.0, dose_gy=35.0, two_sided=True),
        MaxDVH("t", idx, 1.0, dose_gy=27.0, volume_pct=30.0),
        MinDVH("t", idx, 1.0, dose_gy=33.0, volume_pct=80.0),
        DoseMimicking("t", idx, 1.0, reference_gy=reference),
        DoseMimicking("t", idx, 1.0, reference_gy=reference, one_sided=True),
    ]


def test_objective_gradients_match_finite_differences():
    rng = np.random.default_rng(1)
    n = 200
    dose = torch.from_numpy(rng.uniform(20, 40, n))  # float64, no ties
    for term in _all_terms(n, rng):
        value, grad = term.value_and_grad(dose)
        assert float(value) > 0, term.kind
        assert float(term.value(dose)) == pytest.approx(float(value), rel=1e-12)
        # autograd through the differentiable value agrees with the hand-written gradient
        x = dose.clone().requires_grad_()
        term.value(x).backward()
        assert torch.allclose(x.grad, grad, rtol=1e-9, atol=1e-12), term.kind
        # central finite differences (piecewise quadratic: exact away from kinks)
        eps = 1e-6
        for i in rng.choice(n, 12, replace=False):
            step = torch.zeros(n, dtype=torch.float64)
            step[i] = eps
            fd = (float(term.value(dose + step)) - float(term.value(dose - step))) / (2 * eps)
            assert fd == pytest.approx(float(grad[i]), rel=1e-4, abs=1e-9), (term.kind, i)


def test_dvh_objectives_penalise_the_right_voxels():
    dose = torch.arange(1.0, 101.0, dtype=torch.float64)  # 1..100 Gy
    idx = torch.arange(100)
    # V(50 Gy) <= 20 %: voxels between 50 Gy and the dose of the hottest 20 % (~80 Gy) count
    _, grad = MaxDVH("o", idx, dose_gy=50.0, volume_pct=20.0).value_and_grad(dose)
    penalised = torch.nonzero(grad).reshape(-1) + 1
    assert penalised.min() == 51 and 79 <= penalised.max() <= 80  # 50 Gy itself has zero deviation
    # V(60 Gy) >= 90 %: voxels between the coldest-10 % dose (~11 Gy) and 60 Gy count
    _, grad = MinDVH("t", idx, dose_gy=60.0, volume_pct=90.0).value_and_grad(dose)
    penalised = torch.nonzero(grad).reshape(-1) + 1
    assert 11 <= penalised.min() <= 12 and penalised.max() == 59
    # satisfied objectives are zero
    assert float(MaxDVH("o", idx, dose_gy=95.0, volume_pct=10.0).value(dose)) == 0.0
    assert float(MinDVH("t", idx, dose_gy=5.0, volume_pct=90.0).value(dose)) == 0.0


def test_terms_round_trip_through_json():
    rng = np.random.default_rng(2)
    n = 50
    dose = torch.from_numpy(rng.uniform(20, 40, n)).float()
    terms = _all_terms(n, rng)
    restored = [objective_from_dict(d) for d in json.loads(json.dumps(objectives_to_dicts(terms)))]
    for a, b in zip(terms, restored):
        assert type(a) is type(b) and a.structure == b.structure and a.priority == b.priority
        assert float(a.value(dose)) == pytest.approx(float(b.value(dose)), rel=1e-6)
    # without voxels, the structure's mask (or indices) must be given
    description = terms[0].to_dict(include_voxels=False)
    assert "voxels" not in description
    with pytest.raises(ValueError, match="no voxels"):
        objective_from_dict(description)
    mask = np.zeros(n, bool)
    mask[:10] = True
    assert objective_from_dict(description, {"t": mask}).n_voxels == 10
    with pytest.raises(ValueError, match="unknown objective kind"):
        objective_from_dict({"kind": "nope", "structure": "x", "voxels": [0]})


def test_terms_validate_their_input():
    with pytest.raises(ValueError, match="no voxels"):
        SquaredOverdose("empty", torch.zeros(0, dtype=torch.long), dose_gy=1.0)
    with pytest.raises(ValueError, match="priority"):
        SquaredOverdose("x", torch.arange(3), -1.0, dose_gy=1.0)
    with pytest.raises(ValueError, match="volume"):
        MaxDVH("x", torch.arange(3), dose_gy=1.0, volume_pct=150.0)
    with pytest.raises(ValueError, match="one reference dose per voxel"):
        DoseMimicking("x", torch.arange(3), reference_gy=torch.zeros(2))


# --- the objective function and its matrix handling ---------------------------------------------------------
def test_row_selection_and_transpose_agree_between_scipy_and_torch_paths(problem):
    influence, dense, _ = problem
    rows = torch.tensor([5, 1, 300, 17, 42])
    expected = dense.astype(np.float32)[rows.numpy()]
    for use_scipy in (True, False):  # scipy on CPU; the torch path is the one used on CUDA
        crow, col, values = _csr_parts_of(influence.matrix, rows, use_scipy=use_scipy)
        got = torch.sparse_csr_tensor(crow.long(), col.long(), values, size=expected.shape).to_dense().numpy()
        np.testing.assert_allclose(got, expected)
        transposed = _transpose(crow, col, values, expected.shape, use_scipy=use_scipy)
        np.testing.assert_allclose(transposed.to_dense().numpy(), expected.T)


def _terms_for(masks, rx=60.0):
    target, oar, body = (voxel_indices(masks[k]) for k in ("PTV_60", "SpinalCord", "External"))
    return [SquaredUnderdose("PTV_60", target, 100.0, dose_gy=rx), SquaredOverdose("PTV_60", target, 100.0, dose_gy=rx),
            SquaredOverdose("SpinalCord", oar, 10.0, dose_gy=0.4 * rx), MaxDVH("SpinalCord", oar, 5.0, dose_gy=0.3 * rx,
                                                                                volume_pct=20.0),
            SquaredOverdose("External", body, 1.0, dose_gy=0.8 * rx)]


def test_fluence_gradient_matches_autograd_and_screening_is_exact(problem):
    influence, dense, masks = problem
    terms = _terms_for(masks)
    screened = FluenceObjective(influence, terms, smoothness=0.5, weight_scale=2.0, brick=(2, 2, 2))
    plain = FluenceObjective(influence, terms, smoothness=0.5, weight_scale=2.0, screening=False)
    assert len(screened.blocks) > 10
    a64 = torch.from_numpy(dense)
    rng = np.random.default_rng(3)
    w = torch.from_numpy(rng.uniform(0.5, 3.0, influence.n_bixels).astype(np.float32))
    for step in range(25):  # a random walk: blocks get skipped and recomputed
        value, grad = screened.value_and_grad(w)
        value_plain, grad_plain = plain.value_and_grad(w)
        assert float(value) == pytest.approx(float(value_plain), rel=1e-5)
        torch.testing.assert_close(grad, grad_plain, rtol=1e-4, atol=1e-4 * float(grad_plain.abs().max()))
        if step == 0:  # against autograd in float64 on the dense matrix
            x = w.double().requires_grad_()
            dose = a64 @ x
            total = sum(t.priority * t.value(dose[t.voxels]) for t in terms)
            pairs = screened.pairs
            total = total + 0.5 * (((x[pairs[:, 0]] - x[pairs[:, 1]]) / 2.0) ** 2).mean()
            total.backward()
            assert float(value) == pytest.approx(float(total), rel=1e-5)
            torch.testing.assert_close(grad.double(), x.grad, rtol=1e-4, atol=1e-4 * float(x.grad.abs().max()))
        w = (w + torch.from_numpy(rng.normal(0, 0.02, w.numel()).astype(np.float32))).clamp(min=0)
    assert screened.work_fraction < 1.0


def test_objective_built_with_the_torch_path_matches_scipy(problem, monkeypatch):
    """On CUDA rows are gathered and transposed with torch ops; run that path on CPU."""
    from doseai.optimize import fluence_setup as fluence

    influence, _, masks = problem
    terms = _terms_for(masks)
    w = torch.linspace(0.5, 3.0, influence.n_bixels)
    with_scipy = FluenceObjective(influence, terms, brick=(2, 4, 4))
    monkeypatch.setattr(fluence, "_SCIPY_ON_CPU", False)
    with_torch = FluenceObjective(influence, terms, brick=(2, 4, 4))
    for _ in range(2):
        (v1, g1), (v2, g2) = with_scipy.value_and_grad(w), with_torch.value_and_grad(w)
        assert float(v1) == pytest.approx(float(v2), rel=1e-6)
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-5 * float(g1.abs().max()))
        w = w * 1.01
    torch.testing.assert_close(with_scipy.diagonal_scaling(), with_torch.diagonal_scaling())
    w0 = fluence.uniform_initial_weights(influence, terms)
    monkeypatch.setattr(fluence, "_SCIPY_ON_CPU", True)
    torch.testing.assert_close(w0, fluence.uniform_initial_weights(influence, terms))


def test_uniform_initial_weights_give_the_prescription_as_mean_target_dose(problem):
    influence, dense, masks = problem
    terms = _terms_for(masks)
    w0 = uniform_initial_weights(influence, terms)
    assert torch.all(w0 == w0[0])
    target_mean = float((dense @ w0.double().numpy())[masks["PTV_60"].ravel()].mean())
    assert target_mean == pytest.approx(60.0, rel=1e-5)


# --- optimization -------------------------------------------------------------------------------------------
def test_optimization_reaches_the_prescription_with_non_negative_weights(problem):
    influence, dense, masks = problem
    # well posed: scale the target rows so that some non-negative weights give exactly 60 Gy there
    rng = np.random.default_rng(6)
    w_true = rng.uniform(0.5, 2.0, influence.n_bixels) * (rng.random(influence.n_bixels) < 0.7)
    target_rows = masks["PTV_60"].ravel()
    scaled = dense.copy()
    scaled[target_rows] *= (60.0 / (dense[target_rows] @ w_true))[:, None]
    influence = DoseInfluence(torch.from_numpy(scaled.astype(np.float32)).to_sparse_csr(), influence.geometry,
                              influence.beams, influence.bixel_beam, influence.bixel_position_mm, "synthetic")
    target = voxel_indices(masks["PTV_60"])
    terms = [SquaredUnderdose("PTV_60", target, 100.0, dose_gy=60.0),
             SquaredOverdose("PTV_60", target, 100.0, dose_gy=60.0)]
    result = optimize_fluence(influence, terms, max_iterations=300, tolerance=1e-6, progress=False)
    assert np.all(result.weights >= 0)
    target_dose = result.dose[target_rows]
    assert result.dose.shape == (int(np.prod(SHAPE)),) and result.dose_image.shape == SHAPE
    assert np.abs(target_dose - 60.0).max() < 0.3
    assert result.objective < 1e-3 * result.objective_history[0]
    assert min(result.objective_history) == pytest.approx(result.objective, rel=1e-3,
                                                          abs=1e-9 * result.objective_history[0])
    assert len(result.history_seconds) == len(result.objective_history)
    assert result.stop_reason and 0 < result.iterations <= 300
    assert {t["structure"] for t in result.term_values} == {"PTV_60"}


def test_adam_solver_keeps_weights_non_negative_and_improves(problem):
    influence, _, masks = problem
    terms = _terms_for(masks)
    result = optimize_fluence(influence, terms, solver="adam", max_iterations=150, learning_rate=0.05, progress=False)
    assert np.all(result.weights >= 0)
    assert result.objective < 0.2 * result.objective_history[0]
    assert result.solver == "adam"


def test_dose_mimicking_recovers_an_achievable_dose(problem):
    influence, dense, masks = problem
    rng = np.random.default_rng(4)
    w_true = rng.uniform(0.5, 2.0, influence.n_bixels) * (rng.random(influence.n_bixels) < 0.8)
    reference = (dense @ w_true).astype(np.float32).reshape(SHAPE)
    terms = mimicking_terms(reference, masks, {"PTV_60": 60.0})
    result = optimize_fluence(influence, terms, max_iterations=400, tolerance=1e-7, progress=False)
    error = np.abs(result.dose - reference.ravel())
    assert error.max() < 0.01 * reference.max()
    assert np.all(result.weights >= 0)


def test_smoothness_lowers_neighbour_differences(problem):
    influence, _, masks = problem
    terms = _terms_for(masks)
    pairs = neighbour_pairs(influence.bixel_beam, influence.bixel_position_mm, influence.beams.bixel_width_mm)

    def roughness(w):
        return float(np.mean((w[pairs[:, 0]] - w[pairs[:, 1]]) ** 2) / np.mean(w) ** 2)

    rough = optimize_fluence(influence, terms, max_iterations=200, progress=False)
    smooth = optimize_fluence(influence, terms, smoothness=2e4, max_iterations=200, progress=False)
    assert roughness(smooth.weights) < 0.5 * roughness(rough.weights)
    assert smooth.smoothness_value > 0 and rough.smoothness_value == 0


def test_neighbour_pairs_stay_within_a_beam():
    # two beams with a 2x2 lattice (offset by half a bixel) and one with a gap
    position = np.array([[-2.5, -2.5], [2.5, -2.5], [-2.5, 2.5], [2.5, 2.5]] * 2 + [[0.0, 0.0], [10.0, 0.0]])
    beam = np.array([0] * 4 + [1] * 4 + [2] * 2)
    pairs = neighbour_pairs(beam, position, 5.0)
    assert len(pairs) == 8
    assert np.all(beam[pairs[:, 0]] == beam[pairs[:, 1]])
    assert {tuple(sorted(p)) for p in pairs[:4].tolist() + pairs[4:].tolist()} >= {(0, 1), (0, 2), (1, 3), (2, 3)}
    with pytest.raises(ValueError, match="share a lattice position"):
        neighbour_pairs(np.zeros(2, int), np.zeros((2, 2)), 5.0)


def test_bad_input_is_refused(problem):
    influence, _, masks = problem
    terms = _terms_for(masks)
    with pytest.raises(ValueError, match="unknown solver"):
        optimize_fluence(influence, terms, solver="newton", progress=False)
    with pytest.raises(ValueError, match="outside the working grid"):
        optimize_fluence(influence, [SquaredOverdose("x", torch.tensor([10**6]), dose_gy=1.0)], progress=False)
    with pytest.raises(ValueError, match="no objective states a dose"):
        optimize_fluence(influence, [SquaredOverdose("x", torch.tensor([1]), dose_gy=1.0)], progress=False)


# --- objectives from a dose ---------------------------------------------------------------------------------
def _predicted_case():
    rng = np.random.default_rng(5)
    masks = _masks()
    masks["Parotid_L"] = np.zeros(SHAPE, bool)
    masks["Parotid_L"][0:3, 5:8, 0:4] = True
    masks["Larynx"] = np.zeros(SHAPE, bool)  # empty: left out with a warning
    dose = rng.uniform(0, 5, SHAPE).astype(np.float32)
    dose[masks["PTV_60"]] = rng.normal(61, 1.0, int(masks["PTV_60"].sum()))
    dose[masks["SpinalCord"]] = np.linspace(5, 35, int(masks["SpinalCord"].sum()))
    dose[masks["Parotid_L"]] = np.linspace(2, 40, int(masks["Parotid_L"].sum()))
    return dose, masks


def test_objectives_from_dose_follow_the_rules():
    dose, masks = _predicted_case()
    rules = FromDoseRules()
    with pytest.warns(UserWarning, match="Larynx"):
        objectives = objectives_from_dose(dose, masks, {"PTV_60": 60.0}, rules)
    by = {}
    for o in objectives:
        by.setdefault(o.structure, []).append(o)
    assert "External" not in by and "Larynx" not in by
    ptv = {(o.type, o.volume_pct): o for o in by["PTV_60"]}
    assert ptv[("min DVH", 95.0)].dose_gy == 60.0 and ptv[("min DVH", 98.0)].dose_gy == 60.0
    assert ptv[("max DVH", 2.0)].dose_gy == pytest.approx(1.07 * 60.0)
    assert ptv[("min DVH", 95.0)].priority == rules.target_min_priority
    for name in ("SpinalCord", "Parotid_L"):
        values = dose[masks[name]].astype(np.float64)
        dvh_objectives = [o for o in by[name] if o.type == "max DVH"]
        assert len(dvh_objectives) >= 5
        for o in dvh_objectives:
            predicted = float(np.percentile(values, 100 - o.volume_pct))
            assert o.dose_gy == pytest.approx(predicted + max(1.0, 0.03 * predicted), abs=0.006)
            assert o.dose_gy > predicted
        mean = [o for o in by[name] if o.type == "max mean"]
        assert len(mean) == 1
        assert mean[0].dose_gy == pytest.approx(values.mean() + max(1.0, 0.03 * values.mean()), abs=0.006)
    # serial organ: a max objective; parallel organ: none
    assert any(o.type == "max" for o in by["SpinalCord"]) and not any(o.type == "max" for o in by["Parotid_L"])
    # levels whose predicted dose is below oar_min_dose_gy are left out
    strict = objectives_from_dose(dose, {k: masks[k] for k in ("PTV_60", "Parotid_L")}, {"PTV_60": 60.0},
                                  FromDoseRules(oar_min_dose_gy=30.0))
    assert all(o.dose_gy >= 30.0 for o in strict if o.structure == "Parotid_L")


def test_lower_target_hotspot_is_relaxed_next_to_a_higher_target():
    dose, masks = _predicted_case()
    masks = {"PTV_60": masks["PTV_60"], "PTV_50": np.roll(masks["PTV_60"], 2, axis=2)}
    masks["PTV_50"] &= ~masks["PTV_60"]
    masks["PTV_50"][2, 3, 3] = True  # one hot voxel inside the 60 Gy target
    objectives = objectives_from_dose(dose, masks, {"PTV_60": 60.0, "PTV_50": 50.0})
    hot = [o for o in objectives if o.structure == "PTV_50" and o.type == "max DVH"][0]
    assert hot.dose_gy >= 1.07 * 50.0


def test_objective_files_csv_json_and_refusing_to_overwrite(tmp_path):
    dose, masks = _predicted_case()
    with pytest.warns(UserWarning):
        objectives = objectives_from_dose(dose, masks, {"PTV_60": 60.0})
    csv_path = objectives_to_csv(objectives, tmp_path / "objectives.csv")
    with csv_path.open() as handle:
        rows = list(csv.reader(handle))
    assert tuple(rows[0]) == CSV_COLUMNS == ("structure", "type", "dose_gy", "volume_pct", "priority", "note")
    assert len(rows) == len(objectives) + 1
    assert all(r[1] in ("min DVH", "max DVH", "max mean", "max", "min") for r in rows[1:])
    mean_row = next(r for r in rows[1:] if r[1] == "max mean")
    assert mean_row[3] == "" and float(mean_row[2]) > 0
    json_path = objectives_to_json(objectives, tmp_path / "objectives.json", rules=FromDoseRules())
    assert objectives_from_json(json_path) == objectives
    assert "rules" in json.loads(json_path.read_text())
    for writer, path in ((objectives_to_csv, csv_path), (objectives_to_json, json_path)):
        with pytest.raises(OutputExistsError):
            writer(objectives, path)
        writer(objectives[:1], path, force=True)
    assert len(objectives_from_json(json_path)) == 1


def test_plan_objectives_become_torch_terms():
    dose, masks = _predicted_case()
    objectives = [PlanObjective("PTV_60", "min DVH", 60, 95, 100), PlanObjective("PTV_60", "max DVH", 64.2, 2, 50),
                  PlanObjective("SpinalCord", "max mean", 20, None, 10), PlanObjective("SpinalCord", "max", 40, 0, 20),
                  PlanObjective("PTV_60", "min", 55, 100, 30), PlanObjective("Larynx", "max mean", 10, None, 5)]
    with pytest.warns(UserWarning, match="Larynx"):
        terms = objectives_to_terms(objectives, masks)
    assert [type(t) for t in terms] == [MinDVH, MaxDVH, MeanDose, SquaredOverdose, SquaredUnderdose]
    assert terms[0].n_voxels == int(masks["PTV_60"].sum()) and terms[0].volume_pct == 95.0
    assert not terms[2].two_sided
    with pytest.raises(ValueError, match="type"):
        PlanObjective("x", "maximum", 1, None, 1)


def test_mimicking_terms_split_voxels_by_class():
    dose, masks = _predicted_case()
    terms = mimicking_terms(dose, masks, {"PTV_60": 60.0})
    by = {t.structure: t for t in terms}
    assert set(by) == {"PTV_60", "SpinalCord", "Parotid_L", "External"}
    assert not by["PTV_60"].one_sided and by["SpinalCord"].one_sided and not by["External"].one_sided
    target = set(by["PTV_60"].voxels.tolist())
    assert not target & set(by["SpinalCord"].voxels.tolist())
    assert not (target | set(by["SpinalCord"].voxels.tolist())) & set(by["External"].voxels.tolist())
    np.testing.assert_allclose(by["PTV_60"].reference_gy.numpy(), dose.ravel()[by["PTV_60"].voxels.numpy()])
