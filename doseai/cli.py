"""The ``doseai`` command line. Errors caused by input are printed as one line with exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from doseai.errors import (
    DoseAIError,
    MissingStructureError,
    UnreadableInputError,
    refuse_nonempty_folder,
    refuse_overwrite,
)
from doseai.dose_grid import DEFAULT_DOSE_GRID_MM
from doseai.output_paths import DOSE_SUFFIXES, check_output_file, check_output_folder
from doseai.predict import DEFAULT_DVH_MODEL, DEFAULT_MODEL

# the training commands' defaults: the shipped weights, relative to the repository root they run from
SHIPPED_PREFERENCE = str(Path("Resources") / "Models" / DEFAULT_MODEL.name)
SHIPPED_DVH = str(Path("Resources") / "Models" / DEFAULT_DVH_MODEL.name)


CASE_HELP = ("the patient: an OpenKBP pt_N.npz or CSV patient folder, a folder with ct.nrrd (.nii.gz, .mha) and "
             "structures.seg.nrrd (or a structures labelmap + case.json), or a DICOM folder with a CT series and "
             "an RTSTRUCT")
REPORT_FILES = ("dvh.csv", "metrics.csv", "dvh.png")


def _add_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")


def _device(text: str) -> str:
    """argparse type of --device: auto, cpu, cuda or cuda:N."""
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"'{text}' is not one of auto, cpu, cuda, cuda:N")


def _add_device(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument("--device", type=_device, default=default, metavar="{auto,cpu,cuda,cuda:N}",
                        help="where the network runs (default: %(default)s: CUDA when available)")


def _pair(text: str, kind: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"'{text}': expected {kind}")
    return name.strip(), value.strip()


def _name_map(text: str) -> tuple[str, str | None]:
    """argparse type of --map: 'RAW=CANONICAL' (or 'RAW=' to leave the structure out)."""
    raw, name = _pair(text, "ROI=NAME, e.g. 'High risk PTV=PTV_70' (or 'ROI=' to leave it out)")
    return raw, name or None


def _prescription(text: str) -> tuple[str, float]:
    """argparse type of --prescription: 'NAME=GY' with a positive, finite dose."""
    name, value = _pair(text, "NAME=GY, e.g. PTV_70=70")
    try:
        gy = float(value)
    except ValueError:
        gy = float("nan")
    if not (0 < gy < 1000):
        raise argparse.ArgumentTypeError(f"'{text}': the prescription must be a positive dose in Gy")
    return name, gy


def _dose_grid(text: str) -> float | None:
    """argparse type of --dose-grid (doseai.dose_grid.parse_dose_grid)."""
    from doseai.dose_grid import parse_dose_grid

    try:
        return parse_dose_grid(text)
    except DoseAIError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_case(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--case", required=True, help=CASE_HELP)
    parser.add_argument("--map", type=_name_map, action="append", default=[], metavar="ROI=NAME",
                        help="read structure ROI as NAME (e.g. --map 'High risk PTV=PTV_70', --map 'Lt Parot=Parotid_L'"
                             "; 'ROI=' leaves it out); repeatable. Unmapped names are matched automatically")
    parser.add_argument("--prescription", type=_prescription, action="append", default=[], metavar="NAME=GY",
                        help="the prescription of target NAME (after --map), when its name holds none; repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="doseai", description="SlicerDoseAI: dose prediction and DVH tools. Bad "
                                     "input stops with a one-line error and exit code 2; nothing is overwritten "
                                     "without --force.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job on the built-in sample case: predict its dose, write CT, "
                                       "structures and dose as DICOM and NRRD, report the DVH, edit one parotid's "
                                       "DVH with the DVH-conditioned model, and optimize a plan toward the dose")
    demo.add_argument("--out", default="doseai-demo", help="output folder (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--oar-sparing", type=float, default=0.0, help="OAR sparing slider in [-1, 1]")
    demo.add_argument("--homogeneity", type=float, default=0.0, help="PTV homogeneity slider in [-1, 1]")
    _add_device(demo)
    demo.add_argument("--no-plan", action="store_true",
                      help="skip the plan optimized toward the predicted dose (done when pyRadPlan is installed)")
    _add_force(demo)

    sample = sub.add_parser("sample", help="write the synthetic head-and-neck sample case")
    sample.add_argument("--out", required=True)
    sample.add_argument("--format", default="nrrd", choices=["nrrd", "nifti", "mha", "dicom", "openkbp-npz"])
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--no-dose", action="store_true", help="leave out the synthetic dose")
    _add_force(sample)

    dvh = sub.add_parser("dvh", help="DVH metrics table, DVH CSV and plot of a dose on a case")
    _add_case(dvh)
    dvh.add_argument("--dose", help="dose file (NRRD/NIfTI/MHA, RTDOSE .dcm, OpenKBP .npz/.csv); "
                                    "default: the case's own dose")
    dvh.add_argument("--reference", help="a reference dose drawn dashed in the plot")
    dvh.add_argument("--out", help="folder for dvh.csv, metrics.csv and dvh.png")
    dvh.add_argument("--skip-empty", action="store_true", help="leave out empty structures instead of failing")
    _add_force(dvh)

    evaluate = sub.add_parser("evaluate", help="OpenKBP dose score and DVH score of predictions")
    evaluate.add_argument("--reference", required=True, help="OpenKBP split folder (pt_N.npz or CSV patient folders)")
    evaluate.add_argument("--predictions", required=True,
                          help="folder with pt_N.npz (dose_gy/dose_cgy), pt_N.csv (challenge format) or pt_N.nrrd")
    evaluate.add_argument("--json", help="write the scores and tables as JSON")
    _add_force(evaluate)

    predict = sub.add_parser("predict", help="predict a dose for a case with the shipped preference model")
    _add_case(predict)
    predict.add_argument("--out", required=True, help="dose file: .nrrd/.nii.gz/.mha, or .dcm for RTDOSE")
    predict.add_argument("--oar-sparing", type=float, default=0.0, help="OAR sparing slider in [-1, 1] (0 = typical)")
    predict.add_argument("--homogeneity", type=float, default=0.0, help="PTV homogeneity slider in [-1, 1]")
    predict.add_argument("--weights", help=f"model weights (default: {SHIPPED_PREFERENCE}); the model card (the "
                                           "same name with .json) must sit beside them")
    predict.add_argument("--no-calibration", action="store_true",
                         help="the network's dose alone, without the model card's calibration (doseai/calibration.py)")
    predict.add_argument("--mirror-average", action=argparse.BooleanOptionalAction,
                         help="average the network's dose over the case and its left-right mirror: twice the network "
                              "time (default: as the model card's inference section says)")
    predict.add_argument("--mirror-neutral", action=argparse.BooleanOptionalAction,
                         help="average over the case and its mirror at neutral sliders only, once per case, and carry "
                              "that correction to any slider position: one network run per slider change (default: "
                              "as the model card's inference section says)")
    predict.add_argument("--desired-dvh", help="CSV of desired DVH curves (dose_gy, <structure>_volume_pct, ...: the "
                                               "layout of --report's dvh.csv): predict with the DVH-conditioned model")
    predict.add_argument("--dvh-weights", help=f"DVH-conditioned weights (default: {SHIPPED_DVH}), with their "
                                               "card .json beside them")
    _add_device(predict)
    predict.add_argument("--dose-grid", type=_dose_grid, default=DEFAULT_DOSE_GRID_MM, metavar="MM|ct",
                         help="the dose's own grid: the CT's voxels binned to about MM (default: %(default)s mm; a CT "
                              "no finer is its own dose grid), aligned with the CT, over the body, as a planning "
                              "system stores an RTDOSE; 'ct': the dose on the CT's grid (slower on a 512 x 512 CT)")
    predict.add_argument("--report", help="folder for the DVH report (dvh.csv, metrics.csv, dvh.png)")
    _add_force(predict)

    train = sub.add_parser("train", help="train the models (resumable; checkpoints in the cache folder)")
    train_sub = train.add_subparsers(dest="stage", required=True)
    prior = train_sub.add_parser("prior", help="Stage I: VQ-VAE dose prior on every training dose")
    preference = train_sub.add_parser("preference", help="Stage II: anatomy encoder + FiLM sliders, frozen prior")
    for stage in (prior, preference):
        stage.add_argument("--run", required=True, help="run name (checkpoints in <cache>/runs/<run>)")
        stage.add_argument("--epochs", type=int, default=30)
        stage.add_argument("--lr", type=float, default=1e-3)
        _add_device(stage)
        stage.add_argument("--threads", type=int)
    preference.add_argument("--prior", help="Stage I checkpoint (omit with --no-freeze for the ablation)")
    preference.add_argument("--no-freeze", action="store_true", help="train the decoder too (ablation without Stage I)")
    preference.add_argument("--init", help="start from these weights (e.g. the shipped model) to train on")
    preference.add_argument("--refine-film", action="store_true", help="let the sliders modulate the refinement head")
    preference.add_argument("--neutral-fraction", type=float, default=0.4,
                            help="share of steps at neutral sliders, trained toward the reference dose "
                                 "(default: %(default)s)")
    preference.add_argument("--metric-weight", type=float, default=0.0,
                            help="weight of the DVH-metric loss at neutral sliders: per structure, OAR mean and "
                                 "hottest 1 %%, target coldest 5 %%, hottest 1 %% and mean (default: %(default)s)")
    preference.add_argument("--seed", type=int, default=0,
                            help="seed of the patient order, augmentation and slider draws; runs that differ only "
                                 "in it can be averaged (default: %(default)s)")
    preference.add_argument("--with-ct-less", action="store_true",
                            help="train on the training patients without a CT too (water-equivalent body)")
    preference.add_argument("--snap-to-case", action="store_true",
                            help="train on the model grid snapped to each case's voxel lattice (as predictions use)")
    preference.add_argument("--slice-mm", type=float,
                            help="slice spacing of the model grid (default 5 mm, as the DVH model and the preference "
                                 "models up to v2.2; v2.3 and later use 2.5); the slice count follows so that the "
                                 "field along z stays the same (320 mm)")
    preference.add_argument("--rotate-deg", type=float, default=0.0,
                            help="in half the steps, turn the case about z by up to this many degrees (augmentation; "
                                 "default: %(default)s, off)")
    preference.add_argument("--scale", type=float, default=0.0,
                            help="in the same half of the steps, zoom by up to this fraction (e.g. 0.05; default: "
                                 "%(default)s, off)")
    preference.add_argument("--time-budget-min", type=float,
                            help="after the first and the second epoch, cut --epochs to what fits in this many "
                                 "minutes at that epoch's pace (the learning-rate schedule follows), e.g. for a "
                                 "GPU lent for a fixed time")
    pareto = train_sub.add_parser("pareto", help="Pareto plans (coverage vs OAR sparing) per training patient, "
                                                 "for the DVH-conditioned network; resumable")
    pareto.add_argument("--run", required=True, help="run name (plans in <cache>/pareto/<run>)")
    pareto.add_argument("--plans", type=int, default=10, help="plans per patient (default: %(default)s)")
    pareto.add_argument("--limit", type=int, help="only the first N patients")
    pareto.add_argument("--bixel-mm", type=float, default=10.0)
    pareto.add_argument("--split", default="train", choices=["train", "validation", "test"],
                        help="OpenKBP split (validation/test: held-out plans for the benchmark, never trained on)")
    pareto.add_argument("--varied", type=int, default=4,
                        help="of the plans, how many draw an independent weight per OAR (default: %(default)s)")
    pareto.add_argument("--shard", default="0/1", help="K/N: every N-th patient from the K-th, to run N processes")
    dvh = train_sub.add_parser("dvh", help="the DVH-conditioned network on generated Pareto plans (resumable)")
    dvh.add_argument("--run", required=True, help="run name (checkpoints in <cache>/runs/<run>)")
    dvh.add_argument("--pareto-run", required=True, help="the `doseai train pareto --run` whose plans to learn from")
    dvh.add_argument("--init", help="preference weights the encoder, decoder and prior start from "
                                    "(default: the shipped preference model)")
    dvh.add_argument("--epochs", type=int, default=20)
    dvh.add_argument("--lr", type=float, default=5e-4)
    _add_device(dvh)
    dvh.add_argument("--threads", type=int)
    dvh.add_argument("--targets", choices=("mixes", "plans"), default="mixes",
                     help="projection onto the Pareto set: the nearest mix of two plans (default) or plan")
    dvh.add_argument("--edit-metric-weight", type=float, default=1.0,
                     help="in a one-curve edit, how much the edited structure's mean/near-max loss term counts "
                          "(default: %(default)s, like every other structure)")
    dvh.add_argument("--pair-weight", type=float, default=0.0,
                     help="> 0: pair each sample with a plan of its patient (the unedited plan of an edit) and add "
                          "this weight x the loss on the change between the two predictions (default: off)")
    dvh.add_argument("--near-max-weight", type=float, default=0.5,
                     help="weight of each structure's near-max (top 2 %%) dose error in the loss (default: %(default)s)")
    dvh.add_argument("--mean-offset", action="store_true",
                     help="add the layer that moves each structure's mean dose toward its desired curve's "
                          "(learned gains; doseai/models/dvh_conditioned.py)")
    calibrate = train_sub.add_parser("calibrate-dvh", help="measure on training Pareto plans the offset of the "
                                     "DVH model's near-max matching and write it into its card")
    calibrate.add_argument("--weights", default=SHIPPED_DVH)
    calibrate.add_argument("--pareto-run", required=True)
    calibrate.add_argument("--limit", type=int, default=10, help="training patients (default: %(default)s)")
    calibrate_edit = train_sub.add_parser("calibrate-edit", help="fit on training patients, from the preference "
                                          "model's dose, the gain on a DVH edit's change per OAR (so that an edit "
                                          "achieves what it asks) and write it into the DVH model's card")
    calibrate_edit.add_argument("--weights", default=SHIPPED_DVH)
    calibrate_edit.add_argument("--limit", type=int, default=15, help="training patients (default: %(default)s)")
    calibrate_edit.add_argument("--threads", type=int)
    calibrate_pref = train_sub.add_parser("calibrate-preference",
                                          help="fit the preference model's case-grid calibration (target lift, OAR "
                                               "near-max) on training patients and write it into its card")
    calibrate_pref.add_argument("--weights", default=SHIPPED_PREFERENCE)
    calibrate_pref.add_argument("--limit", type=int, default=60, help="training patients (default: %(default)s)")
    calibrate_pref.add_argument("--threads", type=int)
    calibrate_pref.add_argument("--mirror-average", action=argparse.BooleanOptionalAction,
                                help="fit on doses averaged over the case and its left-right mirror, and make that "
                                     "the card's default (default: as the card says)")
    calibrate_pref.add_argument("--mirror-neutral", action=argparse.BooleanOptionalAction,
                                help="fit on doses whose neutral part is averaged over the case and its mirror (see "
                                     "predict --mirror-neutral), and make that the card's default (default: as the "
                                     "card says)")
    export_dvh = train_sub.add_parser("export-dvh", help="write the DVH-conditioned model's weights + model card")
    export_dvh.add_argument("--checkpoint", required=True)
    export_dvh.add_argument("--out", default=SHIPPED_DVH)
    _add_force(export_dvh)
    prior_out = train_sub.add_parser("prior-from-weights",
                                     help="the Stage I prior inside shipped preference weights, as a --prior "
                                          "checkpoint (to go on training from shipped weights)")
    prior_out.add_argument("--weights", default=SHIPPED_PREFERENCE)
    prior_out.add_argument("--out", required=True)
    _add_force(prior_out)
    average = train_sub.add_parser("average", help="average weights of one network from runs that differ only in "
                                                   "their seed (a model soup), with the first one's card")
    average.add_argument("--weights", nargs="+", required=True)
    average.add_argument("--out", required=True)
    _add_force(average)
    export = train_sub.add_parser("export", help="write shipped weights + model card")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--prior", help="the Stage I checkpoint (documented in the card); omit for the ablation")
    export.add_argument("--out", default=SHIPPED_PREFERENCE)
    _add_force(export)

    optimize = sub.add_parser("optimize", help="optimize beam fluences toward a desired (e.g. predicted) dose: "
                                               "plan dose, fluence maps, TPS objectives and a DVH comparison")
    _add_case(optimize)
    optimize.add_argument("--dose", help="the desired dose (default: the case's own dose)")
    optimize.add_argument("--out", required=True, help="output folder")
    optimize.add_argument("--mode", default="mimic", choices=["mimic", "objectives"],
                          help="voxel-wise dose mimicking, or the DVH objectives derived from the dose")
    optimize.add_argument("--engine", default="pyradplan", choices=["pyradplan", "pydosert"])
    optimize.add_argument("--beams", type=int, default=9, help="equispaced coplanar beams (default: %(default)s)")
    optimize.add_argument("--bixel-mm", type=float, default=5.0, help="bixel width (default: %(default)s mm)")
    optimize.add_argument("--lateral-cutoff-mm", type=float, default=50.0,
                          help="pyRadPlan's lateral cut-off around each bixel (default: %(default)s mm)")
    optimize.add_argument("--smoothness", type=float, default=0.0, help="fluence smoothness weight")
    optimize.add_argument("--max-iterations", type=int, default=300)
    _add_force(optimize)

    objectives = sub.add_parser("objectives", help="DVH objectives derived from a dose, as JSON and CSV for a TPS")
    _add_case(objectives)
    objectives.add_argument("--dose", help="the desired dose (default: the case's own dose)")
    objectives.add_argument("--out", default=".", help="folder for objectives.json and objectives.csv")
    _add_force(objectives)

    convert = sub.add_parser("convert", help="convert a case between formats")
    _add_case(convert)
    convert.add_argument("--to", required=True, choices=["nrrd", "nifti", "mha", "dicom", "openkbp-npz", "openkbp-csv"])
    convert.add_argument("--out", required=True)
    convert.add_argument("--dose", help="attach this dose to the case before writing")
    _add_force(convert)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("doseai")
    except PackageNotFoundError:  # run from a folder (e.g. the installed Slicer extension), not pip-installed
        return "(not pip-installed)"


def _load_case(args):
    """The case of ``--case``, with the --map overrides and --prescription doses."""
    from doseai.io import load_case

    return load_case(args.case, overrides=dict(args.map) or None, prescriptions=dict(args.prescription) or None)


def _on_dose_grid(case, spacing_mm: float | None):
    """``case`` on its dose grid (doseai.dose_grid), said in one line when that is not the CT's grid."""
    from doseai.dose_grid import on_dose_grid

    binned = on_dose_grid(case, spacing_mm)
    if binned is not case:
        g = binned.geometry
        print(f"dose grid: {' x '.join(map(str, g.shape[::-1]))} voxels of {' x '.join(f'{v:.3g}' for v in g.spacing)}"
              f" mm over the body (the CT: {' x '.join(map(str, case.geometry.shape[::-1]))} of "
              f"{' x '.join(f'{v:.3g}' for v in case.geometry.spacing)} mm; --dose-grid ct keeps the CT's grid)")
    return binned


