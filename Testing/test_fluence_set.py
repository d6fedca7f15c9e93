"""The learned planner's training data (doseai.train.fluence_set): a mimicking plan per patient kept as its
weights, bixel layout, beams, objective history and scores; resumable, refusing mixed settings, and the influence
matrix rebuilt from the record gives the plan's dose back. On the synthetic sample case with 3 beams."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch not installed (pip install -e '.[models]')")
pytest.importorskip("pyRadPlan", reason="pyRadPlan not installed (see README: pip install --no-deps pyradplan)")

from doseai.errors import DoseAIError  # noqa: E402
from doseai.optimize.plan import PlanSettings  # noqa: E402

SETTINGS = PlanSettings(n_beams=3, bixel_width_mm=10.0, lateral_cutoff_mm=30.0, max_iterations=40)


@pytest.fixture()
def sample_split(monkeypatch, tmp_path):
    """OpenKBP's reader pointed at two copies of the sample case (pt_1 with a CT, pt_2 without)."""
    from doseai.io import openkbp
    from doseai.sample import make_sample_case

    monkeypatch.setenv("DOSEAI_CACHE", str(tmp_path / "cache"))
    case = make_sample_case(seed=2)
    without_ct = make_sample_case(seed=2)
    without_ct.ct = None
    cases = {"pt_1": case, "pt_2": without_ct}
    monkeypatch.setattr(openkbp, "list_patients", lambda root: {pid: pid for pid in cases})
    monkeypatch.setattr(openkbp, "load_npz", lambda pid: cases[pid])
    return case


def test_a_set_holds_one_record_per_patient_with_a_ct_and_resumes(sample_split, tmp_path):
    from doseai.train.fluence_set import generate_fluence_set, load_fluence_set, rebuild_influence

    folder = generate_fluence_set("tiny", settings=SETTINGS)
    settings, records = load_fluence_set(folder)
    assert settings == SETTINGS and list(records) == ["pt_1"]  # pt_2 has no CT to plan on
    record = records["pt_1"]
    n = len(record["weights"])
    assert n > 0 and record["bixel_beam"].shape == (n,) and record["bixel_position_mm"].shape == (n, 2)
    assert np.all(record["weights"] >= 0) and len(record["gantry_angles_deg"]) == 3
    history = record["objective_history"]
    assert len(history) == int(record["iterations"]) + 1 and history[-1] < history[0]
    assert np.isfinite(record["dose_score_gy"]) and record["dose_score_gy"] > 0

    stamp = (folder / "pt_1.npz").stat().st_mtime_ns
    generate_fluence_set("tiny", settings=SETTINGS)  # resumes: the done patient is not planned again
    assert (folder / "pt_1.npz").stat().st_mtime_ns == stamp
    with pytest.raises(DoseAIError, match="other settings"):
        generate_fluence_set("tiny", settings=PlanSettings(n_beams=5, bixel_width_mm=10.0))
    assert json.loads((folder / "settings.json").read_text())["plan_settings"]["n_beams"] == 3

    influence = rebuild_influence(sample_split, record, settings)  # the weights index the same bixels
    dose = influence.dose_image(record["weights"])
    assert dose.shape == tuple(record["working_shape"]) and float(dose.max()) > 0


def test_kept_matrices_give_the_records_objective_back_and_feed_the_learned_optimizer(sample_split, tmp_path,
                                                                                      monkeypatch):
    from doseai.train.fluence_set import generate_fluence_set, load_fluence_set
    from doseai.train.train_learned_optimizer import load_problems

    kept = tmp_path / "influence"
    folder = generate_fluence_set("tiny", settings=SETTINGS, influence_folder=kept, with_ct_less=True)
    _, records = load_fluence_set(folder)
    assert list(records) == ["pt_1", "pt_2"] and bool(records["pt_2"]["on_water"])  # the CT-less one on water
    assert not bool(records["pt_1"]["on_water"]) and sorted(p.name for p in kept.iterdir()) == ["pt_1.npz", "pt_2.npz"]
    (kept / "pt_1.npz").unlink()
    generate_fluence_set("tiny", settings=SETTINGS, influence_folder=kept, with_ct_less=True)  # only the matrix back
    assert (kept / "pt_1.npz").is_file()
    problems = load_problems(folder, kept)  # checks each record's objective against its rebuilt problem
    assert [p.patient_id for p in problems] == ["pt_1", "pt_2"]
    for problem, record in zip(problems, records.values()):
        assert problem.reference_value == pytest.approx(float(record["objective_history"][-1]), rel=1e-3)
        assert problem.reference_value < float(problem.objective.value(problem.uniform))
    from doseai.optimize.learned import load_learned_optimizer
    from doseai.train.train_learned_optimizer import (
        LearnedOptimizerConfig, export_learned_optimizer, train_learned_optimizer,
    )

    config = LearnedOptimizerConfig(run_name="lo", epochs=2, steps=4, hidden=6, layers=1, patients=2, monitor=1,
                                    threads=1)
    last = train_learned_optimizer(folder, kept, config)
    log = (last.parent / "log.jsonl").read_text().splitlines()
    assert len(log) == 2 and (last.parent / "best.pt").is_file()
    from dataclasses import replace
    train_learned_optimizer(folder, kept, replace(config, epochs=3))  # resumes: one epoch more
    assert len((last.parent / "log.jsonl").read_text().splitlines()) == 3
    network, card = load_learned_optimizer(export_learned_optimizer(last.parent / "best.pt", tmp_path / "lo.pt"))
    assert card["steps"] == 4 and card["training"]["monitor_ids"] == ["pt_1"] and network.hidden == 6

    # from the fluence generator's starts: its fitted patients left out, its starts in the monitor, weights from --init
    import torch

    from doseai.optimize import generator as generator_module

    shipped = generator_module.load_fluence_generator()
    fitted_on = lambda ids: replace(shipped, card={"training": {"tuned_ids": ids}})  # noqa: E731
    problems = load_problems(folder, kept, generator=fitted_on(["pt_1"]), seeds=2)
    assert [p.patient_id for p in problems] == ["pt_2"] and len(problems[0].generated) == 2
    assert all(bool(torch.isfinite(w).all()) and float(w.min()) >= 0 and float(w.max()) > 0
               for w in problems[0].generated)
    assert not torch.equal(*problems[0].generated)  # another noise seed, other weights
    monkeypatch.setattr(generator_module, "load_fluence_generator", lambda path=None: fitted_on([]))
    from_generator = replace(config, run_name="lo_gen", epochs=1, generator="any.pt", generator_seeds=2,
                             init=str(tmp_path / "lo.pt"))
    last = train_learned_optimizer(folder, kept, from_generator)
    record = json.loads((last.parent / "log.jsonl").read_text().splitlines()[-1])
    assert record["selection"] == record["median_generator_ratio"] > 0
    network, card = load_learned_optimizer(export_learned_optimizer(last, tmp_path / "lo_gen.pt"))
    assert card["training"]["starts"]["generator"] == "any.pt" and card["training"]["starts"]["init"].endswith("lo.pt")
