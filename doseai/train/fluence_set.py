"""Training data for the learned planner (issue 29): per OpenKBP patient with a CT, the IMRT plan that mimics the
clinical dose (:func:`doseai.optimize.plan.plan_from_dose`, mode "mimic"), kept small enough to commit a whole
split: the bixel weights, the bixel layout (each bixel's beam and beam's-eye-view position), the beam geometry, the
objective against iterations and seconds, the plan's OpenKBP scores against the clinical dose, and the settings.

The influence matrices are not kept (tens to hundreds of MB per patient): the CT, the beams and ``settings.json``
rebuild them (:func:`rebuild_influence`). Layout: ``<cache>/fluence_set/<run>/<split>/pt_N.npz`` and
``settings.json`` beside them. Resumable: a patient is either complete or absent.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from doseai.errors import DoseAIError
from doseai.optimize.plan import PlanSettings

FLUENCE_SET_FORMAT = 1


def fluence_set_folder(run_name: str, split: str = "train") -> Path:
    from doseai.paths import cache_root

    return cache_root() / "fluence_set" / run_name / split


def settings_record(settings: PlanSettings) -> dict:
    """What ``settings.json`` holds: the plan settings (rules included) and the format."""
    return {"format": FLUENCE_SET_FORMAT, "plan_settings": dataclasses.asdict(settings)}


def _tuples(value):
    """JSON's lists back to the tuples the settings dataclasses hold."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def settings_from_record(record: dict) -> PlanSettings:
    from doseai.optimize.from_dose import FromDoseRules

    values = dict(record["plan_settings"])
    values.setdefault("start", "uniform")  # records from before the fluence generator: all started uniform
    values["rules"] = FromDoseRules(**{k: _tuples(v) for k, v in values["rules"].items()})
    return PlanSettings(**values)


def save_influence(path: Path, influence) -> None:
    """An influence matrix (float32 CSR) and its bixel layout in one ``.npz``, written atomically: the learned
    planner trains on many patients' matrices, which take ~20 s each to recompute."""
    import scipy.sparse

    matrix = influence.matrix.cpu()
    csr = scipy.sparse.csr_matrix((matrix.values().numpy(), matrix.col_indices().numpy(),
                                   matrix.crow_indices().numpy()), shape=tuple(matrix.shape))
    partial = Path(path).with_suffix(".tmp.npz")
    np.savez(partial, data=csr.data, indices=csr.indices, indptr=csr.indptr, shape=np.array(csr.shape),
             bixel_beam=influence.bixel_beam, bixel_position_mm=influence.bixel_position_mm)
    partial.rename(path)


def load_influence(path: Path, case, record: dict, settings: PlanSettings):
    """The influence matrix :func:`save_influence` wrote for ``record``'s plan of ``case`` (checked against the
    record's bixel layout and the engine's working grid)."""
    import scipy.sparse

    from doseai.engine.influence import DoseInfluence, torch_csr_from_scipy
    from doseai.optimize.plan import make_engine

    with np.load(path) as saved:
        csr = scipy.sparse.csr_matrix((saved["data"], saved["indices"], saved["indptr"]), shape=tuple(saved["shape"]))
        bixel_beam, position = saved["bixel_beam"], saved["bixel_position_mm"]
    if not (np.array_equal(bixel_beam, record["bixel_beam"]) and np.allclose(position, record["bixel_position_mm"])):
        raise DoseAIError(f"{path} holds another plan's bixels than its record; delete it to recompute it")
    engine = make_engine(settings)
    return DoseInfluence(torch_csr_from_scipy(csr), engine.working_case(case).geometry, record_beams(record),
                         bixel_beam, position, settings.engine)


def record_beams(record: dict):
    """The beam set of a record."""
    from doseai.engine.influence import BeamSet

    return BeamSet(tuple(float(a) for a in record["gantry_angles_deg"]),
                   tuple(float(v) for v in record["isocenter_lps_mm"]),
                   tuple(float(a) for a in record["couch_angles_deg"]), float(record["energy_mv"]),
                   float(record["bixel_width_mm"]))


def mimicking_plan_record(case, settings: PlanSettings, influence_path: Path | None = None) -> dict[str, np.ndarray]:
    """Plan ``case`` to mimic its clinical dose; the arrays of one patient's record (and its influence matrix
    in ``influence_path`` when given)."""
    from doseai.engine.beams import default_beams
    from doseai.optimize.plan import make_engine, plan_from_dose
    from doseai.scoring import score_patient

    start = time.perf_counter()
    beams = default_beams(case, n_beams=settings.n_beams, bixel_width_mm=settings.bixel_width_mm)
    influence = make_engine(settings).compute(case, beams, progress=False)
    engine_s = time.perf_counter() - start
    if influence_path is not None:
        save_influence(influence_path, influence)
    plan = plan_from_dose(case, case.dose, settings, beams=beams, influence=influence, progress=False)
    score = score_patient(case, plan.dose)
    fluence = plan.fluence
    return {
        "weights": fluence.weights.astype(np.float32), "bixel_beam": influence.bixel_beam.astype(np.int16),
        "bixel_position_mm": influence.bixel_position_mm.astype(np.float32),
        "gantry_angles_deg": np.array(beams.gantry_angles_deg, np.float32),
        "couch_angles_deg": np.array(beams.couches, np.float32),
        "isocenter_lps_mm": np.array(beams.isocenter_lps_mm, np.float64),
        "bixel_width_mm": np.float32(beams.bixel_width_mm), "energy_mv": np.float32(beams.energy_mv),
        "objective_history": np.array(fluence.objective_history, np.float64),
        "history_seconds": np.array(fluence.history_seconds, np.float64),
        "iterations": np.int32(fluence.iterations), "stop_reason": np.array(fluence.stop_reason),
        "dose_score_gy": np.float32(score.dose_score),
        "dvh_score_gy": np.float32(np.mean(list(score.dvh_errors.values())) if score.dvh_errors else np.nan),
        "engine_s": np.float32(engine_s), "optimize_s": np.float32(plan.timings_s["optimize_s"]),
        "working_shape": np.array(influence.geometry.shape, np.int32), "on_water": np.bool_(case.ct is None),
    }


