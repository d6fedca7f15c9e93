"""From a desired dose to a plan (doseai.optimize.plan) on the synthetic sample case, with few beams and
coarse bixels so that the dose engine runs in seconds."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch not installed (pip install -e '.[models]')")
pytest.importorskip("pyRadPlan", reason="pyRadPlan not installed (see README: pip install --no-deps pyradplan)")

from doseai.engine import default_beams, dose_to_case_grid  # noqa: E402
from doseai.errors import GeometryMismatchError, InvalidDoseError  # noqa: E402
from doseai.optimize.plan import PlanSettings, make_engine, plan_from_dose  # noqa: E402

SETTINGS = dict(n_beams=3, bixel_width_mm=10.0, lateral_cutoff_mm=30.0)


@pytest.fixture(scope="module")
def planned():
    from doseai.sample import make_sample_case

    case = make_sample_case(seed=2)
    settings = PlanSettings(**SETTINGS)
    beams = default_beams(case, n_beams=3, bixel_width_mm=10.0)
    influence = make_engine(settings).compute(case, beams, progress=False)
    return case, beams, influence


def test_mimicking_an_achievable_dose_gets_it_back(planned):
    case, beams, influence = planned
    rng = np.random.default_rng(0)
    truth = rng.uniform(0.5, 1.5, influence.n_bixels).astype(np.float32)
    body = case.structures["External"]
    desired = dose_to_case_grid(influence.dose_image(truth), influence.geometry, case.geometry) * body
    desired *= 70.0 / desired[case.structures["PTV_70"]].mean()
    plan = plan_from_dose(case, desired, PlanSettings(**SETTINGS), beams=beams, influence=influence, progress=False)
    assert plan.dose.shape == case.geometry.shape and plan.dose.dtype == np.float32
    assert np.all(plan.dose[~body] == 0)
    error = np.abs(plan.dose - desired)[body].mean()
    assert error < 0.02 * desired.max(), error  # resampling to the working grid and back costs a little
    assert plan.fluence.weights.min() >= 0 and len(plan.fluence_maps) == 3
    assert plan.objectives == [] and plan.engine_card["energy_mv"] == 6.0


def test_objectives_mode_derives_tps_objectives_and_improves_them(planned):
    case, beams, influence = planned
    settings = PlanSettings(mode="objectives", max_iterations=60, **SETTINGS)
    plan = plan_from_dose(case, case.dose, settings, beams=beams, influence=influence, progress=False)
    kinds = {(o.structure, o.type) for o in plan.objectives}
    assert ("PTV_70", "min DVH") in kinds and ("Parotid_L", "max mean") in kinds
    history = plan.fluence.objective_history
    assert history[-1] < 0.5 * history[0]  # from the uniform start toward the objectives
    ptv = case.structures["PTV_70"]
    assert abs(np.median(plan.dose[ptv]) - 70.0) < 7.0


def test_bad_desired_doses_are_refused(planned):
    case, beams, influence = planned
    with pytest.raises(GeometryMismatchError):
        plan_from_dose(case, np.zeros((2, 2, 2)), PlanSettings(**SETTINGS), beams=beams, influence=influence)
    nan = case.dose.copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(InvalidDoseError):
        plan_from_dose(case, nan, PlanSettings(**SETTINGS), beams=beams, influence=influence)
    with pytest.raises(ValueError, match="mode"):
        PlanSettings(mode="guess")
