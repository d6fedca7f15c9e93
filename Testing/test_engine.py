"""Dose engines: beams, working grid, pyRadPlan's influence matrix (voxel order, beam direction) and the
PyDoseRT comparison engine, on a small water box (40 x 40 x 24 voxels of 5 mm)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (pip install -e '.[models]')")

from doseai.case import PlanningCase  # noqa: E402
from doseai.engine import (  # noqa: E402
    BeamSet,
    PyDoseRTEngine,
    PyRadPlanEngine,
    bixel_layout,
    default_beams,
    dose_to_case_grid,
    get_engine,
    to_working_grid,
    working_geometry,
)
from doseai.errors import MissingStructureError  # noqa: E402
from doseai.geometry import ImageGeometry  # noqa: E402

SPACING = 5.0
SHAPE = (24, 40, 40)  # z, y, x
BODY_HALF = 15  # voxels: the water box spans x, y indices 5..34 (LPS -72.5..72.5 mm)


def water_box(ct: bool = True) -> PlanningCase:
    nz, ny, nx = SHAPE
    geometry = ImageGeometry(SHAPE, (SPACING,) * 3, (-(nx - 1) / 2 * SPACING, -(ny - 1) / 2 * SPACING,
                                                     -(nz - 1) / 2 * SPACING))
    z, y, x = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    body = (np.abs(x - 19.5) <= BODY_HALF) & (np.abs(y - 19.5) <= BODY_HALF)
    ptv = (np.abs(x - 19.5) <= 3) & (np.abs(y - 19.5) <= 3) & (np.abs(z - 11.5) <= 3)  # 35 mm cube at the centre
    cord = (np.abs(x - 19.5) <= 1.5) & (y >= 27) & (y <= 30) & (np.abs(z - 11.5) <= 8)
    return PlanningCase(geometry, ct=np.where(body, 0.0, -1000.0).astype(np.float32) if ct else None,
                        structures={"PTV_60": ptv, "SpinalCord": cord, "External": body},
                        prescriptions={"PTV_60": 60.0})


# --- beams ---------------------------------------------------------------------------------------
def test_default_beams_are_equispaced_with_isocenter_at_target_centroid():
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # rotated grid: the centroid must go through it
    geometry = ImageGeometry((10, 12, 14), (2.0, 3.0, 4.0), (10.0, -20.0, 30.0), direction)
    ptv = np.zeros(geometry.shape, bool)
    ptv[2:5, 3:9, 4:6] = True
    ptv_low = np.zeros(geometry.shape, bool)
    ptv_low[6:8, 1:3, 10:13] = True
    case = PlanningCase(geometry, structures={"PTV_70": ptv, "PTV_56": ptv_low},
                        prescriptions={"PTV_70": 70.0, "PTV_56": 56.0})
    beams = default_beams(case)
    assert beams.gantry_angles_deg == (0.0, 40.0, 80.0, 120.0, 160.0, 200.0, 240.0, 280.0, 320.0)
    assert beams.couches == (0.0,) * 9 and beams.bixel_width_mm == 5.0 and beams.energy_mv == 6.0
    points = geometry.index_to_physical(np.argwhere(ptv | ptv_low))
    np.testing.assert_allclose(beams.isocenter_lps_mm, points.mean(axis=0), atol=1e-9)
    assert default_beams(case, n_beams=4).gantry_angles_deg == (0.0, 90.0, 180.0, 270.0)


def test_default_beams_need_a_target():
    case = water_box()
    no_rx = PlanningCase(case.geometry, ct=case.ct, structures=case.structures)
    with pytest.raises(MissingStructureError):
        default_beams(no_rx)
    empty = PlanningCase(case.geometry, ct=case.ct, structures={"PTV_60": np.zeros(SHAPE, bool)},
                         prescriptions={"PTV_60": 60.0})
    with pytest.raises(MissingStructureError):
        default_beams(empty)


def test_beam_set_validation():
    with pytest.raises(ValueError):
        BeamSet(gantry_angles_deg=(), isocenter_lps_mm=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError):
        BeamSet(gantry_angles_deg=(0.0, 90.0), isocenter_lps_mm=(0.0, 0.0, 0.0), couch_angles_deg=(0.0,))
    with pytest.raises(ValueError):
        default_beams(water_box(), n_beams=0)
    with pytest.raises(ValueError):
        default_beams(water_box(), bixel_width_mm=0.0)


def test_bixel_layout_covers_the_projected_target():
    case = water_box()
    beams = BeamSet(gantry_angles_deg=(0.0, 90.0), isocenter_lps_mm=(0.0, 0.0, 0.0), bixel_width_mm=10.0)
    beam_of, positions = bixel_layout(case, beams)
    assert set(np.unique(beam_of)) == {0, 1}
    np.testing.assert_allclose(positions % 10.0, 0.0)  # on the bixel grid around the axis
    for b in (0, 1):  # PTV +-17.5 mm, grown by one bixel (10 mm), a little divergence: -20..20 mm
        own = positions[beam_of == b]
        assert own[:, 0].min() == -20 and own[:, 0].max() == 20 and own[:, 1].min() == -20 and own[:, 1].max() == 20


def test_get_engine():
    assert isinstance(get_engine(), PyRadPlanEngine)
    assert isinstance(get_engine("PyDoseRT"), PyDoseRTEngine)
    with pytest.raises(ValueError):
        get_engine("montecarlo")


# --- working grid --------------------------------------------------------------------------------
def test_working_grid_is_axis_aligned_and_covers_the_case():
    direction = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    case_geometry = ImageGeometry((30, 50, 40), (2.0, 2.5, 3.0), (5.0, -7.0, 11.0), direction)
    work = working_geometry(case_geometry, 5.0)
    assert work.direction == ImageGeometry((1, 1, 1), (1, 1, 1)).direction and work.spacing == (5.0, 5.0, 5.0)
    corners = np.array([[k, j, i] for k in (-0.5, 29.5) for j in (-0.5, 49.5) for i in (-0.5, 39.5)])
    old = case_geometry.index_to_physical(corners)
    new = work.index_to_physical(np.array([[-0.5] * 3, [n - 0.5 for n in work.shape]]))
    np.testing.assert_allclose(new.mean(axis=0), old.mean(axis=0), atol=1e-9)  # same centre
    assert np.all(new.min(axis=0) <= old.min(axis=0) + 1e-9) and np.all(new.max(axis=0) >= old.max(axis=0) - 1e-9)
    assert np.all(new.max(axis=0) - new.min(axis=0) < old.max(axis=0) - old.min(axis=0) + 5.0)


def test_working_grid_is_cropped_to_the_body_plus_margin():
    geometry = ImageGeometry((40, 60, 60), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    body = np.zeros(geometry.shape, bool)
    body[10:30, 20:40, 15:45] = True  # x 30-88, y 40-78, z 20-58 mm (voxel edges 29-89, 39-79, 19-59)
    case = PlanningCase(geometry, structures={"External": body, "PTV_60": body}, prescriptions={"PTV_60": 60.0})
    work = to_working_grid(case, 5.0)
    low = work.geometry.index_to_physical(np.array([[-0.5] * 3]))[0]
    high = work.geometry.index_to_physical(np.array([[n - 0.5 for n in work.geometry.shape]]))[0]
    assert np.all(low <= np.array([29.0, 39.0, 19.0]) - 10.0 + 1e-6)  # the body and a 10 mm margin
    assert np.all(high >= np.array([89.0, 79.0, 59.0]) + 10.0 - 1e-6)
    assert np.all(high - low < np.array([60.0, 40.0, 40.0]) + 20.0 + 5.0)  # not the whole 120 mm grid
    assert work.structures["External"].sum() * 125.0 == pytest.approx(body.sum() * 8.0, rel=0.15)
    uncropped = to_working_grid(case, 5.0, crop_to_body=False)
    assert uncropped.geometry.shape == (16, 24, 24)


def test_working_grid_round_trip():
    geometry = ImageGeometry((20, 36, 32), (2.5, 2.5, 2.5), (-40.0, -45.0, -25.0))
    z, y, x = np.meshgrid(*(np.arange(n) for n in geometry.shape), indexing="ij")
    ct = (2.0 * x - 3.0 * y + 5.0 * z).astype(np.float32)  # linear: survives linear resampling both ways
    ptv = (np.abs(x - 16) <= 6) & (np.abs(y - 18) <= 6) & (np.abs(z - 10) <= 4)
    case = PlanningCase(geometry, ct=ct, structures={"PTV_60": ptv}, prescriptions={"PTV_60": 60.0})
    work = to_working_grid(case, 5.0)
    assert work.geometry.spacing == (5.0, 5.0, 5.0) and work.prescriptions == case.prescriptions
    assert work.ct.shape == work.geometry.shape == (10, 18, 16)
    volume = ptv.sum() * geometry.voxel_volume_mm3
    assert abs(work.structures["PTV_60"].sum() * work.geometry.voxel_volume_mm3 - volume) < 0.25 * volume
    back = dose_to_case_grid(np.clip(work.ct, 0, None), work.geometry, geometry)
    inner = (slice(3, -3),) * 3  # away from the edge, where the coarse grid has no neighbour to interpolate to
    np.testing.assert_allclose(back[inner], np.clip(ct, 0, None)[inner], atol=0.02 * ct.max())
    assert back.dtype == np.float32 and back.min() >= 0


def test_working_grid_fills_a_missing_ct_with_water_in_the_body():
    case = water_box(ct=False)
    work = to_working_grid(case, 5.0)
    assert set(np.unique(work.ct)) == {0.0, -1000.0}
    body = work.structures["External"]
    assert np.all(work.ct[body] == 0.0) and np.all(work.ct[~body] == -1000.0)
    no_body = PlanningCase(case.geometry, structures={"PTV_60": case.structures["PTV_60"]},
                           prescriptions={"PTV_60": 60.0})
    assert np.all(to_working_grid(no_body).ct == 0.0)


# --- pyRadPlan -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pyradplan_run():
    pytest.importorskip("pyRadPlan", reason="pyRadPlan not installed")
    torch.set_num_threads(1)
    case = water_box()
    beams = BeamSet(gantry_angles_deg=(0.0, 90.0), isocenter_lps_mm=default_beams(case).isocenter_lps_mm,
                    bixel_width_mm=10.0)
    engine = PyRadPlanEngine(lateral_cutoff_mm=30.0, crop_to_body=False)
    return case, beams, engine, engine.compute(case, beams, progress=False)


def beam_weights(influence, beam):
    return (influence.bixel_beam == beam).astype(np.float32)


def test_pyradplan_influence_matrix_layout(pyradplan_run):
    case, beams, engine, influence = pyradplan_run
    assert influence.geometry.matches(case.geometry)  # a 5 mm axis-aligned case, not cropped: its own grid
    assert influence.matrix.layout == torch.sparse_csr and influence.matrix.dtype == torch.float32
    assert influence.matrix.shape == (int(np.prod(SHAPE)), influence.n_bixels)
    assert np.bincount(influence.bixel_beam).tolist() == [25, 25]  # 5 x 5 bixels of 10 mm each
    expected_beam, expected_positions = bixel_layout(case, beams)  # pyRadPlan's stf picks the same bixels
    np.testing.assert_array_equal(influence.bixel_beam, expected_beam)
    np.testing.assert_allclose(influence.bixel_position_mm, expected_positions)
    assert [m.shape for m in influence.fluence_maps(np.ones(influence.n_bixels))] == [(5, 5), (5, 5)]
    assert {"stf_s", "dij_s", "convert_s"} <= set(influence.timings_s)
    assert influence.beams.energy_mv == 6.0 and engine.card()["energy_mv"] == 6.0


@pytest.mark.filterwarnings("ignore:Requested GPU device", "ignore:divide by zero", "ignore:invalid value")
def test_pyradplan_voxel_order_matches_its_forward_dose(pyradplan_run):
    case, beams, engine, influence = pyradplan_run
    rng = np.random.default_rng(0)
    weights = rng.uniform(0.5, 1.5, influence.n_bixels)
    work = engine.working_case(case)
    ct, cst, pln = engine.pyradplan_inputs(work, beams)
    stf = engine.generate_stf(ct, cst, pln)
    import SimpleITK as sitk

    forward = engine.dose_engine(pln).calc_dose_forward(ct, cst, stf, weights)["physical_dose"]
    reference = sitk.GetArrayFromImage(forward)  # SimpleITK array: (z, y, x), our order
    ours = influence.dose_image(weights.astype(np.float32))
    assert reference.shape == ours.shape == SHAPE
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5 * reference.max())


def test_pyradplan_beam_directions_and_depth_dose(pyradplan_run):
    case, beams, engine, influence = pyradplan_run
    body = case.structures["External"]
    k, j, i = 11, 19, 19  # the voxel nearest the isocentre (the PTV centre)
    # gantry 0: source anterior, beam runs to +y (posterior)
    dose = influence.dose_image(beam_weights(influence, 0))
    assert dose.min() >= 0 and np.all(dose[~body] == 0)
    depth = dose[k, 5:35, i]  # entry at y index 5 -> exit at 34
    peak = int(np.argmax(depth))
    assert 1 <= peak <= 4  # build-up: maximum 7.5-22.5 mm deep for 6 MV, not at the surface
    assert np.all(np.diff(depth[peak:]) < 0)  # then falls monotonically to the exit
    assert depth[-1] < 0.6 * depth[peak]
    lateral = np.abs((np.arange(SHAPE[2]) - 19.5) * SPACING)
    assert np.all(dose[:, :, lateral > 70] == 0)  # field +-25 mm, lateral cut-off 30 mm (+ divergence)
    # gantry 90: source at the patient's left (+x), beam runs to -x
    dose = influence.dose_image(beam_weights(influence, 1))
    depth = dose[k, j, 34:4:-1]  # from x index 34 (left surface) towards the right
    peak = int(np.argmax(depth))
    assert 1 <= peak <= 4 and np.all(np.diff(depth[peak:]) < 0)


def test_pyradplan_dose_is_differentiable(pyradplan_run):
    influence = pyradplan_run[3]
    weights = torch.ones(influence.n_bixels, requires_grad=True)
    influence.dose(weights).sum().backward()
    assert weights.grad.shape == (influence.n_bixels,) and bool((weights.grad > 0).all())


# --- PyDoseRT ------------------------------------------------------------------------------------
def test_pydosert_influence_equals_its_forward_pass():
    pytest.importorskip("pydosert", reason="pydosert not installed")
    torch.set_num_threads(1)
    case = water_box()
    beams = BeamSet(gantry_angles_deg=(40.0,), isocenter_lps_mm=(0.0, 0.0, 0.0), bixel_width_mm=10.0)
    engine = PyDoseRTEngine(head_model=False, crop_to_body=False)
    influence = engine.compute(case, beams, progress=False, relative_threshold=0.0)
    assert influence.engine == "pydosert-pencil" and influence.n_bixels == len(bixel_layout(case, beams)[0])
    assert influence.beams.energy_mv == 10.0  # PyDoseRT has 10 MV presets only
    weights = torch.rand(influence.n_bixels, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        direct = engine.forward(weights).numpy()
    np.testing.assert_allclose(influence.dose_image(weights), direct, atol=1e-4 * direct.max())
    assert direct.min() >= 0 and np.all(direct[~case.structures["External"]] == 0)
    card = engine.card()
    assert card["energy_mv"] == 10.0 and "10 MV" in card["machine"]
    with pytest.raises(ValueError):
        engine.prepare(case, BeamSet((0.0,), (0.0, 0.0, 0.0), couch_angles_deg=(90.0,)))


def test_pydosert_and_pyradplan_agree_on_geometry(pyradplan_run):
    """Each beam's dose lands in the same place in both engines (centroid within 3 mm), including a
    single off-axis bixel: same axes, gantry sense and BEV orientation."""
    pytest.importorskip("pydosert", reason="pydosert not installed")
    case, beams, _, influence = pyradplan_run
    model = PyDoseRTEngine(head_model=False, crop_to_body=False).prepare(case, beams, influence.bixel_beam, influence.bixel_position_mm)
    grids = np.meshgrid(*(np.arange(n) * SPACING for n in SHAPE), indexing="ij")

    def centroid(dose):
        return np.array([(dose * g).sum() / dose.sum() for g in grids])

    corner = [int(np.flatnonzero((influence.bixel_beam == 1) & (influence.bixel_position_mm[:, 0] == 20)
                                 & (influence.bixel_position_mm[:, 1] == -20))[0])]
    for beam, weights in ((0, beam_weights(influence, 0)), (1, beam_weights(influence, 1)),
                          (1, np.isin(np.arange(influence.n_bixels), corner).astype(np.float32))):
        ours = influence.dose_image(weights)
        with torch.no_grad():
            theirs = model.beam_dose(beam, torch.from_numpy(weights)).numpy()
        assert np.linalg.norm(centroid(ours) - centroid(theirs)) < 3.0
    # the corner bixel of the gantry-90 beam (BEV x +20, y -20) sits posterior (+y) and inferior (-z)
    offset = centroid(ours) - np.array([11.5, 19.5, 19.5]) * SPACING
    assert offset[1] > 10 and offset[0] < -10


def test_pyradplan_runs_with_short_array_text_and_gives_numpy_its_own_back():
    import inspect

    from doseai.engine.pyradplan_engine import _quiet

    full = repr(np.arange(3.0))
    with _quiet():
        inside = repr(np.zeros((2, 3)))
    if "override_repr" in inspect.signature(np.set_printoptions).parameters:
        assert inside == "<array (2, 3)>"
    else:  # numpy 2.0: the full text, as before
        assert inside.startswith("array(")
    assert repr(np.arange(3.0)) == full == "array([0., 1., 2.])"