def _cmd_demo(args) -> int:
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
    predictor.set_case(case)
    case.dose = predictor.predict(args.oar_sparing, args.homogeneity)
    timings = predictor.timings
    mirror_s = timings.get("mirror_correction_s", 0.0)  # once per case, within the first dose's network time
    print(f"predicted the dose with {predictor.card['name']} on {predictor.device}: case preparation "
          f"{timings['features_s'] + timings['encoder_s'] + mirror_s:.2f} s"
          f"{' (with the mirror at neutral sliders)' if mirror_s else ''}, slider-dependent part "
          f"{timings['condition_network_s'] - mirror_s + timings['resample_back_s']:.2f} s "
          f"(oar_sparing {args.oar_sparing:+.2f}, homogeneity {args.homogeneity:+.2f})")
    written = write_dicom_case(case, out / "dicom", force=args.force)
    # what follows (the plan's RTDOSE and RTPLAN) joins the patient, study and frame of reference just written
    case.metadata.update({key: value for key, value in written.items() if key in REFERENCE_KEYS})
    save_case(case, out / "nrrd", "nrrd", force=args.force)
    print(f"wrote DICOM CT + RTSTRUCT + RTDOSE (predicted) + RTPLAN (saying so) to {out / 'dicom'} and NRRD to {out / 'nrrd'}")
    _report(case, case.dose, out / "report", force=args.force)
    _demo_dvh_edit(case, out / "dvh_edit", args.device, args.force)
    if not args.no_plan:
        _demo_plan(case, out / "plan", args.force)
    return 0


