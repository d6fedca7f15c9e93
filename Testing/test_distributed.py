"""Distributed training (issue 31): two gloo processes train the prior (through the CLI), the preference model
and the DVH model on a tiny grid as one process does with ``accumulate=2`` (the same patients per step and the
same draws per patient); only rank 0 writes, and both processes resume from the same checkpoint. The processes
are started by torch.multiprocessing with the environment torchrun gives its workers (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so they join the group as under ``torchrun -m doseai.cli``, with the tiny
data patched in first (torchrun itself could not inject it). The sharding rule, the learning-rate rule and the
CLI options are checked without processes."""

import json
import os
import socket
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (pip install -e '.[models]')")
import torch.distributed as dist  # noqa: E402

from doseai.errors import DoseAIError  # noqa: E402
from doseai.models.features import GridSpec, case_features  # noqa: E402
from doseai.resample import resample_to  # noqa: E402
from doseai.train.dataset import ModelGridData  # noqa: E402
from doseai.train.distributed import step_positions  # noqa: E402

TINY = GridSpec(shape=(32, 32, 32), spacing=(6.0, 6.0, 3.0))
WORLD = 2
# Gradients agree to the last bit (per-patient forwards on one thread each, an average of two that rounds as
# the accumulated sum does), but the prior takes a step's patients as one batch, whose convolutions and codebook
# statistics sum in another order than two processes: rounding that the steps carry on.
TOLERANCE = 1e-5
# Both sides train in fp32: with precision "auto" a CPU with bf16 units times a forward each way, and the single
# process and the two processes could pick differently (a prior off by 7e-2 on such a CPU).
PRECISION = "fp32"
TIME_LIMIT_S = 240  # for the spawned processes (a missed collective would otherwise wait for gloo's 30 min)
needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available in this torch build")


def _tiny_data(case) -> ModelGridData:
    """Four patients on the tiny grid: the sample case, mirrored and shifted (4 patients: 2 steps per epoch)."""
    features, grid = case_features(case, TINY)
    dose = resample_to(case.dose, case.geometry, grid)[np.newaxis] / 70.0
    variants = [lambda a: a, lambda a: a[..., ::-1], lambda a: np.roll(a, 2, -1), lambda a: np.roll(a, -2, -2)]
    return ModelGridData([f"pt_{i + 1}" for i in range(4)],
                         np.stack([v(features) for v in variants]).astype(np.float16),
                         np.stack([v(dose) for v in variants]).astype(np.float16), np.ones(4, bool))


def _tiny_pareto(case) -> dict:
    """Two Pareto patients (three scaled plans of the sample dose each), for the DVH model."""
    from doseai.dvh import dvh_vector
    from doseai.models.dvh_conditioned import DEFAULT_DVH_LAYOUT
    from doseai.train.train_dvh import ParetoPatient

    features, grid = case_features(case, TINY)
    plans = [case.dose * s for s in (0.8, 1.0, 1.1)]
    dvh = np.stack([dvh_vector(p, case.structures, DEFAULT_DVH_LAYOUT["structures"], max(case.prescriptions.values()))
                    for p in plans]).astype(np.float32)
    doses = np.stack([resample_to(p, case.geometry, grid) / 70.0 for p in plans]).astype(np.float16)
    return {"pt_1": ParetoPatient("pt_1", features.astype(np.float16), doses, dvh),
            "pt_2": ParetoPatient("pt_2", features[..., ::-1].astype(np.float16), doses[..., ::-1].copy(), dvh)}


def _patch_data(setattr, data: ModelGridData, pareto: dict | None) -> None:
    """Point the stages at the tiny data (``setattr``: monkeypatch's here, the builtin in a spawned process)."""
    import doseai.train.train_dvh as train_dvh
    import doseai.train.train_preference as train_preference
    import doseai.train.train_prior as train_prior

    def load_split(split, spec, norm_gy=70.0, need_dose=True, need_ct=False):
        return data

    setattr(train_prior, "load_split", load_split)
    setattr(train_preference, "load_split", load_split)
    if pareto is not None:
        setattr(train_dvh, "load_pareto_patients", lambda folder, split, spec, norm_gy, known=None: dict(pareto))


def _train_prior(accumulate: int) -> Path:
    """The prior for 1 epoch, then ``doseai train prior`` resuming it for a 2nd (the CLI last: it ends the process
    group that the first stage of a process started); its checkpoint."""
    from doseai.cli import main
    from doseai.paths import cache_root
    from doseai.train.train_prior import PriorTrainingConfig, train_dose_prior

    train_dose_prior(TINY, PriorTrainingConfig(run_name="prior", epochs=1, threads=1, accumulate=accumulate,
                                               precision=PRECISION))
    assert main(["train", "prior", "--run-name", "prior", "--epochs", "2", "--threads", "1",
                 "--accumulate", str(accumulate), "--precision", PRECISION]) == 0
    return cache_root() / "runs" / "prior" / "last.pt"


