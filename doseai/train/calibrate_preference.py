"""``doseai train calibrate-preference``: fit the preference model's case-grid calibration (doseai.calibration) on
training patients and write it into the model card. Validation patients are never used."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from doseai.errors import DoseAIError
from doseai.train.export import update_card


def calibrate_preference(weights: Path, limit: int = 60, threads: int | None = None,
                         mirror_average: bool | None = None, mirror_neutral: bool | None = None) -> dict:
    """Predict the first ``limit`` training patients with a plan (neutral sliders, network alone), fit the
    calibration minimising their dose score + DVH score, with the plan level range of all training plans in
    place, and write it into the card next to ``weights``.
    ``mirror_average`` (None: as the card says) predicts through the case and its mirror; the card then
    records it beside the calibration, since one is fitted to the other; ``mirror_neutral`` likewise (the mirror
    average at neutral sliders only, see ``DosePredictor``)."""
    from doseai.calibration import CaseRegions, fit_calibration, plan_level, plan_levels_range
    from doseai.models.features import structure_volumes_cc
    from doseai.structures import OPENKBP_OARS
    from doseai.io import openkbp
    from doseai.paths import openkbp_root
    from doseai.predict import DosePredictor

    predictor = DosePredictor(weights, threads=threads)
    predictor.calibrated = False
    if mirror_average is not None:
        predictor.mirror_average = mirror_average
    if mirror_neutral is not None:
        predictor.mirror_neutral = mirror_neutral
    cases, doses, levels, volumes = [], [], [], {}
    paths = list(openkbp.list_patients(openkbp_root() / "train").values())
    for index, path in enumerate(tqdm(paths, desc="training patients (plan levels; the first "
                                                   f"{limit} also predicted)", unit="patient")):
        case = openkbp.load_npz(path)
        for name, cc in structure_volumes_cc(case, OPENKBP_OARS).items():
            volumes.setdefault(name, []).append(cc)
        if case.dose is None:  # a few OpenKBP training patients come without a plan
            continue
        levels.append(plan_level(case.dose, CaseRegions.of(case)))
        if index < limit:
            cases.append(case)
            doses.append(predictor.predict_case(case))
    if not cases:
        raise DoseAIError(f"no training patient with a plan among the first {limit}")
    level_range = plan_levels_range(levels)
    with tqdm(desc="calibrations tried", unit="fit") as bar:
        calibration, fit = fit_calibration(cases, doses, progress=lambda *_: bar.update(),
                                           plan_level_range=level_range)
    entry = {**calibration.as_dict(),
             "text": "after the network, on the case grid (doseai/calibration.py): when the network's plan level at "
                     "neutral sliders (mean dose in the targets of the highest prescription / that prescription) "
                     "falls outside plan_level_range, every dose of the case is scaled onto the nearest bound; "
                     "in each target voxel the dose "
                     "below target_level x its prescription is raised by target_lift (in targets of the highest "
                     "prescription; lower_target_lift in the others) x the difference; in each "
                     "OpenKBP OAR the voxels above its median dose, outside targets, are lowered by a ramp reaching "
                     "oar_near_max x the highest prescription at its D0.1cc",
             "fit": {**fit, "data": f"the first {limit} OpenKBP training patients ({fit['patients']} with a plan), "
                                    "neutral sliders; minimising dose score + DVH score over a grid",
                     "plan_level_range_from": f"2.5th and 97.5th percentiles of the plan levels of the "
                                              f"{len(levels)} OpenKBP training plans",
                     "command": "doseai train calibrate-preference"}}
    inference = {"mirror_average": predictor.mirror_average, "mirror_neutral": predictor.mirror_neutral,
                 "text": "mirror_average: the network runs on the case and on its left-right mirror (left and right "
                         "structures swapped) and the two doses, the second mirrored back, are averaged before the "
                         "calibration; twice the network time per prediction. mirror_neutral (when mirror_average "
                         "is off): the same average at neutral sliders only, once per case; half the mirror's "
                         "difference is added to the dose at every slider position, so a slider change runs the "
                         "network once (a new case runs it once more)"}
    training_volumes = {name: [round(min(cc), 1), round(max(cc), 1)] for name, cc in sorted(volumes.items())}

    def write(card: dict) -> None:
        card.update(calibration=entry, inference=inference)
        card["inputs"]["training_volumes_cc"] = training_volumes
        card["inputs"]["training_volumes_text"] = (
            f"smallest and largest volume of each OAR over the {len(paths)} OpenKBP training patients; a case's OAR "
            "more than 2x outside is flagged on prediction (doseai.models.features.unlike_training)")

    update_card(weights, write)
    return entry
