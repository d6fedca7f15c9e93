"""The dose grid of its own (doseai.dose_grid): CT-aligned binning over the body, exact partial volumes, and DVHs
on it that agree with the CT-grid DVH of a smooth dose."""

from __future__ import annotations

import numpy as np
import pytest

from doseai.case import PlanningCase
from doseai.dose_grid import binning_factors, on_dose_grid
from doseai.errors import DoseAIError
from doseai.geometry import ImageGeometry
from doseai.report import case_metrics


def _rotation_z(degrees: float) -> tuple[float, ...]:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


def _phantom(spacing=(1.0, 1.0, 1.0), shape=(60, 90, 90), direction=None, origin=(-40.0, -30.0, 10.0)):
    """A fine-grid case: a body cylinder, a 30 mm target sphere, a 5 mm-radius cord-like cylinder, and a smooth
    dose (a Gaussian about the target) as a function of the physical position."""
    geometry = ImageGeometry(shape, spacing, origin, direction or _rotation_z(0))
    k, j, i = np.indices(shape)
    mm = geometry.index_to_physical(np.stack([k.ravel(), j.ravel(), i.ravel()], axis=1))
    centre = geometry.index_to_physical(np.array([[s / 2 for s in shape]]))[0]
    rel = (mm - centre).reshape(*shape, 3)
    body = rel[..., 0] ** 2 + rel[..., 1] ** 2 < 40.0**2
    target = (rel**2).sum(-1) < 15.0**2
    cord = (rel[..., 0] - 22.0) ** 2 + rel[..., 1] ** 2 < 5.0**2

    def dose_at(points):
        r2 = ((points - centre) ** 2).sum(-1)
        return 70.0 * np.exp(-r2 / (2 * 22.0**2))

    case = PlanningCase(geometry, ct=np.where(body, 40.0, -1000.0),
                        structures={"External": body, "PTV_70": target, "SpinalCord": cord & body},
                        prescriptions={"PTV_70": 70.0}, dose=dose_at(mm).reshape(shape))
    return case, dose_at


def test_binning_factors_keep_the_voxel_near_the_asked_spacing():
    assert binning_factors((0.73, 0.73, 0.625), 2.5) == (4, 3, 3)  # z, y, x
    assert binning_factors((3.9, 3.9, 2.5), 2.5) == (1, 1, 1)  # OpenKBP: the CT is its own dose grid
    with pytest.raises(DoseAIError):
        binning_factors((1, 1, 1), 0.0)


def test_a_coarse_ct_is_its_own_dose_grid():
    case, _ = _phantom(spacing=(3.0, 3.0, 3.0), shape=(20, 30, 30))
    assert on_dose_grid(case, 2.5) is case and on_dose_grid(case, None) is case


@pytest.mark.parametrize("degrees", [0.0, 20.0])
def test_dose_voxels_are_ct_blocks_in_the_ct_frame(degrees):
    case, _ = _phantom(direction=_rotation_z(degrees))
    binned = on_dose_grid(case, 3.0)
    ct, dose = case.geometry, binned.geometry
    assert dose.spacing == (3.0, 3.0, 3.0) and dose.direction == ct.direction
    # the first dose voxel's centre is the centre of its 3 x 3 x 3 CT block, wherever the body box starts
    first_block = ct.physical_to_index(dose.index_to_physical(np.array([[0, 0, 0]])))[0]
    assert np.allclose(first_block - np.round(first_block - 1.0), 1.0)  # a block centre: 1 voxel past a corner
    # the grid covers the body with a margin, and no more than the CT
    assert dose.shape[0] * 3 <= ct.shape[0] and min(dose.shape) > 1
    assert not binned.structures["External"][0].any() or dose.shape[0] * 3 == ct.shape[0]


def test_partial_volumes_keep_each_structure_volume_exactly():
    case, _ = _phantom()
    binned = on_dose_grid(case, 3.0)
    for name, mask in case.structures.items():
        fine_cc = mask.sum() * case.geometry.voxel_volume_mm3 / 1000
        coarse_cc = binned.partial_volumes[name].volume_voxels * binned.geometry.voxel_volume_mm3 / 1000
        assert coarse_cc == pytest.approx(fine_cc, rel=1e-5), name
        assert binned.structures[name].any()


