"""Files of an optimized plan: its dose (NRRD and RTDOSE), fluence maps (PNG and arrays), the objectives
for a TPS (JSON and CSV), a DVH plot of the achieved dose against the desired one, and a summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from doseai.case import PlanningCase
from doseai.errors import refuse_overwrite
from doseai.optimize.from_dose import PlanObjective, objectives_to_csv, objectives_to_json
from doseai.optimize.plan import PlanResult, mean_difference_in_body

PLAN_FILES = ("plan_dose.nrrd", "RD_plan.dcm", "RP_plan.dcm", "fluence.npz", "fluence.png", "objectives.json", "objectives.csv",
              "dvh_comparison.png", "metrics.csv", "summary.json")


def write_objectives(objectives: list[PlanObjective], out: Path, force: bool = False) -> list[Path]:
    """objectives.json and objectives.csv in ``out``; nothing is written when either exists, unless ``force``."""
    out = Path(out)
    for name in ("objectives.json", "objectives.csv"):
        refuse_overwrite(out / name, force)
    out.mkdir(parents=True, exist_ok=True)
    return [objectives_to_json(objectives, out / "objectives.json", force=force),
            objectives_to_csv(objectives, out / "objectives.csv", force=force)]


def plot_fluence_maps(maps: list[np.ndarray], gantry_angles: tuple[float, ...], path: Path) -> Path:
    """A PNG of the fluence map of each beam, titled with its gantry angle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(len(maps), 5)
    rows = -(-len(maps) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.6 * rows), squeeze=False)
    top = max(float(m.max()) for m in maps) or 1.0
    for axis in axes.ravel():
        axis.axis("off")
    for axis, fluence, angle in zip(axes.ravel(), maps, gantry_angles):
        image = axis.imshow(fluence, cmap="magma", vmin=0, vmax=top, origin="lower")
        axis.set_title(f"gantry {angle:g}°", fontsize=9)
    figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="bixel weight")
    figure.suptitle("Optimized fluence maps (beam's eye view)")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_plan(plan: PlanResult, case: PlanningCase, desired: np.ndarray, out: Path, force: bool = False) -> list[Path]:
    """Write every file of :data:`PLAN_FILES` into ``out`` (all checked before any is written)."""
    from doseai.io.dicom import write_rtdose
    from doseai.io.images import write_image
    from doseai.optimize.from_dose import objectives_from_dose
    from doseai.report import case_dvhs, case_metrics, plot_dvhs, write_metrics_csv

    out = Path(out)
    for name in PLAN_FILES:
        refuse_overwrite(out / name, force)
    out.mkdir(parents=True, exist_ok=True)
    written = [write_image(plan.dose, case.geometry, out / "plan_dose.nrrd", force=force)]
    write_rtdose(plan.dose, case.geometry, out / "RD_plan.dcm", reference_meta=case.metadata or None, force=force,
                 plan=plan_description(plan, case))
    written += [out / "RD_plan.dcm", out / "RP_plan.dcm"]  # (write_rtdose returns the SOPInstanceUID, not paths)
    np.savez_compressed(out / "fluence.npz", weights=plan.fluence.weights,
                        gantry_angles_deg=np.asarray(plan.beams.gantry_angles_deg),
                        bixel_width_mm=plan.beams.bixel_width_mm,
                        **{f"map_beam{b}": m for b, m in enumerate(plan.fluence_maps)})
    written.append(out / "fluence.npz")
    written.append(plot_fluence_maps(plan.fluence_maps, plan.beams.gantry_angles_deg, out / "fluence.png"))
    # the TPS objectives of the desired dose, whichever way the optimizer was steered
    objectives = plan.objectives or objectives_from_dose(desired, case.structures, case.prescriptions,
                                                         plan.settings.rules)
    written += write_objectives(objectives, out, force)
    written.append(plot_dvhs(case_dvhs(case, plan.dose), out / "dvh_comparison.png",
                             reference=case_dvhs(case, desired),
                             title=f"{case.patient_id}: achieved plan (solid) vs desired dose", force=force))
    written.append(write_metrics_csv(case_metrics(case, plan.dose), out / "metrics.csv", force=force))
    summary = plan_summary(plan, case, desired)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    written.append(out / "summary.json")
    return written


def plan_description(plan: PlanResult, case: PlanningCase):
    """The RTPLAN of an optimized plan: its beams, isocentre, energy and jaws around the optimized fluence."""
    from doseai.io.rtplan import PlanBeam, PlanDescription

    beams = plan.beams
    jaws = plan.jaws_mm or [(-50.0, 50.0, -50.0, 50.0)] * len(beams.gantry_angles_deg)
    return PlanDescription(
        label="DoseAI plan",
        description=(f"{len(beams.gantry_angles_deg)}-beam IMRT optimized by DoseAI ({plan.settings.mode} toward a "
                     f"desired dose, engine {plan.settings.engine}); fluence maps in fluence.npz, no leaf sequence: "
                     "research, not deliverable as written"),
        prescriptions=dict(case.prescriptions),
        beams=[PlanBeam(gantry_deg=g, couch_deg=c, isocenter_lps_mm=tuple(beams.isocenter_lps_mm),
                        energy_mv=beams.energy_mv, jaws_mm=j)
               for g, c, j in zip(beams.gantry_angles_deg, beams.couches, jaws)])


def plan_summary(plan: PlanResult, case: PlanningCase, desired: np.ndarray) -> dict:
    """What summary.json holds: settings, beams, engine card, optimizer outcome, timings, mean |plan - desired|."""
    from dataclasses import asdict

    settings = asdict(plan.settings)
    return {
        "patient": case.patient_id,
        "settings": settings,
        "beams": {"gantry_angles_deg": list(plan.beams.gantry_angles_deg), "energy_mv": plan.beams.energy_mv,
                  "bixel_width_mm": plan.beams.bixel_width_mm, "isocenter_lps_mm": list(plan.beams.isocenter_lps_mm)},
        "engine": plan.engine_card,
        "optimizer": plan.fluence.summary(),
        "timings_s": plan.timings_s,
        "achieved_vs_desired_mae_gy": mean_difference_in_body(case, plan.dose, desired),
    }