def _demo_dvh_edit(case, out: Path, device: str, force: bool, weights: Path | None = None) -> None:
    """A DVH edit with the DVH-conditioned model: the more exposed parotid's curve moved to 80 % of its doses."""
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
    import importlib.util

    if importlib.util.find_spec("pyRadPlan") is None:
        print("note: no plan optimized: the dose engine needs pyRadPlan (pip install -e '.[plan]' && "
              "pip install --no-deps pyradplan==0.5.0)", file=sys.stderr)
        return
    from doseai.optimize.outputs import write_plan
    from doseai.optimize.plan import PlanSettings, plan_from_dose

    plan = plan_from_dose(case, case.dose, PlanSettings(bixel_width_mm=10.0), progress=False)
    write_plan(plan, case, case.dose, out, force=force)
    summary = json.loads((out / "summary.json").read_text())
    print(f"optimized a plan that mimics the predicted dose: {plan.summary()}; mean |plan - predicted| in the "
          f"body {summary['achieved_vs_desired_mae_gy']:.2f} Gy")
    print(f"wrote the plan (RTDOSE, fluence maps, TPS objectives, DVH comparison) to {out}")


def _cmd_sample(args) -> int:
    from doseai.io import save_case
    from doseai.sample import make_sample_case

    case = make_sample_case(seed=args.seed, with_dose=not args.no_dose)
    path = save_case(case, args.out, args.format, force=args.force)
    print(f"wrote sample case {case.patient_id} ({args.format}) to {path}")
    return 0