def _check_settings(folder: Path, settings: PlanSettings) -> None:
    """Write ``settings.json``, or refuse when the folder was made with other settings (records of two settings
    must not mix in one set)."""
    path = folder / "settings.json"
    record = settings_record(settings)
    if path.is_file():
        if settings_from_record(json.loads(path.read_text())) != settings:
            raise DoseAIError(f"{folder} holds plans made with other settings ({path}); choose another --run")
        return
    path.write_text(json.dumps(record, indent=2))


def generate_fluence_set(run_name: str, split: str = "train", settings: PlanSettings | None = None,
                         limit: int | None = None, shard: tuple[int, int] = (0, 1), folder: Path | None = None,
                         influence_folder: Path | None = None, with_ct_less: bool = False, skip: int = 0) -> Path:
    """The mimicking plans of an OpenKBP split's patients with a CT, one record per patient under ``folder``
    (default :func:`fluence_set_folder`; e.g. ``data/fluence_set/...`` to keep it in the repository); returns
    it. Resumable; a patient whose plan fails (the engine's error) is skipped with the reason in
    ``<id>.failed.txt``. ``shard`` (k, n): every n-th patient from the k-th. ``influence_folder``: keep each
    patient's influence matrix there too (tens of MB each: a cache folder, never the repository).
    ``with_ct_less``: plan the patients without a CT too, on water inside the body (as the engine does for
    them; their records say ``on_water``); otherwise they are left out. ``skip``: leave out the split's first
    ``skip`` patients (``limit`` counts from there)."""
    from tqdm import tqdm

    from doseai.io import openkbp
    from doseai.paths import openkbp_root

    settings = settings or PlanSettings(mode="mimic", bixel_width_mm=10.0)
    if settings.mode != "mimic":
        raise DoseAIError("the fluence set holds mimicking plans (mode 'mimic')")
    folder = Path(folder) if folder is not None else fluence_set_folder(run_name, split)
    folder.mkdir(parents=True, exist_ok=True)
    _check_settings(folder, settings)
    if influence_folder is not None:
        Path(influence_folder).mkdir(parents=True, exist_ok=True)
    if skip < 0:
        raise DoseAIError(f"skip must be 0 or more patients, got {skip}")
    index, count = shard
    patients = list(openkbp.list_patients(openkbp_root() / split).items())[skip:][:limit][index::count]
    for pid, path in tqdm(patients, desc="mimicking plans", unit="patient"):
        target, failure = folder / f"{pid}.npz", folder / f"{pid}.failed.txt"
        kept = Path(influence_folder) / f"{pid}.npz" if influence_folder is not None else None
        if failure.exists() or (target.exists() and (kept is None or kept.exists())):
            continue
        case = openkbp.load_npz(path)
        if case.dose is None or (case.ct is None and not with_ct_less):
            continue  # the plan needs a clinical dose to mimic, the engine densities (or water, when asked)
        if target.exists():  # the record is there, its matrix was not kept: recompute only that
            with np.load(target) as data:
                save_influence(kept, rebuild_influence(case, {k: data[k] for k in data.files}, settings))
            continue
        try:
            record = mimicking_plan_record(case, settings, kept)
        except Exception as error:  # noqa: BLE001 - one patient's engine failure must not end a run of hours
            failure.write_text(f"{type(error).__name__}: {error}\n")
            tqdm.write(f"{pid}: skipped ({type(error).__name__}: {error})")
            continue
        partial = target.with_suffix(".tmp.npz")
        np.savez_compressed(partial, **record)
        partial.rename(target)
    return folder


def load_fluence_set(folder: Path) -> tuple[PlanSettings, dict[str, dict[str, np.ndarray]]]:
    """The settings and the records (by patient id) of a fluence set folder."""
    folder = Path(folder)
    settings_path = folder / "settings.json"
    if not settings_path.is_file():
        raise DoseAIError(f"{folder} is not a fluence set (no settings.json; make one with `doseai train fluence-set`)")
    settings = settings_from_record(json.loads(settings_path.read_text()))
    records = {}
    for path in sorted(folder.glob("pt_*.npz"), key=lambda p: int(p.stem.split("_")[-1])):
        with np.load(path) as data:
            records[path.stem] = {key: data[key] for key in data.files}
    return settings, records


def rebuild_influence(case, record: dict, settings: PlanSettings):
    """The influence matrix of a record's plan, recomputed from the case's CT with the record's beams (its bixel
    layout is checked against the record's, so the weights index the same bixels)."""
    from doseai.optimize.plan import make_engine

    influence = make_engine(settings).compute(case, record_beams(record), progress=False)
    if (influence.n_bixels != len(record["weights"]) or not np.array_equal(influence.bixel_beam, record["bixel_beam"])
            or not np.allclose(influence.bixel_position_mm, record["bixel_position_mm"], atol=1e-3)):
        raise DoseAIError(f"the rebuilt influence matrix has {influence.n_bixels} bixels, the record "
                          f"{len(record['weights'])}: another engine version or CT than the record's")
    return influence
