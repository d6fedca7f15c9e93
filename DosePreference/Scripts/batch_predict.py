"""Batch dose prediction over a folder of DICOM studies (one subfolder per patient).

In Slicer::

    Slicer --no-main-window --python-script batch_predict.py --input DICOM_ROOT --output OUT \\
        [--oar-sparing W --homogeneity H (the sliders of the model's card)] [--dose-grid MM|ct] [--weights MODEL.pt] [--device auto|cpu|cuda]
        [--force] [--shard K/N]
    Slicer --no-main-window --python-script batch_predict.py --merge --output OUT [--force]

or with plain Python where ``doseai`` and torch are installed (``python batch_predict.py ...``).

Each patient folder must hold a CT series and an RTSTRUCT with at least one target named with its
prescription (e.g. PTV_70). For each patient ``OUT/<folder name>/`` gets ``RD.dcm`` (RTDOSE in the CT's
study and frame of reference, on its own dose grid: the CT's voxels binned to about 2.5 mm over the body, see
``doseai.dose_grid``; ``--dose-grid ct`` keeps the CT's grid), ``dvh.csv``, ``metrics.csv`` and ``dvh.png``. A patient that fails is
reported and skipped, the others are still done. ``OUT/summary.csv`` lists every patient (patient,
status, error, ptv, ptv_d95_gy, mean_oar_dose_gy, seconds), and the table is printed; for a patient that
is done, the error column warns of an OAR far outside the training cases' volumes (another structure under
its name, most likely).

Across machines or a scheduler's array job: ``--shard K/N`` (0-based K, N >= 1) takes only the patient folders
at sorted positions K, K+N, K+2N, ... and writes ``OUT/summary.shard-K-of-N.csv`` instead of ``summary.csv``,
so N shards can share one output folder. Once all have finished, ``--merge --output OUT`` joins their
summaries into ``OUT/summary.csv`` in patient order (the same file as one run without --shard) and prints the
table; it refuses when a shard's summary is missing or the shards disagree on N. The shard summaries stay. In
SLURM: ``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``, then the merge as a job that depends on the array.

Exit code: 0 all patients done, 1 some failed, 2 nothing could run (bad arguments, no model, an
existing summary without --force). A shard counts only its own patients (none at its positions: 0); the
merge gives 0 when every patient of every shard is done, 1 when some failed, 2 when it cannot merge.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePath

SUMMARY_COLUMNS = ("patient", "status", "error", "ptv", "ptv_d95_gy", "mean_oar_dose_gy", "seconds")
PATIENT_FILES = ("RD.dcm", "RP.dcm", "dvh.csv", "metrics.csv", "dvh.png")  # RP: the dose's RTPLAN
STATUSES = ("done", "failed")
# no leading zeros: one shard has one file name, so two files cannot claim the same shard
_SHARD_SUMMARY = re.compile(r"summary\.shard-(0|[1-9][0-9]*)-of-(0|[1-9][0-9]*)\.csv")


def _make_doseai_importable() -> None:
    """``doseai`` sits next to the module files in an installed extension (one folder up from this
    script) and at the repository root in a checkout (two folders up)."""
    here = Path(__file__).resolve().parent
    for root in (here.parent, here.parent.parent):
        if (root / "doseai" / "__init__.py").is_file() and str(root) not in sys.path:
            sys.path.insert(0, str(root))
            return


@dataclass
class PatientResult:
    patient: str
    status: str  # "done" or "failed"
    error: str = ""
    ptv: str = ""
    ptv_d95_gy: float | None = None
    mean_oar_dose_gy: float | None = None
    seconds: float = 0.0

    def row(self) -> list[str]:
        number = lambda value: "" if value is None else f"{value:.2f}"  # noqa: E731
        return [self.patient, self.status, self.error, self.ptv, number(self.ptv_d95_gy),
                number(self.mean_oar_dose_gy), f"{self.seconds:.1f}"]

    @classmethod
    def from_row(cls, row: list[str]) -> PatientResult:
        """The inverse of :meth:`row` (a line of a summary); ValueError says what is wrong with the line."""
        if len(row) != len(SUMMARY_COLUMNS):
            raise ValueError(f"{len(row)} fields where {len(SUMMARY_COLUMNS)} were expected")
        patient, status, error, ptv, d95, mean_oar, seconds = row
        if status not in STATUSES:
            raise ValueError(f"{patient}: status {status!r} is neither {' nor '.join(STATUSES)}")
        number = lambda text: float(text) if text else None  # noqa: E731
        return cls(patient, status, error, ptv, number(d95), number(mean_oar), float(seconds))


def patient_folders(root: Path) -> list[Path]:
    """The patient subfolders of ``root`` (hidden ones skipped), sorted by name."""
    return sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))


def check_shard(index: int, count: int) -> tuple[int, int]:
    """(K, N) when it names a shard (N >= 1, 0 <= K < N); DoseAIError otherwise."""
    from doseai.errors import DoseAIError

    if count < 1:
        raise DoseAIError(f"--shard {index}/{count}: N, the number of shards, must be at least 1")
    if not 0 <= index < count:
        raise DoseAIError(f"--shard {index}/{count}: K must be within 0..{count - 1} (0-based, like "
                          "$SLURM_ARRAY_TASK_ID)")
    return index, count


def parse_shard(text: str) -> tuple[int, int]:
    """``--shard K/N`` as (K, N); DoseAIError when it is not two whole numbers naming a shard."""
    from doseai.errors import DoseAIError

    match = re.fullmatch(r"\s*(-?[0-9]+)\s*/\s*(-?[0-9]+)\s*", text)
    if match is None:
        raise DoseAIError(f"--shard {text!r}: give K/N, two whole numbers (e.g. 0/4: the first of 4 shards)")
    return check_shard(int(match.group(1)), int(match.group(2)))


def shard_summary_name(index: int, count: int) -> str:
    """The summary file of shard ``index`` of ``count``: its own, so shards sharing an output folder never collide."""
    return f"summary.shard-{index}-of-{count}.csv"


def summary_values(case, metrics: dict) -> tuple[str, float | None, float | None]:
    """(the highest-prescription PTV, its D95, the mean of the OARs' mean doses) of a predicted case."""
    ptv = case.targets[0]
    oar_means = [metrics[name]["Dmean"] for name in case.oars if name in metrics]
    mean_oar = sum(oar_means) / len(oar_means) if oar_means else None
    return ptv, metrics[ptv]["D95"], mean_oar


def predict_patient(folder: Path, out: Path, predictor, sliders: dict[str, float] | None = None,
                    force: bool = False, dose_grid_mm: float | None = 2.5) -> PatientResult:
    """Read the DICOM study in ``folder``, predict, and write the RTDOSE and DVH report into ``out``.
    Any error (unreadable DICOM, no target, existing output, ...) becomes a failed result, not an
    exception, so that one bad study does not stop the batch. A clinical RTDOSE in the study is drawn
    dashed in ``dvh.png`` for comparison. ``sliders``: the model's slider values by name (default: neutral)."""
    with warnings.catch_warnings(record=True) as caught:  # e.g. "no RTSTRUCT": the cause of a failure
        warnings.simplefilter("always")
        result = _predict_patient(folder, out, predictor, predictor.conditions.values(sliders), force,
                                  dose_grid_mm)
    if result.status != "done" and caught:
        result.error += " (" + "; ".join(" ".join(str(w.message).split()) for w in caught) + ")"
    return result


def _predict_patient(folder: Path, out: Path, predictor, sliders: dict[str, float], force: bool,
                     dose_grid_mm: float | None) -> PatientResult:
    from doseai.dose_grid import on_dose_grid
    from doseai.errors import DoseAIError, OutputExistsError
    from doseai.io import load_case
    from doseai.io.dicom import write_rtdose
    from doseai.io.rtplan import PlanDescription
    from doseai.report import case_dvhs, case_metrics, plot_dvhs, write_dvh_csv, write_metrics_csv

    start = time.perf_counter()
    try:
        existing = [name for name in PATIENT_FILES if (out / name).exists()]
        if existing and not force:
            raise OutputExistsError(f"{out} already holds {', '.join(existing)}; pass --force to overwrite")
        case = on_dose_grid(load_case(folder, fmt="dicom"), dose_grid_mm)  # DICOM studies only, as documented
        predictor.set_case(case)  # refuses a case without a target with a prescription
        dose = predictor.predict(sliders=sliders)
        metrics = case_metrics(case, dose)
        dvhs = case_dvhs(case, dose)
        description = f"DoseAI {predictor.card['name']} {predictor.conditions.describe_short(sliders)}"[:64]
        write_rtdose(dose, case.geometry, out / "RD.dcm", {**case.metadata, "DoseDescription": description},
                     force=force, plan=PlanDescription(prescriptions=dict(case.prescriptions)))
        write_dvh_csv(dvhs, out / "dvh.csv", force=force)
        write_metrics_csv(metrics, out / "metrics.csv", force=force)
        reference = case_dvhs(case, case.dose) if case.dose is not None else None
        plot_dvhs(dvhs, out / "dvh.png", reference=reference, title=f"{folder.name}: predicted dose", force=force)
        ptv, d95, mean_oar = summary_values(case, metrics)
        note = "; ".join(f"warning: {text}" for text in predictor.case_warnings)  # structures unlike training
        return PatientResult(folder.name, "done", note, ptv, d95, mean_oar, time.perf_counter() - start)
    except Exception as error:  # noqa: BLE001 - reported per patient; the batch goes on
        message = " ".join(str(error).split())
        if not isinstance(error, DoseAIError):  # not a known user error: say what kind of failure
            message = f"{type(error).__name__}: {message}"
        return PatientResult(folder.name, "failed", message, seconds=time.perf_counter() - start)


def format_summary(results: list[PatientResult]) -> str:
    """The summary as a text table; the error column goes last so that long messages do not push the numbers."""
    order = [i for i, name in enumerate(SUMMARY_COLUMNS) if name != "error"] + [SUMMARY_COLUMNS.index("error")]
    rows = [[row[i] for i in order] for row in [list(SUMMARY_COLUMNS)] + [result.row() for result in results]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(order))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def write_summary(results: list[PatientResult], path: Path) -> None:
    """``results`` as a summary CSV at ``path`` (the caller has checked that it may be overwritten)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(SUMMARY_COLUMNS)
        writer.writerows(result.row() for result in results)


def read_summary(path: Path) -> list[PatientResult]:
    """The results of a summary CSV written by :func:`write_summary`; UnreadableInputError when it is not one."""
    from doseai.errors import UnreadableInputError

    try:
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UnreadableInputError(f"{path}: cannot be read ({error})") from None
    if not rows or rows[0] != list(SUMMARY_COLUMNS):
        raise UnreadableInputError(f"{path}: not a batch summary (its header is not {','.join(SUMMARY_COLUMNS)})")
    results = []
    for line, row in enumerate(rows[1:], start=2):
        try:
            results.append(PatientResult.from_row(row))
        except ValueError as error:
            raise UnreadableInputError(f"{path}, line {line}: {error}") from None
    return results


def _log(text: str) -> None:
    print(text, flush=True)  # flushed: Slicer's console and CI logs show progress as it happens


def run_batch(input_root: Path, output_root: Path, sliders: dict[str, float] | None = None,
              weights: str | None = None, device: str = "auto", force: bool = False, log=_log,
              dose_grid_mm: float | None = 2.5, shard: tuple[int, int] | None = None) -> list[PatientResult]:
    """Predict every patient folder of ``input_root`` into ``output_root``; returns one result per
    patient and writes ``output_root/summary.csv``. ``sliders``: the model's slider values by name (checked
    before any patient; default: neutral). ``shard`` (K, N): only the folders at sorted positions K, K+N, ...,
    summarised in ``output_root/summary.shard-K-of-N.csv`` (see :func:`merge_summaries`). Raises DoseAIError
    when nothing can run."""
    from doseai.errors import UnreadableInputError, refuse_overwrite
    from doseai.predict import DosePredictor

    input_root, output_root = Path(input_root), Path(output_root)
    if not input_root.is_dir():
        raise UnreadableInputError(f"{input_root}: not a folder")
    folders = patient_folders(input_root)
    if not folders:
        raise UnreadableInputError(f"{input_root}: no patient subfolders (one folder per DICOM study is expected)")
    summary_path = output_root / "summary.csv"
    scope = f"{len(folders)} patient folder(s)"
    if shard is not None:
        index, count = check_shard(*shard)
        summary_path = output_root / shard_summary_name(index, count)
        mine = folders[index::count]  # may be none (more shards than patients): an empty summary, for the merge
        scope, folders = f"shard {index}/{count}: {len(mine)} of {scope}", mine
    refuse_overwrite(summary_path, force)
    predictor = DosePredictor(weights, device=device)  # loaded once for every patient
    sliders = predictor.conditions.values(sliders)
    log(f"{scope}, model {predictor.card['name']} on {predictor.device}, {predictor.conditions.describe(sliders)}")
    results = []
    for folder in folders:
        result = predict_patient(folder, output_root / folder.name, predictor, sliders, force, dose_grid_mm)
        log(f"{folder.name}: {result.status}" + (f" ({result.error})" if result.error else f" in {result.seconds:.1f} s"))
        results.append(result)
    output_root.mkdir(parents=True, exist_ok=True)
    write_summary(results, summary_path)
    log(format_summary(results))
    log(f"wrote {summary_path}")
    return results


def find_shard_summaries(output_root: Path) -> list[Path]:
    """The summaries of shards 0..N-1 in ``output_root``, in shard order; UnreadableInputError when there are
    none, one is missing, or they disagree on N (stale summaries of an earlier split, most likely)."""
    from doseai.errors import UnreadableInputError

    found: dict[int, dict[int, Path]] = {}  # N -> K -> summary
    for path in sorted(output_root.glob("summary.shard-*.csv")):
        match = _SHARD_SUMMARY.fullmatch(path.name)
        if match is None:
            raise UnreadableInputError(f"{path}: not a shard summary name (summary.shard-K-of-N.csv); move it away")
        index, count = int(match.group(1)), int(match.group(2))
        if not index < count:
            raise UnreadableInputError(f"{path}: shard {index} of {count} cannot exist (K must be below N)")
        found.setdefault(count, {})[index] = path
    if not found:
        raise UnreadableInputError(f"{output_root}: no shard summaries (summary.shard-K-of-N.csv); run "
                                   "batch_predict.py --shard K/N first")
    if len(found) > 1:
        claims = ", ".join(f"{next(iter(shards.values())).name} says N={count}"
                           for count, shards in sorted(found.items()))
        raise UnreadableInputError(f"the shard summaries in {output_root} disagree on N: {claims}; "
                                   "remove those of the other split")
    count, shards = next(iter(found.items()))
    missing = [index for index in range(count) if index not in shards]
    if missing:
        names = ", ".join(shard_summary_name(index, count) for index in missing)
        raise UnreadableInputError(f"{output_root}: {len(missing)} of {count} shard(s) missing ({names}); "
                                   f"run --shard {missing[0]}/{count} (or wait for it) first")
    return [shards[index] for index in range(count)]


def interleave_shards(shards: list[list[PatientResult]], names: list[str]) -> list[PatientResult]:
    """The results of shards 0..N-1 in the order of one run (shard K holds sorted positions K, K+N, ...).
    UnreadableInputError when they cannot come from one split of one folder (``names``: the shards' summaries)."""
    from doseai.errors import UnreadableInputError

    count, total = len(shards), sum(len(results) for results in shards)
    sizes, expected = [len(results) for results in shards], [len(range(k, total, count)) for k in range(count)]
    if sizes != expected:
        held = ", ".join(f"{name}: {size}" for name, size in zip(names, sizes))
        raise UnreadableInputError(f"the shards do not split one list of {total} patients ({held}; expected "
                                   f"{', '.join(map(str, expected))}); were they all run over the same --input?")
    merged: list[PatientResult] = [None] * total  # type: ignore[list-item] - every slot is filled below
    for index, results in enumerate(shards):
        merged[index::count] = results
    patients = [result.patient for result in merged]
    repeated = sorted(name for name, times in Counter(patients).items() if times > 1)
    if repeated:
        raise UnreadableInputError(f"patient(s) {', '.join(repeated)} in more than one shard summary")
    if patients != sorted(patients, key=PurePath):  # the order of patient_folders
        raise UnreadableInputError("the shards' patients do not interleave in sorted order; were they all run "
                                   "over the same --input?")
    return merged


def merge_summaries(output_root: Path, force: bool = False, log=_log) -> list[PatientResult]:
    """Join the summaries of shards 0..N-1 in ``output_root`` into ``output_root/summary.csv``, in the patient
    order of one run without shards, and log the table; returns the results. The shard summaries are kept.
    Raises DoseAIError when it cannot merge (see :func:`find_shard_summaries`, :func:`interleave_shards`) or
    summary.csv exists and ``force`` is not set."""
    from doseai.errors import UnreadableInputError, refuse_overwrite

    output_root = Path(output_root)
    if not output_root.is_dir():
        raise UnreadableInputError(f"{output_root}: not a folder")
    summary_path = output_root / "summary.csv"
    refuse_overwrite(summary_path, force)
    paths = find_shard_summaries(output_root)
    results = interleave_shards([read_summary(path) for path in paths], [path.name for path in paths])
    write_summary(results, summary_path)
    log(format_summary(results))
    log(f"merged {len(paths)} shard summaries: wrote {summary_path}")
    return results


def _weights_of(argv: list[str] | None) -> str | None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--weights")
    return pre.parse_known_args(argv)[0].weights


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The options; the sliders are those of the model card of ``--weights`` in ``argv`` (default: shipped)."""
    from doseai.cli.common import add_conditions, conditions_of

    parser = argparse.ArgumentParser(prog="batch_predict.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", help="folder with one DICOM study (CT + RTSTRUCT) per subfolder (required "
                                        "unless --merge)")
    parser.add_argument("--output", required=True, help="output folder (one subfolder per patient + summary.csv)")
    add_conditions(parser, conditions_of(_weights_of(argv)))
    parser.add_argument("--dose-grid", default="2.5", metavar="MM|ct",
                        help="the RTDOSE's own grid: the CT's voxels binned to about MM over the body (default: "
                             "%(default)s mm); 'ct': the CT's grid")
    parser.add_argument("--weights", help="model weights (default: the shipped preference model in Resources/Models)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")
    parser.add_argument("--shard", metavar="K/N",
                        help="only the patient folders at sorted positions K, K+N, ... (0-based K), summarised in "
                             "OUT/summary.shard-K-of-N.csv: N machines or array tasks share an archive")
    parser.add_argument("--merge", action="store_true",
                        help="join the shard summaries in --output into summary.csv (takes only --output and --force)")
    return parser


def main(argv: list[str] | None = None) -> int:
    _make_doseai_importable()
    from doseai.cli.common import condition_values, conditions_of
    from doseai.dose_grid import parse_dose_grid
    from doseai.errors import DoseAIError

    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.merge and (args.input is not None or args.shard is not None):
        parser.error("--merge joins the shard summaries already in --output; it takes no --input or --shard")
    if not args.merge and args.input is None:
        parser.error("the following arguments are required: --input")  # argparse's own words, as before --merge
    try:
        if args.merge:
            results = merge_summaries(Path(args.output), args.force)
        else:
            shard = parse_shard(args.shard) if args.shard is not None else None
            sliders = condition_values(args, conditions_of(args.weights))
            results = run_batch(Path(args.input), Path(args.output), sliders, args.weights, args.device, args.force,
                                dose_grid_mm=parse_dose_grid(args.dose_grid), shard=shard)
    except DoseAIError as error:
        print(f"batch_predict: error: {error}", file=sys.stderr)
        return 2
    except ImportError as error:  # torch/MONAI not installed (in Slicer: click Predict in DosePreference once)
        print(f"batch_predict: error: {error}; dose prediction needs torch and monai", file=sys.stderr)
        return 2
    failed = [result.patient for result in results if result.status != "done"]
    if failed:
        print(f"batch_predict: {len(failed)} of {len(results)} patient(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _exit(code: int) -> None:
    """Slicer's Python keeps the application running after a script; it is ended with its exit code."""
    slicer = sys.modules.get("slicer")
    if slicer is not None and getattr(slicer, "app", None) is not None:
        slicer.util.exit(code)
    else:
        sys.exit(code)


if __name__ == "__main__":
    # Slicer passes the arguments after the script name in sys.argv, like python does
    _exit(main(sys.argv[1:]))
