"""What the subcommands share: argument types and groups, reading the case, the DVH report, writing a dose."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from doseai.errors import DoseAIError, UnreadableInputError, refuse_overwrite
from doseai.predict import DEFAULT_DIFFUSION_MODEL, DEFAULT_DVH_MODEL, DEFAULT_MODEL

# the training commands' defaults: the shipped weights, relative to the repository root they run from
SHIPPED_PREFERENCE = str(Path("Resources") / "Models" / DEFAULT_MODEL.name)
SHIPPED_DVH = str(Path("Resources") / "Models" / DEFAULT_DVH_MODEL.name)
SHIPPED_DIFFUSION = str(Path("Resources") / "Models" / DEFAULT_DIFFUSION_MODEL.name)

CASE_HELP = ("the patient: an OpenKBP pt_N.npz or CSV patient folder, a folder with ct.nrrd (.nii.gz, .mha) and "
             "structures.seg.nrrd (or a structures labelmap + case.json), or a DICOM folder with a CT series and "
             "an RTSTRUCT")
REPORT_FILES = ("dvh.csv", "metrics.csv", "dvh.png")


def add_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")


def device_type(text: str) -> str:
    """argparse type of --device: auto, cpu, cuda or cuda:N."""
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"'{text}' is not one of auto, cpu, cuda, cuda:N")


def add_device(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument("--device", type=device_type, default=default, metavar="{auto,cpu,cuda,cuda:N}",
                        help="where the network runs (default: %(default)s: CUDA when available)")


def _pair(text: str, kind: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"'{text}': expected {kind}")
    return name.strip(), value.strip()


def name_map_type(text: str) -> tuple[str, str | None]:
    """argparse type of --map: 'RAW=CANONICAL' (or 'RAW=' to leave the structure out)."""
    raw, name = _pair(text, "ROI=NAME, e.g. 'High risk PTV=PTV_70' (or 'ROI=' to leave it out)")
    return raw, name or None


def prescription_type(text: str) -> tuple[str, float]:
    """argparse type of --prescription: 'NAME=GY' with a positive, finite dose."""
    name, value = _pair(text, "NAME=GY, e.g. PTV_70=70")
    try:
        gy = float(value)
    except ValueError:
        gy = float("nan")
    if not (0 < gy < 1000):
        raise argparse.ArgumentTypeError(f"'{text}': the prescription must be a positive dose in Gy")
    return name, gy


def dose_grid_type(text: str) -> float | None:
    """argparse type of --dose-grid (doseai.dose_grid.parse_dose_grid)."""
    from doseai.dose_grid import parse_dose_grid

    try:
        return parse_dose_grid(text)
    except DoseAIError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_case(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--case", required=True, help=CASE_HELP)
    parser.add_argument("--map", type=name_map_type, action="append", default=[], metavar="ROI=NAME",
                        help="read structure ROI as NAME (e.g. --map 'High risk PTV=PTV_70', --map 'Lt Parot=Parotid_L'"
                             "; 'ROI=' leaves it out); repeatable. Unmapped names are matched automatically")
    parser.add_argument("--prescription", type=prescription_type, action="append", default=[], metavar="NAME=GY",
                        help="the prescription of target NAME (after --map), when its name holds none; repeatable")


def add_conditions(parser: argparse.ArgumentParser, conditions) -> None:
    """One option per condition of the model (``--oar-sparing``), from its card (doseai.conditions)."""
    for condition in conditions:
        parser.add_argument(condition.option, type=float, default=condition.neutral, dest=f"slider_{condition.name}", metavar="W",
                            help=f"{condition.label} slider in [{condition.low:g}, {condition.high:g}] "
                                 f"({condition.neutral:g} = typical)")


def condition_values(args, conditions) -> dict[str, float]:
    """The condition options of ``args`` (see :func:`add_conditions`); DoseAIError names the option out of range."""
    values = {}
    for condition in conditions:
        value = getattr(args, f"slider_{condition.name}")
        try:
            values[condition.name] = condition.checked(value)
        except DoseAIError:
            raise DoseAIError(f"{condition.option} must be within [{condition.low:g}, {condition.high:g}], "
                              f"got {value:g}") from None
    return values


def conditions_of(weights: str | Path | None):
    """The conditions of the preference model at ``weights`` (default: the shipped one), read from its card; the
    shipped model's when that card cannot be read (loading the model then says why)."""
    from doseai.conditions import ConditionSpace
    from doseai.predict import load_card

    for path in ([Path(weights)] if weights else []) + [DEFAULT_MODEL]:
        try:
            return ConditionSpace.from_card(load_card(path))
        except DoseAIError:
            continue
    raise UnreadableInputError(f"{DEFAULT_MODEL.with_suffix('.json')}: the shipped model card has no sliders")


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("doseai")
    except PackageNotFoundError:  # run from a folder (e.g. the installed Slicer extension), not pip-installed
        return "(not pip-installed)"


