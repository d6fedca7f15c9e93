"""``doseai dvh``, ``doseai evaluate`` (OpenKBP scores) and ``doseai convert``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from doseai.cli.common import REPORT_FILES, add_case, add_force, load_case_of, report
from doseai.errors import MissingStructureError, UnreadableInputError
from doseai.output_paths import check_output_file, check_output_folder

def add_parsers(sub) -> None:
    """``dvh``, ``evaluate`` and ``convert``."""
    from doseai.io import case_format_names

    dvh = sub.add_parser("dvh", help="DVH metrics table, DVH CSV and plot of a dose on a case")
    add_case(dvh)
    dvh.add_argument("--dose", help="dose file (NRRD/NIfTI/MHA, RTDOSE .dcm, OpenKBP .npz/.csv); "
                                    "default: the case's own dose")
    dvh.add_argument("--reference", help="a reference dose drawn dashed in the plot")
    dvh.add_argument("--out", help="folder for dvh.csv, metrics.csv and dvh.png")
    dvh.add_argument("--skip-empty", action="store_true", help="leave out empty structures instead of failing")
    add_force(dvh)

    evaluate = sub.add_parser("evaluate", help="OpenKBP dose score and DVH score of predictions")
    evaluate.add_argument("--reference", required=True, help="OpenKBP split folder (pt_N.npz or CSV patient folders)")
    evaluate.add_argument("--predictions", required=True,
                          help="folder with pt_N.npz (dose_gy/dose_cgy), pt_N.csv (challenge format) or pt_N.nrrd")
    evaluate.add_argument("--json", help="write the scores and tables as JSON")
    add_force(evaluate)

    convert = sub.add_parser("convert", help="convert a case between formats")
    add_case(convert)
    convert.add_argument("--to", required=True, choices=case_format_names())
    convert.add_argument("--out", required=True)
    convert.add_argument("--dose", help="attach this dose to the case before writing")
    add_force(convert)


def run_dvh(args) -> int:
    from doseai.io import load_dose

    if args.out:
        check_output_folder(args.out, REPORT_FILES, args.force, "--out")
    case = load_case_of(args)
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
    report(case, dose, Path(args.out) if args.out else None, reference=reference, force=args.force)
    return 0


def _find_prediction(folder: Path, patient_id: str) -> Path | None:
    """``<folder>/<patient_id>`` with a dose ending of a case format (doseai.io.FORMATS, in their order)."""
    from doseai.io import FORMATS

    for suffix in (suffix for fmt in FORMATS for suffix in fmt.dose_suffixes):
        if (folder / f"{patient_id}{suffix}").is_file():
            return folder / f"{patient_id}{suffix}"
    return None


def run_evaluate(args) -> int:
    from tqdm import tqdm

    from doseai.io import load_dose, openkbp
    from doseai.scoring import Evaluation, score_patient

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
    print(format_evaluation(evaluation))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(evaluation.to_dict(), indent=2))
        print(f"wrote {args.json}")
    return 0


def format_evaluation(evaluation) -> str:
    """Per structure and metric the MAE and bias, then the two OpenKBP scores."""
    lines = [f"{'structure':<12}{'metric':>10}{'MAE [Gy]':>10}{'bias [Gy]':>11}{'n':>5}"]
    for (structure, metric), row in evaluation.per_structure().items():
        lines.append(f"{structure:<12}{metric:>10}{row['mae']:>10.2f}{row['bias']:>11.2f}{row['n']:>5}")
    lines.append(f"patients: {len(evaluation.patients)}   dose score: {evaluation.dose_score:.3f} Gy   "
                 f"DVH score: {evaluation.dvh_score:.3f} Gy")
    return "\n".join(lines)


def run_convert(args) -> int:
    from doseai.io import load_dose, save_case

    check_output_folder(Path(args.out).parent if args.to == "openkbp-npz" else args.out, (), args.force, "--out")
    case = load_case_of(args)
    if args.dose:
        case = case.with_dose(load_dose(args.dose, case))
    path = save_case(case, args.out, args.to, force=args.force)
    print(f"wrote {case.patient_id} as {args.to} to {path}")
    return 0
