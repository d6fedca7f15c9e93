"""``doseai predict``: a dose for a case from the preference model (its sliders from the model card), from a
desired DVH with the DVH-conditioned model, or the mean of several samples of the diffusion model (with their
voxel-wise spread)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from doseai.cli.common import (
    REPORT_FILES,
    SHIPPED_DIFFUSION,
    SHIPPED_DVH,
    SHIPPED_PREFERENCE,
    add_case,
    add_conditions,
    add_device,
    add_force,
    condition_values,
    dose_grid_type,
    load_case_of,
    on_dose_grid,
    report,
    write_dose,
)
from doseai.dose_grid import DEFAULT_DOSE_GRID_MM
from doseai.errors import UnreadableInputError
from doseai.output_paths import DOSE_SUFFIXES, check_output_file, check_output_folder


def add_parser(sub, conditions) -> None:
    """The ``predict`` subcommand; ``conditions``: those of the model that ``--weights`` names."""
    predict = sub.add_parser("predict", help="predict a dose for a case with the shipped preference model")
    add_case(predict)
    predict.add_argument("--out", required=True, help="dose file: .nrrd/.nii.gz/.mha, or .dcm for RTDOSE")
    add_conditions(predict, conditions)
    predict.add_argument("--weights", help=f"model weights (default: {SHIPPED_PREFERENCE}); the model card (the "
                                           "same name with .json) must sit beside them; its sliders are the options "
                                           "above")
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
    predict.add_argument("--model", choices=("preference", "diffusion"), default="preference",
                         help="preference: one dose (default); diffusion: --samples doses drawn around the preference "
                              "model's, --out their mean (its sliders and calibration options apply to the base)")
    predict.add_argument("--samples", type=int, default=4, help="with --model diffusion: how many (default: %(default)s)")
    predict.add_argument("--seed", type=int, default=0,
                         help="with --model diffusion: the draw (the same seed gives the same samples)")
    predict.add_argument("--spread", help="with --model diffusion: image file (.nrrd/.nii.gz/.mha) for the voxel-wise "
                                          "width of the samples' 5-95 %% band (Gy): where the prediction is unsure")
    predict.add_argument("--diffusion-weights", help=f"diffusion weights (default: {SHIPPED_DIFFUSION}), with their "
                                                     "card; the base preference model is the one its card names "
                                                     "unless --weights is given")
    add_device(predict)
    predict.add_argument("--dose-grid", type=dose_grid_type, default=DEFAULT_DOSE_GRID_MM, metavar="MM|ct",
                         help="the dose's own grid: the CT's voxels binned to about MM (default: %(default)s mm; a CT "
                              "no finer is its own dose grid), aligned with the CT, over the body, as a planning "
                              "system stores an RTDOSE; 'ct': the dose on the CT's grid (slower on a 512 x 512 CT)")
    predict.add_argument("--report", help="folder for the DVH report (dvh.csv, metrics.csv, dvh.png)")
    add_force(predict)


def _check_outputs(args) -> Path:
    """Every output checked before the seconds of prediction."""
    out = check_output_file(args.out, DOSE_SUFFIXES, args.force, "--out")
    if out.suffix.lower() == ".dcm":  # the RTPLAN written beside the RTDOSE
        from doseai.io.dicom import rtplan_path_for

        check_output_file(rtplan_path_for(out), (".dcm",), args.force, "the RTPLAN beside --out")
    if args.report:
        check_output_folder(args.report, REPORT_FILES + (("dvh_vs_desired.png",) if args.desired_dvh else ()),
                            args.force, "--report")
    diffusion = args.model == "diffusion"
    for option, given in (("--spread", args.spread), ("--diffusion-weights", args.diffusion_weights)):
        if given and not diffusion:
            raise UnreadableInputError(f"{option} needs --model diffusion")
    if diffusion:
        if args.desired_dvh:
            raise UnreadableInputError("--desired-dvh takes the DVH-conditioned model, not --model diffusion")
        if args.samples < 1:
            raise UnreadableInputError(f"--samples must be at least 1, got {args.samples}")
        if args.spread:
            check_output_file(args.spread, tuple(s for s in DOSE_SUFFIXES if s != ".dcm"), args.force, "--spread")
    return out


def _predictor(args):
    from doseai.predict import DosePredictor

    if args.model == "diffusion":
        from doseai.diffusion_predict import DiffusionDosePredictor

        sampler = DiffusionDosePredictor(args.diffusion_weights, device=args.device, base_weights=args.weights)
        _set_base_options(args, sampler.base)
        return sampler
    return _set_base_options(args, DosePredictor(args.weights, device=args.device))


def _set_base_options(args, predictor):
    predictor.calibrated = not args.no_calibration
    if args.mirror_average is not None:
        predictor.mirror_average = args.mirror_average
    if args.mirror_neutral is not None:
        predictor.mirror_neutral = args.mirror_neutral
    return predictor


def _what_ran(args, predictor) -> str:
    predictor = getattr(predictor, "base", predictor)
    text = "no calibration" if args.no_calibration or predictor.calibration is None else "calibrated"
    if predictor.network_mode != "plain":
        text += {"mirror_average": ", mirror-averaged", "mirror_neutral": ", mirror-averaged at neutral"}[
            predictor.network_mode]
    return text


def _warn_about(case, predictor) -> None:
    from doseai.predict import model_oars

    base = getattr(predictor, "base", predictor)  # a diffusion model's base reads the anatomy
    missing = case.missing(model_oars(base.card))
    if missing:
        print(f"note: structures not in the case (empty model channels): {', '.join(missing)}", file=sys.stderr)
    for note in predictor.case_warnings:
        print(f"warning: {note}", file=sys.stderr)
    scale = base.timings.get("plan_level_scale", 1.0)
    if scale != 1.0:
        print(f"note: the network's plan level lay outside the training plans' range; dose scaled by {scale:.3f} "
              "(model card: calibration.plan_level_range)", file=sys.stderr)


def run(args) -> int:
    out = _check_outputs(args)
    curves = None
    if args.desired_dvh:
        from doseai.report import read_dvh_csv

        curves = read_dvh_csv(args.desired_dvh)
    case = load_case_of(args)
    case.require_target()  # before the model loads
    case = on_dose_grid(case, args.dose_grid)
    predictor = _predictor(args)
    values = condition_values(args, predictor.conditions)
    start = time.perf_counter()
    samples = None
    if args.model == "diffusion":
        predictor.set_case(case)
        samples = predictor.sample(args.samples, args.seed, sliders=values)
        dose = samples.mean
        what = f"mean of {args.samples} samples, seed {args.seed}"
    else:
        dose = predictor.predict_case(case, sliders=values)
        what = "one dose"
    print(f"predicted {case.patient_id} on {predictor.device} in {time.perf_counter() - start:.2f} s "
          f"({what}; {predictor.conditions.describe(values)}, {_what_ran(args, predictor)})")
    _warn_about(case, predictor)
    if curves is not None:
        return _predict_from_dvh(args, case, dose, out, curves)
    write_dose(dose, case, out, args.force)
    print(f"wrote {out}")
    if samples is not None and args.spread:
        from doseai.io import images
        from doseai.models.features import body_mask

        spread = samples.spread
        images.write_image(spread, case.geometry, Path(args.spread), force=args.force)
        print(f"wrote {args.spread} (5-95 % band width: median {float(np.median(spread[body_mask(case) > 0])):.1f} "
              f"Gy in the body, max {float(spread.max()):.1f} Gy)")
    if args.report:
        report(case, dose, Path(args.report), reference=case.dose, force=args.force,
               bands=samples.structure_bands(case) if samples is not None else None)
    return 0


def _predict_from_dvh(args, case, slider_dose, out: Path, curves: dict) -> int:
    """``predict --desired-dvh``: the DVH-conditioned model, from the edited curves (the slider prediction's
    DVH for the structures the file leaves out)."""
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
    write_dose(dose, case, out, args.force)
    print(f"wrote {out}")
    if args.report:
        from doseai.report import case_dvhs, plot_dvhs

        report(case, dose, Path(args.report), force=args.force)
        plot_dvhs(case_dvhs(case, dose), Path(args.report) / "dvh_vs_desired.png",
                  reference=predictor.as_dvhs(desired, edited), title=f"{case.patient_id}: predicted DVH",
                  reference_label="desired", force=args.force)
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
