"""``doseai optimize`` (a plan toward a dose) and ``doseai objectives`` (DVH objectives for a TPS)."""

from __future__ import annotations

import sys
from pathlib import Path

from doseai.cli.common import add_case, add_force, case_and_desired_dose, report
from doseai.engine.registry import DEFAULT_ENGINE, engine_names
from doseai.errors import DoseAIError
from doseai.output_paths import check_output_folder


def add_parsers(sub) -> None:
    """``optimize`` and ``objectives``."""
    optimize = sub.add_parser("optimize", help="optimize beam fluences toward a desired (e.g. predicted) dose: "
                                               "plan dose, fluence maps, TPS objectives and a DVH comparison")
    add_case(optimize)
    optimize.add_argument("--dose", help="the desired dose (default: the case's own dose)")
    optimize.add_argument("--out", required=True, help="output folder")
    optimize.add_argument("--mode", default="mimic", choices=["mimic", "objectives"],
                          help="voxel-wise dose mimicking, or the DVH objectives derived from the dose")
    optimize.add_argument("--engine", default=DEFAULT_ENGINE, choices=engine_names(),
                          help="dose engine (default: %(default)s)")
    optimize.add_argument("--beams", type=int, default=9, help="equispaced coplanar beams (default: %(default)s)")
    optimize.add_argument("--bixel-mm", type=float, default=5.0, help="bixel width (default: %(default)s mm)")
    optimize.add_argument("--lateral-cutoff-mm", type=float, default=50.0,
                          help="pyRadPlan's lateral cut-off around each bixel (default: %(default)s mm)")
    optimize.add_argument("--smoothness", type=float, default=0.0, help="fluence smoothness weight")
    optimize.add_argument("--optimizer", default="lbfgsb", choices=["lbfgsb", "adam", "learned"],
                          help="L-BFGS-B (the default), projected Adam, or the learned LSTM optimizer (its trained "
                               "number of steps from the uniform start; it does not yet reach L-BFGS-B's objective, "
                               "see Docs/DoseToPlan.md)")
    optimize.add_argument("--start", default="uniform", choices=["uniform", "generator"],
                          help="where the optimizer starts: the uniform weights (the default) or the fluence "
                               "generator's (one network evaluation; --mode mimic; it does not yet beat the uniform "
                               "start, see Docs/DoseToPlan.md)")
    optimize.add_argument("--max-iterations", type=int,
                          help="iterations (default: 300; for --optimizer learned the steps it was trained for)")
    add_force(optimize)

    objectives = sub.add_parser("objectives", help="DVH objectives derived from a dose, as JSON and CSV for a TPS")
    add_case(objectives)
    objectives.add_argument("--dose", help="the desired dose (default: the case's own dose)")
    objectives.add_argument("--out", default=".", help="folder for objectives.json and objectives.csv")
    add_force(objectives)


def run_optimize(args) -> int:
    from doseai.optimize.outputs import PLAN_FILES, write_plan
    from doseai.optimize.plan import PlanSettings, default_iterations, plan_from_dose

    out = check_output_folder(args.out, PLAN_FILES, args.force, "--out")  # before the minutes of work
    case, desired = case_and_desired_dose(args)
    iterations = args.max_iterations if args.max_iterations is not None else default_iterations(args.optimizer)
    try:
        settings = PlanSettings(mode=args.mode, engine=args.engine, n_beams=args.beams, bixel_width_mm=args.bixel_mm,
                                lateral_cutoff_mm=args.lateral_cutoff_mm, smoothness=args.smoothness,
                                max_iterations=iterations, solver=args.optimizer, start=args.start)
    except ValueError as error:  # a combination of options the planner refuses
        raise DoseAIError(str(error)) from None
    print(f"{case.patient_id}: {args.beams} beams, {args.bixel_mm:g} mm bixels, engine {args.engine}, "
          f"mode {args.mode}, optimizer {args.optimizer}, start {args.start}", file=sys.stderr)
    plan = plan_from_dose(case, desired, settings)
    write_plan(plan, case, desired, out, force=args.force)
    print(plan.summary())
    report(case, plan.dose, None)
    print(f"wrote {', '.join(PLAN_FILES)} to {out}")
    return 0


def run_objectives(args) -> int:
    from doseai.optimize.from_dose import objectives_from_case
    from doseai.optimize.outputs import write_objectives

    check_output_folder(args.out, ("objectives.json", "objectives.csv"), args.force, "--out")
    case, desired = case_and_desired_dose(args)
    objectives = objectives_from_case(case, desired)
    paths = write_objectives(objectives, Path(args.out), args.force)
    for o in objectives:
        print(f"{o.structure:<12} {o.type:<9} {o.dose_gy:7.2f} Gy"
              + (f" at {o.volume_pct:g} %" if o.volume_pct is not None else "") + f"  priority {o.priority:g}")
    print(f"wrote {' and '.join(str(p) for p in paths)}")
    return 0
