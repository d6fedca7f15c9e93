"""``doseai demo`` (the main job on the built-in sample case) and ``doseai sample``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from doseai.cli.common import add_conditions, add_device, add_force, condition_values, report
from doseai.errors import refuse_nonempty_folder, refuse_overwrite
from doseai.output_paths import check_output_folder

DEMO_FOLDER = "doseai-demo"  # git-ignored in a clone


def add_parsers(sub, conditions) -> None:
    """``demo`` (with the shipped model's ``conditions`` as options) and ``sample``."""
    from doseai.io import case_format_names

    demo = sub.add_parser("demo", help="the main job on the built-in sample case: predict its dose, write CT, "
                                       "structures and dose as DICOM and NRRD, report the DVH, edit one parotid's "
                                       "DVH with the DVH-conditioned model, and optimize a plan toward the dose")
    demo.add_argument("--out", default=DEMO_FOLDER, help="output folder (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    add_conditions(demo, conditions)
    add_device(demo)
    demo.add_argument("--no-plan", action="store_true",
                      help="skip the plan optimized toward the predicted dose (done when pyRadPlan is installed)")
    add_force(demo)

    sample = sub.add_parser("sample", help="write the synthetic head-and-neck sample case")
    sample.add_argument("--out", required=True)
    sample.add_argument("--format", default="nrrd", choices=case_format_names(any_grid=True))
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--no-dose", action="store_true", help="leave out the synthetic dose")
    add_force(sample)


def run_demo(args) -> int:
    from doseai.io import save_case
    from doseai.io.dicom import REFERENCE_KEYS, write_dicom_case
    from doseai.predict import DosePredictor
    from doseai.sample import make_sample_case

    out = check_output_folder(args.out, (), args.force, "--out")
    refuse_nonempty_folder(out, args.force)
    case = make_sample_case(seed=args.seed, with_dose=False)
    print(f"sample case {case.patient_id}: grid {case.geometry.shape[::-1]} (x, y, z) voxels of "
          f"{' x '.join(f'{s:g}' for s in case.geometry.spacing)} mm, {len(case.structures)} structures, "
          f"prescriptions {', '.join(f'{n} {gy:g} Gy' for n, gy in case.prescriptions.items())}")
    predictor = DosePredictor(device=args.device)
    values = condition_values(args, predictor.conditions)
    predictor.set_case(case)
    case.dose = predictor.predict(sliders=values)
    timings = predictor.timings
    mirror_s = timings.get("mirror_correction_s", 0.0)  # once per case, within the first dose's network time
    print(f"predicted the dose with {predictor.card['name']} on {predictor.device}: case preparation "
          f"{timings['features_s'] + timings['encoder_s'] + mirror_s:.2f} s"
          f"{' (with the mirror at neutral sliders)' if mirror_s else ''}, slider-dependent part "
          f"{timings['condition_network_s'] - mirror_s + timings['resample_back_s']:.2f} s "
          f"({predictor.conditions.describe(values)})")
    written = write_dicom_case(case, out / "dicom", force=args.force)
    # what follows (the plan's RTDOSE and RTPLAN) joins the patient, study and frame of reference just written
    case.metadata.update({key: value for key, value in written.items() if key in REFERENCE_KEYS})
    save_case(case, out / "nrrd", "nrrd", force=args.force)
    print(f"wrote DICOM CT + RTSTRUCT + RTDOSE (predicted) + RTPLAN (saying so) to {out / 'dicom'} and NRRD to {out / 'nrrd'}")
    report(case, case.dose, out / "report", force=args.force)
    demo_dvh_edit(case, out / "dvh_edit", args.device, args.force)
    if not args.no_plan:
        _demo_plan(case, out / "plan", args.force)
    return 0


def demo_dvh_edit(case, out: Path, device: str, force: bool, weights: Path | None = None) -> None:
    """A DVH edit with the DVH-conditioned model: the more exposed parotid's curve moved to 80 % of its doses."""
    from doseai.cli.predict import format_edit
    from doseai.dvh import dose_at_volume_pct
    from doseai.predict import DEFAULT_DVH_MODEL, DVHDosePredictor
    from doseai.report import case_dvhs, plot_dvhs, write_dvh_csv
    from doseai.train.train_dvh import one_curve_edit

    weights = weights or DEFAULT_DVH_MODEL
    if not weights.is_file():
        print(f"note: no DVH edit: {weights} not found (doseai train dvh / export-dvh)", file=sys.stderr)
        return
    predictor = DVHDosePredictor(weights, device=device)
    predictor.set_case(case)
    parotids = [n for n in ("Parotid_L", "Parotid_R") if n in case.structures and case.structures[n].any()]
    if not parotids:
        print("note: no DVH edit: the case has no parotid", file=sys.stderr)
        return
    parotid = max(parotids, key=lambda n: case.dose[case.structures[n]].mean())
    before = case.dose  # the edit starts from the predicted dose
    desired, _ = one_curve_edit(predictor, predictor.dvh_vector(before), parotid, 0.8)
    edited = predictor.predict_edit(before, desired)
    target = case.structures[max(case.prescriptions, key=case.prescriptions.get)]
    mask = case.structures[parotid]
    seconds = predictor.timings["condition_network_s"] + predictor.timings["resample_back_s"]
    print(f"DVH edit with {predictor.card.get('name', predictor.weights.stem)} ({seconds:.2f} s): "
          f"{parotid} curve moved to 80 % of its doses -> its mean {before[mask].mean():.1f} -> "
          f"{edited[mask].mean():.1f} Gy; top PTV D95 {dose_at_volume_pct(before[target], 95):.1f} -> "
          f"{dose_at_volume_pct(edited[target], 95):.1f} Gy (the predicted dose, changed as the edit asks)")
    print(format_edit(case, before, edited, predictor.edit_report(edited, desired, [parotid])))
    for name in ("desired_dvh.csv", "dvh_vs_desired.png"):
        refuse_overwrite(out / name, force)
    write_dvh_csv(predictor.as_dvhs(desired, [parotid]), out / "desired_dvh.csv", force=force)
    plot_dvhs(case_dvhs(case, edited), out / "dvh_vs_desired.png", reference=predictor.as_dvhs(desired, [parotid]),
              title=f"{case.patient_id}: after the DVH edit", reference_label="desired", force=force)
    print(f"wrote {out / 'desired_dvh.csv'} (input format of predict --desired-dvh) and {out / 'dvh_vs_desired.png'}")


def _demo_plan(case, out: Path, force: bool) -> None:
    """The predicted dose turned into a 9-beam plan (10 mm bixels keep it to about half a minute)."""
    from doseai.engine.registry import DEFAULT_ENGINE, engine_class

    engine = engine_class(DEFAULT_ENGINE)
    if not engine.is_installed():
        print(f"note: no plan optimized: the dose engine needs {engine.label} ({engine.requirements.install_hint})",
              file=sys.stderr)
        return
    from doseai.optimize.outputs import write_plan
    from doseai.optimize.plan import PlanSettings, plan_from_dose

    plan = plan_from_dose(case, case.dose, PlanSettings(bixel_width_mm=10.0), progress=False)
    write_plan(plan, case, case.dose, out, force=force)
    summary = json.loads((out / "summary.json").read_text())
    print(f"optimized a plan that mimics the predicted dose: {plan.summary()}; mean |plan - predicted| in the "
          f"body {summary['achieved_vs_desired_mae_gy']:.2f} Gy")
    print(f"wrote the plan (RTDOSE, fluence maps, TPS objectives, DVH comparison) to {out}")


def run_sample(args) -> int:
    from doseai.io import save_case
    from doseai.sample import make_sample_case

    case = make_sample_case(seed=args.seed, with_dose=not args.no_dose)
    path = save_case(case, args.out, args.format, force=args.force)
    print(f"wrote sample case {case.patient_id} ({args.format}) to {path}")
    return 0