def _report(case, dose, out: Path | None, reference=None, force: bool = False) -> None:
    from doseai.report import case_dvhs, case_metrics, format_metrics_table, plot_dvhs, write_dvh_csv, write_metrics_csv

    metrics = case_metrics(case, dose)
    print(format_metrics_table(metrics))
    if out is None:
        return
    for name in ("dvh.csv", "metrics.csv", "dvh.png"):
        refuse_overwrite(out / name, force)  # all three checked before any is written
    dvhs = case_dvhs(case, dose)
    write_dvh_csv(dvhs, out / "dvh.csv", force=force)
    write_metrics_csv(metrics, out / "metrics.csv", force=force)
    reference_dvhs = case_dvhs(case, reference) if reference is not None else None
    plot_dvhs(dvhs, out / "dvh.png", reference=reference_dvhs, title=f"DVH of {case.patient_id}", force=force)
    print(f"wrote {out / 'dvh.csv'}, {out / 'metrics.csv'} and {out / 'dvh.png'}")


def _cmd_dvh(args) -> int:
    from doseai.io import load_dose

    if args.out:
        check_output_folder(args.out, REPORT_FILES, args.force, "--out")
    case = _load_case(args)
    if args.dose:
        dose = load_dose(args.dose, case)
    elif case.dose is not None:
        dose = case.dose
    else:
        raise UnreadableInputError(f"{args.case} holds no dose; pass --dose")
    reference = load_dose(args.reference, case) if args.reference else None
    empty = [name for name, mask in case.structures.items() if not mask.any()]
    if empty and not args.skip_empty:
        raise MissingStructureError(f"empty structure(s) {', '.join(empty)}: fix the contours or pass --skip-empty")
    if empty:
        print(f"warning: empty structures left out: {', '.join(empty)}", file=sys.stderr)
    _report(case, dose, Path(args.out) if args.out else None, reference=reference, force=args.force)
    return 0


