import time

import numpy as np
import pytest

from doseai.dvh import (
    compute_dvhs,
    dose_at_volume_cc,
    dose_at_volume_pct,
    homogeneity_index,
    paddick_conformity_index,
    structure_metrics,
    volume_at_dose,
)


def test_cumulative_dvh_matches_brute_force():
    rng = np.random.default_rng(0)
    dose = rng.uniform(0, 70, size=(10, 12, 14)).astype(np.float32)
    masks = {"a": rng.random(dose.shape) < 0.3, "b": rng.random(dose.shape) < 0.1, "empty": np.zeros(dose.shape, bool)}
    dvhs = compute_dvhs(dose, masks, voxel_volume_cc=0.05, bin_width_gy=0.5)
    assert set(dvhs) == {"a", "b"}  # empty structures are left out
    for name in ("a", "b"):
        values = dose[masks[name]]
        for level in (0.0, 10.0, 35.5, 69.5):
            i = int(round(level / 0.5))
            assert dvhs[name].volume_cc[i] == pytest.approx(np.count_nonzero(values >= level) * 0.05)
        assert dvhs[name].volume_pct[0] == pytest.approx(100.0)
        assert dvhs[name].total_cc == pytest.approx(values.size * 0.05)
        assert np.all(np.diff(dvhs[name].volume_cc) <= 0)


def test_dose_metrics_on_known_distribution():
    values = np.arange(1, 101, dtype=float)  # 1..100 Gy, one voxel each
    assert dose_at_volume_pct(values, 95) == pytest.approx(np.percentile(values, 5))
    assert volume_at_dose(values, 91) == pytest.approx(10.0)
    assert volume_at_dose(values, 91, voxel_volume_cc=0.5) == pytest.approx(5.0)
    # D_0.1cc with 0.02 cc voxels: the hottest 5 voxels -> the 95th percentile
    assert dose_at_volume_cc(values, 0.1, 0.02) == pytest.approx(np.percentile(values, 95))
    hi = (np.percentile(values, 98) - np.percentile(values, 2)) / np.percentile(values, 50)
    assert homogeneity_index(values) == pytest.approx(hi)


def test_paddick_conformity():
    target = np.zeros((10, 10, 10), bool)
    target[2:6, 2:6, 2:6] = True  # 64 voxels
    dose = np.zeros(target.shape)
    dose[2:6, 2:6, 2:8] = 70  # covers the target and 32 voxels more
    assert paddick_conformity_index(dose, target, 70) == pytest.approx(64**2 / (64 * 96))
    assert paddick_conformity_index(np.where(target, 70.0, 0.0), target, 70) == pytest.approx(1.0)


def test_structure_metrics_target_and_oar():
    dose = np.full((5, 5, 5), 60.0)
    mask = np.ones(dose.shape, bool)
    oar = structure_metrics(dose, mask, 0.001, "oar", v_levels_gy=(50, 70))
    assert oar["Dmean"] == pytest.approx(60) and oar["V50Gy"] == 100 and oar["V70Gy"] == 0
    assert "HI" not in oar
    ptv = structure_metrics(dose, mask, 0.001, "ptv", prescription_gy=60)
    assert ptv["HI"] == pytest.approx(0.0) and ptv["CI_Paddick"] == pytest.approx(1.0)
    with pytest.raises(Exception, match="empty"):
        structure_metrics(dose, np.zeros(dose.shape, bool), 0.001, "nothing")


def test_dvh_is_fast_on_a_large_grid():
    # correctness on a realistic size; the timing itself is reported by the benchmark script, this only
    # guards against an accidental non-vectorized rewrite (10x margin over the measured ~0.08 s)
    rng = np.random.default_rng(1)
    dose = rng.uniform(0, 75, size=(128, 128, 128)).astype(np.float32)
    masks = {str(i): rng.random(dose.shape) < 0.02 * (i + 1) for i in range(10)}
    start = time.perf_counter()
    dvhs = compute_dvhs(dose, masks, 0.04)
    assert time.perf_counter() - start < 1.0
    assert len(dvhs) == 10