def test_dvh_on_the_dose_grid_matches_the_ct_grid_dvh_of_a_smooth_dose():
    """D95 and Dmean on the 3 mm dose grid (partial volumes) within 1 % of the 1 mm CT grid's, for a big target
    and a 1 cm wide cord; the dose on the dose grid is the same smooth dose at the dose voxel centres."""
    case, dose_at = _phantom()
    binned = on_dose_grid(case, 3.0)
    k, j, i = np.indices(binned.geometry.shape)
    centres = binned.geometry.index_to_physical(np.stack([k.ravel(), j.ravel(), i.ravel()], axis=1))
    coarse_dose = dose_at(centres).reshape(binned.geometry.shape).astype(np.float32)
    fine, coarse = case_metrics(case, case.dose), case_metrics(binned, coarse_dose)
    for name in ("PTV_70", "SpinalCord", "External"):
        for metric in ("D95", "Dmean", "volume_cc"):
            assert coarse[name][metric] == pytest.approx(fine[name][metric], rel=0.01), (name, metric)
    # whole voxels (the masks alone) miss the cord's D95 by more: the partial volumes are what makes it agree
    whole = case_metrics(PlanningCase(binned.geometry, structures=binned.structures), coarse_dose)
    assert abs(whole["SpinalCord"]["D95"] / fine["SpinalCord"]["D95"] - 1) > \
        abs(coarse["SpinalCord"]["D95"] / fine["SpinalCord"]["D95"] - 1)


def test_a_copy_with_a_dose_keeps_the_partial_volumes():
    case, _ = _phantom()
    binned = on_dose_grid(case, 3.0)
    assert binned.with_dose(binned.dose).partial_volumes is binned.partial_volumes


def test_cli_predicts_on_the_dose_grid_and_keeps_the_ct_grid_on_request(fine_case, tmp_path, capsys):
    """`doseai predict` on a CT finer than 2.5 mm writes the dose on its dose grid (said in one line), near the
    prediction on the CT grid (`--dose-grid ct`); a spacing out of range is refused with exit code 2."""
    pytest.importorskip("torch", reason="torch not installed (pip install -e '.[models]')")
    from doseai.cli import main
    from doseai.io import images, save_case
    from doseai.resample import resample_to

    folder = save_case(fine_case, tmp_path / "case", "nrrd")
    assert main(["predict", "--case", str(folder), "--out", str(tmp_path / "grid.nrrd")]) == 0
    assert "dose grid: 80 x 64 x 64 voxels of 2.6 x 2.6 x 2.5 mm over the body" in capsys.readouterr().out
    grid_dose, grid = images.read_image(tmp_path / "grid.nrrd")
    assert grid.matches(on_dose_grid(fine_case).geometry)
    assert main(["predict", "--case", str(folder), "--dose-grid", "ct", "--out", str(tmp_path / "ct.nrrd")]) == 0
    ct_dose, ct = images.read_image(tmp_path / "ct.nrrd")
    assert ct.matches(fine_case.geometry)
    body = fine_case.structures["External"]
    on_ct = resample_to(grid_dose, grid, ct)
    assert np.abs(on_ct - ct_dose)[body].mean() < 0.5  # Gy: the same prediction, on another grid
    ptv = fine_case.structures["PTV_70"]
    assert on_ct[ptv].mean() == pytest.approx(ct_dose[ptv].mean(), abs=0.5)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # argparse's usage line and the reason
        main(["predict", "--case", str(folder), "--dose-grid", "0.1", "--out", str(tmp_path / "x.nrrd")])
    assert exit_info.value.code == 2 and "0.5 to 10" in capsys.readouterr().err


def test_partial_volume_sampling_reads_the_dose_as_map_coordinates_does():
    """The boundary points are read from cached corners and weights; the values are scipy's trilinear ones,
    at the grid's edges (nearest beyond) too."""
    from scipy.ndimage import map_coordinates

    from doseai.dvh import PartialVolume

    rng = np.random.default_rng(5)
    dose = rng.uniform(0, 70, (5, 6, 1)).astype(np.float32)
    points = np.stack([rng.uniform(-0.5, n - 0.5, 400) for n in dose.shape]).astype(np.float32)
    partial = PartialVolume(dose.shape, np.array([0, 7]), points, np.full(400, 0.1, np.float32))
    values, weights = partial.sample(dose)
    expected = map_coordinates(dose, points, order=1, mode="nearest")
    np.testing.assert_allclose(values[2:], expected, rtol=1e-5, atol=1e-4)
    assert values[:2].tolist() == dose.ravel()[[0, 7]].tolist() and weights.sum() == pytest.approx(2 + 40)