def _find_prediction(folder: Path, patient_id: str) -> Path | None:
    for suffix in (".npz", ".csv", ".nrrd", ".nii.gz", ".mha"):
        if (folder / f"{patient_id}{suffix}").is_file():
            return folder / f"{patient_id}{suffix}"
    return None


def _cmd_evaluate(args) -> int:
    from tqdm import tqdm

    from doseai.io import load_dose, openkbp
    from doseai.scoring import score_patient, Evaluation

    if args.json:
        check_output_file(args.json, (".json",), args.force, "--json")
    patients = openkbp.list_patients(args.reference)
    predictions = Path(args.predictions)
    if not predictions.is_dir():
        raise UnreadableInputError(f"{predictions}: no such folder")
    if not patients:
        raise UnreadableInputError(f"{args.reference}: no OpenKBP patients found")
    missing = [pid for pid in patients if _find_prediction(predictions, pid) is None]
    if missing:
        raise UnreadableInputError(f"{predictions}: no prediction for {len(missing)} patient(s): "
                                   f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    evaluation = Evaluation()
    for pid, path in tqdm(patients.items(), desc="scoring", unit="patient", file=sys.stderr):
        reference = openkbp.load_patient(path)
        if reference.dose is None:
            print(f"warning: {pid} has no reference dose; skipped", file=sys.stderr)
            continue
        evaluation.patients.append(score_patient(reference, load_dose(_find_prediction(predictions, pid), reference)))
    print(_format_evaluation(evaluation))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(evaluation.to_dict(), indent=2))
        print(f"wrote {args.json}")
    return 0