def load_case_of(args):
    """The case of ``--case``, with the --map overrides and --prescription doses."""
    from doseai.io import load_case

    return load_case(args.case, overrides=dict(args.map) or None, prescriptions=dict(args.prescription) or None)


def case_and_desired_dose(args):
    """The case and the dose to plan toward: ``--dose``, else the case's own."""
    from doseai.io import load_dose

    case = load_case_of(args)
    if args.dose:
        return case, load_dose(args.dose, case)
    if case.dose is None:
        raise UnreadableInputError(f"{args.case} holds no dose; pass --dose")
    return case, case.dose


def on_dose_grid(case, spacing_mm: float | None):
    """``case`` on its dose grid (doseai.dose_grid), said in one line when that is not the CT's grid."""
    from doseai.dose_grid import on_dose_grid as binned_case

    binned = binned_case(case, spacing_mm)
    if binned is not case:
        g = binned.geometry
        print(f"dose grid: {' x '.join(map(str, g.shape[::-1]))} voxels of {' x '.join(f'{v:.3g}' for v in g.spacing)}"
              f" mm over the body (the CT: {' x '.join(map(str, case.geometry.shape[::-1]))} of "
              f"{' x '.join(f'{v:.3g}' for v in case.geometry.spacing)} mm; --dose-grid ct keeps the CT's grid)")
    return binned


def report(case, dose, out: Path | None, reference=None, force: bool = False, bands=None) -> None:
    """Print the metrics table; with ``out``, write dvh.csv, metrics.csv and dvh.png there (checked first);
    ``bands`` (doseai.report.dvh_bands of sampled doses) are drawn shaded in the plot."""
    from doseai.report import case_dvhs, case_metrics, format_metrics_table, plot_dvhs, write_dvh_csv, write_metrics_csv

    metrics = case_metrics(case, dose)
    print(format_metrics_table(metrics))
    if out is None:
        return
    for name in REPORT_FILES:
        refuse_overwrite(out / name, force)  # all three checked before any is written
    dvhs = case_dvhs(case, dose)
    write_dvh_csv(dvhs, out / "dvh.csv", force=force)
    write_metrics_csv(metrics, out / "metrics.csv", force=force)
    reference_dvhs = case_dvhs(case, reference) if reference is not None else None
    plot_dvhs(dvhs, out / "dvh.png", reference=reference_dvhs, title=f"DVH of {case.patient_id}", force=force,
              bands=bands)
    print(f"wrote {out / 'dvh.csv'}, {out / 'metrics.csv'} and {out / 'dvh.png'}")


def write_dose(dose, case, out: Path, force: bool) -> None:
    """The dose as RTDOSE (``.dcm``, with its RTPLAN) or as an image file."""
    from doseai.io import images

    if out.suffix.lower() == ".dcm":
        from doseai.io.dicom import write_rtdose
        from doseai.io.dicom import PlanDescription

        write_rtdose(dose, case.geometry, out, reference_meta=case.metadata or None, force=force,
                     plan=PlanDescription(prescriptions=dict(case.prescriptions)))
    else:
        images.write_image(dose, case.geometry, out, force=force)


def note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)
