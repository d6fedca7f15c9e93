"""The ``doseai`` command line: one module per group of subcommands. Errors caused by input are printed as one
line with exit code 2.

The slider options of ``predict`` and ``demo`` come from the model card (doseai.conditions): ``predict`` reads
the card of the model its ``--weights`` names, so a model with other sliders gets its own options."""

from __future__ import annotations

import argparse
import sys

from doseai.cli import demo, evaluate, plan, predict, train
from doseai.cli.common import conditions_of, load_case_of, version
from doseai.cli.demo import demo_dvh_edit
from doseai.cli.predict import format_edit  # noqa: F401 (re-exported)
from doseai.errors import DoseAIError

COMMANDS = {"predict": predict.run, "train": train.run, "demo": demo.run_demo, "sample": demo.run_sample,
            "dvh": evaluate.run_dvh, "evaluate": evaluate.run_evaluate, "convert": evaluate.run_convert,
            "optimize": plan.run_optimize, "objectives": plan.run_objectives}

# the names the tests and older scripts import
_demo_dvh_edit, _load_case = demo_dvh_edit, load_case_of


def _weights_of(argv: list[str] | None) -> str | None:
    """The preference model whose card decides the slider options of a ``predict`` command line: its
    ``--weights``, else with ``--model diffusion`` the base model of the diffusion card; else None."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "predict":
        return None
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--weights")
    pre.add_argument("--model")
    pre.add_argument("--diffusion-weights")
    known = pre.parse_known_args(argv[1:])[0]
    if known.weights or known.model != "diffusion":
        return known.weights
    from doseai.diffusion_predict import base_model_of
    from doseai.predict import DEFAULT_DIFFUSION_MODEL

    try:
        return str(base_model_of(known.diffusion_weights or DEFAULT_DIFFUSION_MODEL))
    except DoseAIError:
        return None  # the shipped sliders; loading the model then says what is wrong


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv`` (its ``--weights`` picks the model whose sliders ``predict`` takes)."""
    parser = argparse.ArgumentParser(prog="doseai", description="SlicerDoseAI: dose prediction and DVH tools. Bad "
                                     "input stops with a one-line error and exit code 2; nothing is overwritten "
                                     "without --force.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    shipped = conditions_of(None)
    demo.add_parsers(sub, shipped)
    evaluate.add_parsers(sub)
    weights = _weights_of(argv)
    predict.add_parser(sub, conditions_of(weights) if weights else shipped)
    train.add_parser(sub)
    plan.add_parsers(sub)
    return parser


def _one_line_warnings(command: str):
    """Print the warnings of the readers and models as one line each (not Python's file:line and source)."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"doseai {command}: warning: {message}", file=sys.stderr)
    return show


def main(argv: list[str] | None = None) -> int:
    import warnings

    args = build_parser(argv).parse_args(argv)
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