def _format_evaluation(evaluation) -> str:
    lines = [f"{'structure':<12}{'metric':>10}{'MAE [Gy]':>10}{'bias [Gy]':>11}{'n':>5}"]
    for (structure, metric), row in evaluation.per_structure().items():
        lines.append(f"{structure:<12}{metric:>10}{row['mae']:>10.2f}{row['bias']:>11.2f}{row['n']:>5}")
    lines.append(f"patients: {len(evaluation.patients)}   dose score: {evaluation.dose_score:.3f} Gy   "
                 f"DVH score: {evaluation.dvh_score:.3f} Gy")
    return "\n".join(lines)


def _cmd_convert(args) -> int:
    from doseai.io import load_dose, save_case

    check_output_folder(Path(args.out).parent if args.to == "openkbp-npz" else args.out, (), args.force, "--out")
    case = _load_case(args)
    if args.dose:
        case = case.with_dose(load_dose(args.dose, case))
    path = save_case(case, args.out, args.to, force=args.force)
    print(f"wrote {case.patient_id} as {args.to} to {path}")
    return 0


def _write_dose(dose, case, out: Path, force: bool) -> None:
    from doseai.io import images

    if out.suffix.lower() == ".dcm":
        from doseai.io.dicom import write_rtdose
        from doseai.io.rtplan import PlanDescription

        write_rtdose(dose, case.geometry, out, reference_meta=case.metadata or None, force=force,
                     plan=PlanDescription(prescriptions=dict(case.prescriptions)))
    else:
        images.write_image(dose, case.geometry, out, force=force)


def _cmd_predict(args) -> int:
    import time

    from doseai.predict import DosePredictor

    # every output and input checked before the seconds of prediction
    out = check_output_file(args.out, DOSE_SUFFIXES, args.force, "--out")
    if out.suffix.lower() == ".dcm":  # the RTPLAN written beside the RTDOSE
        from doseai.io.rtplan import rtplan_path_for

        check_output_file(rtplan_path_for(out), (".dcm",), args.force, "the RTPLAN beside --out")
    if args.report:
        check_output_folder(args.report, REPORT_FILES + (("dvh_vs_desired.png",) if args.desired_dvh else ()),
                            args.force, "--report")
    curves = None
    if args.desired_dvh:
        from doseai.report import read_dvh_csv

        curves = read_dvh_csv(args.desired_dvh)
    case = _load_case(args)
    case.require_target()  # before the model loads
    case = _on_dose_grid(case, args.dose_grid)
    predictor = DosePredictor(args.weights, device=args.device)
    predictor.calibrated = not args.no_calibration
    if args.mirror_average is not None:
        predictor.mirror_average = args.mirror_average
    if args.mirror_neutral is not None:
        predictor.mirror_neutral = args.mirror_neutral
    start = time.perf_counter()
    dose = predictor.predict_case(case, args.oar_sparing, args.homogeneity)
    calibration = "no calibration" if args.no_calibration or predictor.calibration is None else "calibrated"
    if predictor.network_mode != "plain":
        calibration += {"mirror_average": ", mirror-averaged", "mirror_neutral": ", mirror-averaged at neutral"}[
            predictor.network_mode]
    print(f"predicted {case.patient_id} on {predictor.device} in {time.perf_counter() - start:.2f} s "
          f"(oar_sparing {args.oar_sparing:+.2f}, homogeneity {args.homogeneity:+.2f}, {calibration})")
    missing = case.missing(predictor.card["inputs"]["channels"][2:-2])
    if missing:
        print(f"note: structures not in the case (empty model channels): {', '.join(missing)}", file=sys.stderr)
    for note in predictor.case_warnings:
        print(f"warning: {note}", file=sys.stderr)
    scale = predictor.timings.get("plan_level_scale", 1.0)
    if scale != 1.0:
        print(f"note: the network's plan level lay outside the training plans' range; dose scaled by {scale:.3f} "
              "(model card: calibration.plan_level_range)", file=sys.stderr)
    if curves is not None:
        return _predict_from_dvh(args, case, dose, out, curves)
    _write_dose(dose, case, out, args.force)
    print(f"wrote {out}")
    if args.report:
        _report(case, dose, Path(args.report), reference=case.dose, force=args.force)
    return 0