def _train_others(accumulate: int, with_dvh: bool, prior: Path) -> dict[str, Path]:
    """The preference model from ``prior`` (one prior for both sides, so that the prior's rounding does not carry
    into the comparison) with the turn augmentation and mixed slider draws, and the DVH model paired, with its mean
    offset; their checkpoints."""
    from doseai.predict import DEFAULT_MODEL
    from doseai.train.train_dvh import DVHTrainingConfig, train_dvh
    from doseai.train.train_preference import PreferenceTrainingConfig, train_preference

    paths = {"preference": train_preference(TINY, prior, PreferenceTrainingConfig(
        run_name="preference", epochs=1, threads=1, accumulate=accumulate, rotate_deg=10.0, scale=0.05,
        neutral_fraction=0.5, metric_weight=0.5, precision=PRECISION))}
    if with_dvh:
        paths["dvh"] = train_dvh(TINY, "tiny", DEFAULT_MODEL, DVHTrainingConfig(
            run_name="dvh", epochs=1, threads=1, accumulate=accumulate, pair_weight=1.0, mean_offset=True))
    return paths


def _worker(rank: int, world: int, port: int, cache: str, records: str, data, pareto, prior: str) -> None:
    """One of the spawned processes: torchrun's environment, the tiny data, the stages (the first joins the gloo
    group from the environment, as under torchrun; one group per process, as there); what this rank saved and
    resumed goes to ``records``/rank<r>.json (the test's record, not the training's)."""
    import doseai.train.loop as loop
    from doseai.train.distributed import shutdown

    os.environ.update(DOSEAI_CACHE=cache, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _patch_data(setattr, data, pareto)
    saved, resumed = [], []
    save, resume = torch.save, loop.Checkpointer.resume

    def recording_save(obj, path, *args, **kwargs):
        saved.append(str(path))
        return save(obj, path, *args, **kwargs)

    def recording_resume(self, model, optimizer):
        resumed.append(resume(self, model, optimizer))
        return resumed[-1]

    torch.save, loop.Checkpointer.resume = recording_save, recording_resume
    try:
        paths = _train_others(accumulate=1, with_dvh=pareto is not None, prior=Path(prior))
        paths["prior"] = _train_prior(accumulate=1)
    finally:
        shutdown()  # after a failure: the CLI, last, ends the group itself
    Path(records, f"rank{rank}.json").write_text(json.dumps({"saved": saved, "resumed": resumed,
                                                             "paths": {k: str(v) for k, v in paths.items()}}))


def _max_difference(first: Path, second: Path) -> float:
    """The largest difference between the weights (and buffers) of two checkpoints of one network, absolute
    below 1 and relative above (the codebook's EMA counts run into the hundreds)."""
    a, b = torch.load(first, weights_only=True)["model"], torch.load(second, weights_only=True)["model"]
    assert a.keys() == b.keys()
    return max(float(((a[k].double() - b[k].double()).abs() / (1 + b[k].double().abs())).max())
               for k in a if a[k].is_floating_point())


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path.parent / "log.jsonl").read_text().splitlines()]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@needs_gloo
def test_two_processes_train_as_one_with_accumulate_two(small_case, tmp_path, monkeypatch, capfd):
    import torch.multiprocessing as mp

    from doseai.predict import DEFAULT_MODEL
    from doseai.train.export import export_model

    data = _tiny_data(small_case)
    pareto = _tiny_pareto(small_case) if DEFAULT_MODEL.is_file() else None  # the DVH model starts from it
    with monkeypatch.context() as patch:
        patch.setenv("DOSEAI_CACHE", str(tmp_path / "single"))
        _patch_data(patch.setattr, data, pareto)
        single = {"prior": _train_prior(accumulate=WORLD)}
        single.update(_train_others(accumulate=WORLD, with_dvh=pareto is not None, prior=single["prior"]))
    records = tmp_path / "records"
    records.mkdir()
    processes = mp.spawn(_worker, args=(WORLD, _free_port(), str(tmp_path / "ddp"), str(records), data, pareto,
                                        str(single["prior"])), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIME_LIMIT_S
    while not processes.join(timeout=2):  # raises when a process failed
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.terminate()
            pytest.fail(f"the processes did not finish within {TIME_LIMIT_S} s (one waits for a collective?)")
    ranks = [json.loads((records / f"rank{r}.json").read_text()) for r in range(WORLD)]

    distributed = {stage: Path(path) for stage, path in ranks[0]["paths"].items()}
    assert distributed.keys() == single.keys() and all(Path(r["paths"]["prior"]) == distributed["prior"] for r in ranks)
    for stage, path in single.items():
        state, reference = torch.load(distributed[stage], weights_only=True), torch.load(path, weights_only=True)
        assert state["epoch"] == reference["epoch"]
        assert state["batch"]["patients_per_step"] == reference["batch"]["patients_per_step"] == 2
        assert (state["batch"]["processes"], reference["batch"]["processes"]) == (WORLD, 1)
        difference = _max_difference(distributed[stage], path)
        assert difference < TOLERANCE, f"{stage}: {difference:.2e}"
        # the log of all processes: one record per epoch (the losses of every process's patients)
        log, reference_log = _log(distributed[stage]), _log(path)
        assert [r["epoch"] for r in log] == [r["epoch"] for r in reference_log]
        for record, expected in zip(log, reference_log):
            for key in expected.keys() - {"time", "seconds", "offset_gains"}:
                assert record[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), (stage, key)

    # rank 0 alone wrote the checkpoints (once per epoch: preference 1, DVH 1, prior 1 + 1); both resumed the prior
    epochs = 3 + (pareto is not None)
    assert len(ranks[0]["saved"]) == epochs and all(path.endswith("last.tmp") for path in ranks[0]["saved"])
    assert ranks[1]["saved"] == []
    assert [r["resumed"][-2:] for r in ranks] == [[0, 1]] * WORLD  # the prior: a new run, then resumed at epoch 2
    assert not (tmp_path / "ddp" / "runs" / "prior" / "last.tmp").exists()
    assert capfd.readouterr().out.count(f"wrote {distributed['prior']}") == 1  # rank 0's line only
    card = json.loads(export_model(distributed["preference"], None, tmp_path / "m.pt").with_suffix(".json").read_text())
    assert card["training"]["batch"].startswith("2 patients per optimizer step (2 processes x 1 accumulated)")


def test_step_positions_follow_the_distributed_sampler_rule():
    # 7 patients over 2 processes, 2 per process and step: position 6 is left out this epoch
    assert step_positions(7, 2, rank_=0, world=2) == [[0, 2], [4]]
    assert step_positions(7, 2, rank_=1, world=2) == [[1, 3], [5]]
    # the processes' step s together are one process's step s with accumulate world x 2
    for s, single in enumerate(step_positions(12, 6, rank_=0, world=1)):
        together = sorted(p for r in range(3) for p in step_positions(12, 2, rank_=r, world=3)[s])
        assert together == single
    assert step_positions(3, 1) == [[0], [1], [2]]  # one process, one patient per step: the permutation as it is
    with pytest.raises(DoseAIError, match="cannot be shared"):
        step_positions(1, 1, rank_=0, world=2)
    with pytest.raises(DoseAIError, match="at least 1"):
        step_positions(4, 0)


def test_a_fixed_precision_is_kept_without_timing(monkeypatch):
    from doseai.train import loop
    from doseai.train.train_prior import PriorTrainingConfig

    timed = []
    monkeypatch.setattr(loop, "bf16_is_faster", lambda *args: timed.append(args) or True)
    cpu, example = torch.device("cpu"), torch.zeros(1)
    assert loop.choose_bf16(PriorTrainingConfig(precision="fp32"), None, example, cpu) is False
    assert loop.choose_bf16(PriorTrainingConfig(precision="bf16"), None, example, cpu) is True
    assert timed == []
    assert loop.choose_bf16(PriorTrainingConfig(), None, example, cpu) is True and len(timed) == 1


def test_learning_rate_rule_and_batch_options(monkeypatch, tmp_path):
    from doseai.cli import main
    from doseai.train.loop import batch_record, patients_per_step, step_learning_rate
    from doseai.train.train_prior import PriorTrainingConfig

    plain = PriorTrainingConfig(learning_rate=1e-3)
    assert patients_per_step(plain) == 1 and step_learning_rate(plain) == 1e-3 and batch_record(plain) == {}
    assert step_learning_rate(replace(plain, accumulate=4)) == 1e-3  # "none": the per-step rate whatever the batch
    assert step_learning_rate(replace(plain, accumulate=4, lr_scaling="linear")) == pytest.approx(4e-3)
    assert step_learning_rate(replace(plain, accumulate=4, lr_scaling="sqrt")) == pytest.approx(2e-3)
    assert batch_record(replace(plain, accumulate=4))["batch"]["patients_per_step"] == 4
    with pytest.raises(DoseAIError, match="accumulate"):
        PriorTrainingConfig(accumulate=0)
    with pytest.raises(DoseAIError, match="lr_scaling"):
        PriorTrainingConfig(lr_scaling="cubic")
    with pytest.raises(DoseAIError, match="precision"):
        PriorTrainingConfig(precision="fp16")

    configs = []
    monkeypatch.setattr("doseai.train.train_prior.train_dose_prior",
                        lambda spec, config: configs.append(config) or tmp_path / "last.pt")
    assert main(["train", "prior", "--run", "r", "--accumulate", "3", "--lr-scaling", "linear",
                 "--precision", "fp32"]) == 0
    assert main(["train", "prior", "--run", "r"]) == 0
    assert [(c.accumulate, c.lr_scaling, c.precision) for c in configs] == [(3, "linear", "fp32"),
                                                                           (1, "none", "auto")]
    assert main(["train", "prior", "--run", "r", "--accumulate", "0"]) == 2 and len(configs) == 2
