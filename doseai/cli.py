"""The ``doseai`` command line. Errors caused by input are printed as one line with exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from doseai.errors import DoseAIError, MissingStructureError, OutputExistsError, UnreadableInputError


def _add_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="doseai", description="SlicerDoseAI: dose prediction and DVH tools")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job on the built-in sample case: write it as DICOM and NRRD "
                                       "and report its DVH")
    demo.add_argument("--out", default="doseai-demo", help="output folder (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    _add_force(demo)

    sample = sub.add_parser("sample", help="write the synthetic head-and-neck sample case")
    sample.add_argument("--out", required=True)
    sample.add_argument("--format", default="nrrd", choices=["nrrd", "nifti", "mha", "dicom", "openkbp-npz"])
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--no-dose", action="store_true", help="leave out the synthetic dose")
    _add_force(sample)

    dvh = sub.add_parser("dvh", help="DVH metrics table, DVH CSV and plot of a dose on a case")
    dvh.add_argument("--case", required=True, help="case: OpenKBP .npz/CSV folder, NRRD case folder or DICOM folder")
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

    convert = sub.add_parser("convert", help="convert a case between formats")
    convert.add_argument("--case", required=True)
    convert.add_argument("--to", required=True, choices=["nrrd", "nifti", "mha", "dicom", "openkbp-npz", "openkbp-csv"])
    convert.add_argument("--out", required=True)
    convert.add_argument("--dose", help="attach this dose to the case before writing")
    _add_force(convert)
    return parser


def _cmd_demo(args) -> int:
    from doseai.io import save_case
    from doseai.sample import make_sample_case

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise OutputExistsError(f"{out} is not empty; pass --force to overwrite")
    case = make_sample_case(seed=args.seed)
    print(f"sample case {case.patient_id}: grid {case.geometry.shape[::-1]} (x, y, z) voxels of "
          f"{' x '.join(f'{s:g}' for s in case.geometry.spacing)} mm, {len(case.structures)} structures")
    save_case(case, out / "dicom", "dicom", force=args.force)
    save_case(case, out / "nrrd", "nrrd", force=args.force)
    print(f"wrote DICOM CT + RTSTRUCT + RTDOSE to {out / 'dicom'} and NRRD to {out / 'nrrd'}")
    _report(case, case.dose, out / "report", force=args.force)
    print("note: the dose of the sample case is synthetic (a smooth fall-off from each target), not a plan")
    return 0


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
        if (out / name).exists() and not force:
            raise OutputExistsError(f"{out / name} exists; pass --force to overwrite")
    dvhs = case_dvhs(case, dose)
    write_dvh_csv(dvhs, out / "dvh.csv", force=force)
    write_metrics_csv(metrics, out / "metrics.csv", force=force)
    reference_dvhs = case_dvhs(case, reference) if reference is not None else None
    plot_dvhs(dvhs, out / "dvh.png", reference=reference_dvhs, title=f"DVH of {case.patient_id}", force=force)
    print(f"wrote {out / 'dvh.csv'}, {out / 'metrics.csv'} and {out / 'dvh.png'}")


def _cmd_dvh(args) -> int:
    from doseai.io import load_case, load_dose

    case = load_case(args.case)
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

    if args.json and Path(args.json).exists() and not args.force:
        raise OutputExistsError(f"{args.json} exists; pass --force to overwrite")
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
    from doseai.io import load_case, load_dose, save_case

    case = load_case(args.case)
    if args.dose:
        case = case.with_dose(load_dose(args.dose, case))
    path = save_case(case, args.out, args.to, force=args.force)
    print(f"wrote {case.patient_id} as {args.to} to {path}")
    return 0


COMMANDS = {"demo": _cmd_demo, "sample": _cmd_sample, "dvh": _cmd_dvh, "evaluate": _cmd_evaluate,
            "convert": _cmd_convert}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except DoseAIError as error:
        print(f"doseai {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError) as error:
        print(f"doseai {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