def _predict_from_dvh(args, case, slider_dose, out: Path, curves: dict) -> int:
    """``predict --desired-dvh``: the DVH-conditioned model, from the edited curves (the slider prediction's
    DVH for the structures the file leaves out)."""
    import time

    from doseai.predict import DVHDosePredictor

    predictor = DVHDosePredictor(args.dvh_weights, device=args.device)
    predictor.set_case(case)
    desired, edited = predictor.desired_from_curves(curves, slider_dose)
    start = time.perf_counter()
    dose = predictor.predict_edit(slider_dose, desired)  # the slider dose, changed as the edit asks
    print(f"predicted {case.patient_id} from the desired DVH of {', '.join(edited)} in "
          f"{time.perf_counter() - start:.2f} s (the edit applied to the slider prediction)")
    ignored = sorted(set(curves) - set(edited))
    if ignored:
        print(f"note: curves the model does not read were ignored: {', '.join(ignored)}", file=sys.stderr)
    print(format_edit(case, slider_dose, dose, predictor.edit_report(dose, desired, edited)))
    _write_dose(dose, case, out, args.force)
    print(f"wrote {out}")
    if args.report:
        from doseai.report import case_dvhs, plot_dvhs

        _report(case, dose, Path(args.report), force=args.force)
        plot_dvhs(case_dvhs(case, dose), Path(args.report) / "dvh_vs_desired.png", reference=predictor.as_dvhs(desired, edited),
                  title=f"{case.patient_id}: predicted DVH", reference_label="desired", force=args.force)
    return 0


def format_edit(case, before, after, report: dict) -> str:
    """The lines that say what a DVH edit did: each edited structure's mean and D0.1cc against what its desired
    curve asks, then every other structure's and the body's mean change."""
    lines = [f"{'edited':<12}{'mean':>8}{'asked':>8}{'D0.1cc':>9}{'asked':>8}  [Gy]"]
    for name, row in report.items():
        lines.append(f"{name:<12}{row['mean_gy']:8.1f}{row['desired_mean_gy']:8.1f}{row['d01cc_gy']:9.1f}"
                     f"{row['desired_d01cc_gy']:8.1f}")
    changes = [f"{name} {after[mask].mean() - before[mask].mean():+.1f}"
               for name, mask in case.structures.items() if name not in report and mask.any()]
    lines.append("other structures' mean change [Gy]: " + ", ".join(changes))
    return "\n".join(lines)


def _case_and_desired_dose(args):
    from doseai.io import load_dose

    case = _load_case(args)
    if args.dose:
        return case, load_dose(args.dose, case)
    if case.dose is None:
        raise UnreadableInputError(f"{args.case} holds no dose; pass --dose")
    return case, case.dose


def _cmd_optimize(args) -> int:
    from doseai.optimize.outputs import PLAN_FILES, write_plan
    from doseai.optimize.plan import PlanSettings, plan_from_dose

    out = check_output_folder(args.out, PLAN_FILES, args.force, "--out")  # before the minutes of work
    case, desired = _case_and_desired_dose(args)
    settings = PlanSettings(mode=args.mode, engine=args.engine, n_beams=args.beams, bixel_width_mm=args.bixel_mm,
                            lateral_cutoff_mm=args.lateral_cutoff_mm, smoothness=args.smoothness,
                            max_iterations=args.max_iterations)
    print(f"{case.patient_id}: {args.beams} beams, {args.bixel_mm:g} mm bixels, engine {args.engine}, "
          f"mode {args.mode}", file=sys.stderr)
    plan = plan_from_dose(case, desired, settings)
    write_plan(plan, case, desired, out, force=args.force)
    print(plan.summary())
    _report(case, plan.dose, None)
    print(f"wrote {', '.join(PLAN_FILES)} to {out}")
    return 0


def _cmd_objectives(args) -> int:
    from doseai.optimize.from_dose import objectives_from_case
    from doseai.optimize.outputs import write_objectives

    check_output_folder(args.out, ("objectives.json", "objectives.csv"), args.force, "--out")
    case, desired = _case_and_desired_dose(args)
    objectives = objectives_from_case(case, desired)
    paths = write_objectives(objectives, Path(args.out), args.force)
    for o in objectives:
        print(f"{o.structure:<12} {o.type:<9} {o.dose_gy:7.2f} Gy"
              + (f" at {o.volume_pct:g} %" if o.volume_pct is not None else "") + f"  priority {o.priority:g}")
    print(f"wrote {' and '.join(str(p) for p in paths)}")
    return 0


