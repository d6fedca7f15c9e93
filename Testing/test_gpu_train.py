"""The ready-made GPU run (tools/gpu_train.py): the training data packed into a size budget comes back unchanged,
and the whole run (unpack, prior, train, export, calibrate, benchmark of the new and the shipped model) goes end
to end on the CPU with a one-minute budget on a tiny subset."""

import importlib.util
import json

import numpy as np
import pytest

from doseai.errors import DoseAIError
from doseai.paths import REPO_ROOT, openkbp_root
from doseai.train.travel import _packed_patient, pack_openkbp, packed_patients, unpack_openkbp

OPENKBP = openkbp_root()


def _patient(path, seed):
    rng = np.random.default_rng(seed)
    np.savez_compressed(path, ct=rng.integers(-1000, 1500, (16, 16, 16)).astype(np.int16),
                        dose_cgy=rng.integers(0, 7000, (16, 16, 16)).astype(np.uint16),
                        masks=rng.integers(0, 4, (16, 16, 16)).astype(np.uint16), voxel_mm=np.float32([4, 4, 2.5]),
                        roi_names=np.array(["Brainstem", "PTV70"]))


def test_a_pack_keeps_validation_whole_fills_the_budget_and_unpacks_unchanged(tmp_path):
    source = tmp_path / "openkbp"
    for seed, (split, count) in enumerate((("validation", 2), ("train", 3))):
        (source / split / "128").mkdir(parents=True)
        for number in range(1, count + 1):
            _patient(source / split / "128" / f"pt_{number}.npz", 10 * seed + number)
    sizes = {(split, pid): len(_packed_patient(source / split / "128" / f"{pid}.npz"))
             for split, pid in (("validation", "pt_1"), ("validation", "pt_2"), ("train", "pt_1"), ("train", "pt_2"))}
    budget = sum(sizes.values()) + 10  # validation and two training patients, not the third
    manifest = pack_openkbp(source, tmp_path / "pack", budget_bytes=budget)
    assert manifest["splits"]["validation"] == {"packed": ["pt_1", "pt_2"], "left_out": []}
    assert manifest["splits"]["train"]["packed"] == ["pt_1", "pt_2"]
    assert manifest["splits"]["train"]["left_out"] == ["pt_3"] and manifest["packed_bytes"] == budget - 10
    unpack_openkbp(tmp_path / "pack", tmp_path / "data")
    for split, pid in (("validation", "pt_2"), ("train", "pt_1")):
        with np.load(source / split / "128" / f"{pid}.npz") as before, \
                np.load(tmp_path / "data" / "openkbp" / split / "128" / f"{pid}.npz") as after:
            assert set(before.files) == set(after.files)
            for key in before.files:
                assert np.array_equal(before[key], after[key]) and before[key].dtype == after[key].dtype
    assert not (tmp_path / "data" / "openkbp" / "train" / "128" / "pt_3.npz").exists()
    # a second part carries the training patients the first left out (a later call to the same machine)
    second = pack_openkbp(source, tmp_path / "pack-1", budget_bytes=10**6, splits=("train",),
                          exclude=packed_patients([tmp_path / "pack"]), whole_first=False)
    assert second["splits"]["train"] == {"packed": ["pt_3"], "left_out": []}
    unpack_openkbp(tmp_path / "pack-1", tmp_path / "data")
    assert sorted(p.name for p in (tmp_path / "data" / "openkbp" / "train" / "128").iterdir()) == [
        "pt_1.npz", "pt_2.npz", "pt_3.npz"]
    with pytest.raises(DoseAIError, match="validation split alone needs more"):
        pack_openkbp(source, tmp_path / "small", budget_bytes=10_000)


def test_the_gpu_run_goes_end_to_end_on_the_cpu_with_a_one_minute_budget(tmp_path):
    if not (OPENKBP / "train").is_dir():
        pytest.skip(f"OpenKBP data not found at {OPENKBP} (set DOSEAI_DATA or place ../shared/data beside the repo)")
    pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("gpu_train", REPO_ROOT / "tools" / "gpu_train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["pack", "--pack", str(tmp_path / "pack"), "--train-limit", "2", "--val-limit", "1"]) == 0
    out = tmp_path / "out"
    assert script.main(["run", "--pack", str(tmp_path / "pack"), "--out", str(out), "--work", str(tmp_path / "work"),
                        "--device", "cpu", "--minutes", "1", "--epochs", "1", "--calibration-limit", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench_shipped.json", "gpu_run.json", "gpu_run.pt",
                                                      "run.log", "train_log.jsonl"]
    card = json.loads((out / "gpu_run.json").read_text())
    assert card["calibration"] and card["preference"]["sliders"] == ["oar_sparing", "homogeneity"]
    for name in ("bench.json", "bench_shipped.json"):
        bench = json.loads((out / name).read_text())
        assert bench["patients"] == 1 and np.isfinite(bench["accuracy"]["dose_score_gy"])
    assert json.loads((out / "train_log.jsonl").read_text().splitlines()[-1])["epochs"] == 1