def _cmd_train(args) -> int:
    from doseai.models.features import DEFAULT_GRID as spec
    if args.stage == "prior":
        from doseai.train.train_prior import train_dose_prior

        path = train_dose_prior(spec, args.run, args.epochs, args.lr, device=args.device, threads=args.threads)
    elif args.stage == "preference":
        from dataclasses import replace

        from doseai.models.features import with_slice_spacing
        from doseai.train.train_preference import train_preference

        if args.slice_mm is not None:
            spec = with_slice_spacing(spec, args.slice_mm)
        spec = replace(spec, snap_to_case=args.snap_to_case)

        if not args.prior and not args.no_freeze:
            raise UnreadableInputError("--prior CHECKPOINT is required unless --no-freeze (the ablation)")
        path = train_preference(spec, Path(args.prior) if args.prior else None, args.run, args.epochs, args.lr,
                                freeze_prior=not args.no_freeze, device=args.device, threads=args.threads,
                                init_weights=Path(args.init) if args.init else None,
                                config={"refine_film": True} if args.refine_film else None,
                                neutral_fraction=args.neutral_fraction, metric_weight=args.metric_weight,
                                seed=args.seed, with_ct_less=args.with_ct_less, rotate_deg=args.rotate_deg,
                                scale=args.scale,
                                time_budget_s=args.time_budget_min * 60 if args.time_budget_min else None)
    elif args.stage == "dvh":
        from doseai.train.train_dvh import train_dvh

        from doseai.predict import DEFAULT_MODEL

        path = train_dvh(spec, args.pareto_run, Path(args.init) if args.init else DEFAULT_MODEL, args.run, args.epochs,
                         args.lr, device=args.device, threads=args.threads, targets=args.targets,
                         edit_metric_weight=args.edit_metric_weight, pair_weight=args.pair_weight,
                         mean_offset=args.mean_offset, near_max_weight=args.near_max_weight)
    elif args.stage == "calibrate-dvh":
        from doseai.train.train_dvh import calibrate_near_max

        matching = calibrate_near_max(Path(args.weights), args.pareto_run, args.limit)
        print(f"near-max matching offset {matching['offset_relative']:+.4f} x Rx ({matching['calibration']})")
        path = Path(args.weights).with_suffix(".json")
    elif args.stage == "calibrate-edit":
        from doseai.train.train_dvh import calibrate_edit_gain

        calibration = calibrate_edit_gain(Path(args.weights), args.limit, threads=args.threads)
        print("edit gains: " + ", ".join(f"{name} {gain:.3f}" for name, gain in calibration["gains"].items())
              + f" ({calibration['calibration']})")
        path = Path(args.weights).with_suffix(".json")
    elif args.stage == "calibrate-preference":
        from doseai.train.calibrate_preference import calibrate_preference

        entry = calibrate_preference(Path(args.weights), args.limit, args.threads, args.mirror_average,
                                     args.mirror_neutral)
        fit = entry["fit"]
        print(f"target lift {entry['target_lift']:g} (lower targets {entry['lower_target_lift']:g}) to "
              f"{entry['target_level']:g} x Rx, OAR near-max "
              f"{entry['oar_near_max']:g} x Rx; training dose / DVH score {fit['before']['dose_score_gy']:.3f} / "
              f"{fit['before']['dvh_score_gy']:.3f} -> {fit['after']['dose_score_gy']:.3f} / "
              f"{fit['after']['dvh_score_gy']:.3f} Gy ({fit['patients']} patients); plan level range "
              f"{entry['plan_level_range'][0]:.3f}-{entry['plan_level_range'][1]:.3f} x Rx")
        path = Path(args.weights).with_suffix(".json")
    elif args.stage == "export-dvh":
        from doseai.train.export import export_dvh_model

        path = export_dvh_model(Path(args.checkpoint), Path(args.out), force=args.force)
    elif args.stage == "average":
        from doseai.train.export import average_weights

        path = average_weights([Path(w) for w in args.weights], Path(args.out), force=args.force)
    elif args.stage == "prior-from-weights":
        from doseai.train.export import prior_from_weights

        path = prior_from_weights(Path(args.weights), Path(args.out), force=args.force)
    elif args.stage == "pareto":
        from doseai.train.pareto import generate_pareto

        shard = tuple(int(part) for part in args.shard.split("/"))
        path = generate_pareto(args.run, split=args.split, n_plans=args.plans, limit=args.limit,
                               bixel_width_mm=args.bixel_mm, n_varied=args.varied, shard=shard)
    else:
        from doseai.train.export import export_model

        path = export_model(Path(args.checkpoint), Path(args.prior) if args.prior else None, Path(args.out),
                            force=args.force)
    print(f"wrote {path}")
    return 0


COMMANDS = {"predict": _cmd_predict, "train": _cmd_train, "demo": _cmd_demo, "sample": _cmd_sample, "dvh": _cmd_dvh,
            "evaluate": _cmd_evaluate, "convert": _cmd_convert, "optimize": _cmd_optimize,
            "objectives": _cmd_objectives}


def _one_line_warnings(command: str):
    """Print the warnings of the readers and models as one line each (not Python's file:line and source)."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"doseai {command}: warning: {message}", file=sys.stderr)
    return show


def main(argv: list[str] | None = None) -> int:
    import warnings

    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(args.command)
            return COMMANDS[args.command](args)
    except DoseAIError as error:
        print(f"doseai {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError) as error:
        print(f"doseai {args.command}: error: {error}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"doseai {args.command}: error: out of memory: the case is too large for this machine's memory",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
