"""DoseOptimizer logic without Qt: MRML nodes in, ``doseai.optimize`` call, MRML nodes out.

``doseai``'s heavy parts (torch, the dose engine's library) are imported inside the methods, so that the
module loads in Slicer even before a missing Python package is installed (that happens when the user first
clicks Optimize, never at import); only ``doseai.packages``, the dose engines' contract and registry and
``doseai.mrml`` (numpy, SimpleITK, VTK: bundled with Slicer) load with it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from doseai.engine.registry import DEFAULT_ENGINE, engine_class
from doseai.errors import DoseAIError, MissingPackageError, OutputExistsError
from doseai.mrml.dicom import Lookup, dicom_reference
from doseai.packages import BASE_PACKAGES, PLAN_PACKAGES, TORCH_REQUIREMENT, missing_packages, pip_commands

from .optimization import DisplayTargets, OptimizationRequest, OptimizationResult, Progress
PLAN_MODE_ATTRIBUTE = "DoseAI.PlanMode"  # on plan dose volumes: the mode they were optimized with
PLAN_BEAMS_ATTRIBUTE = "DoseAI.PlanBeams"
PLAN_BIXEL_ATTRIBUTE = "DoseAI.PlanBixelWidthMm"
PLAN_ENGINE_ATTRIBUTE = "DoseAI.PlanEngine"
PREDICTION_ATTRIBUTE = "DoseAI.Model"  # set by DosePreference on predicted doses

PLAN_ENGINE = engine_class(DEFAULT_ENGINE)  # the dose engine the module plans with

# what each action needs (import name -> pip requirement); numpy and SimpleITK come with Slicer. The optimizer
# needs torch, tqdm and scipy (L-BFGS-B), the dose engine what its requirements say.
TASK_PACKAGES: dict[str, dict[str, str]] = {
    "objectives": {**BASE_PACKAGES, "torch": TORCH_REQUIREMENT, "scipy": PLAN_PACKAGES["scipy"]},
    "optimize": {**BASE_PACKAGES, "torch": TORCH_REQUIREMENT, "tqdm": "tqdm>=4.60", "scipy": PLAN_PACKAGES["scipy"],
                 **PLAN_ENGINE.requirements.packages},
    "export": {**BASE_PACKAGES, "pydicom": "pydicom>=2.4", "matplotlib": "matplotlib>=3.7"},
}
OBJECTIVE_FILES = ("objectives.json", "objectives.csv")  # what exportObjectives writes


def missing_packages_for(task: str) -> list[str]:
    """pip requirements missing for ``task`` ("objectives", "optimize" or "export")."""
    return missing_packages(TASK_PACKAGES[task])


def require_packages(task: str) -> None:
    """Raise :class:`MissingPackageError` saying how to install what ``task`` lacks."""
    missing = missing_packages_for(task)
    if not missing:
        return
    engine = (f" {PLAN_ENGINE.label} (the dose engine) is not installed."
              if PLAN_ENGINE.requirements.library_requirement in missing else "")
    commands = "; ".join(f"slicer.util.pip_install('{command}')" for command in pip_commands(missing))
    raise MissingPackageError(
        f"Missing Python packages: {', '.join(missing)}.{engine} The Dose Optimizer module installs them when "
        f"you first click Optimize (after asking); from the Python console: {commands}")


@dataclass
class _LastPlan:
    """The last optimization, for export: the case, the desired dose, the plan and the CT/segmentation."""

    case: object
    desired: object
    plan: object
    ctNode: object
    segNode: object


class DoseOptimizerLogic:
    """From a desired dose (e.g. the one predicted in DosePreference) to a plan: beams, dose-influence
    matrix (the dose engine, :data:`PLAN_ENGINE`), fluence optimization, the plan's dose as an RT dose volume
    and its DVH beside the desired one. Usable without the module GUI, in the Slicer Python console or a batch script::

        logic = DoseOptimizerLogic()
        result = logic.optimize(ctNode, segNode, desiredDoseNode, mode="mimic", numberOfBeams=9)
        logic.exportPlan("/tmp/plan")
    """

    def __init__(self) -> None:
        self.dvhBinWidthGy = 0.1
        self.lateralCutoffMm = 50.0  # the lateral cut-off around each bixel's ray, for engines that have one
        self.workingSpacingMm = 5.0  # voxel size of the grid the dose engine and optimizer work on
        self._last: _LastPlan | None = None
        self._objectives: list | None = None

    # --- inputs ----------------------------------------------------------------------------------
    @staticmethod
    def missingInputs(ctNode, segNode, desiredDoseNode) -> str:
        """Why Optimize cannot run with these inputs (a sentence for the button's tooltip), or ""."""
        from doseai.mrml import missing_inputs

        return missing_inputs(ctNode, segNode, desiredDoseNode, "desired dose",
                              " (e.g. the dose predicted in the Dose Preference module)")

    @staticmethod
    def targetProblem(segNode, prescriptions: Mapping[str, float] | None = None) -> str:
        """Why the segment names give no target to plan for (a sentence), or "": a target needs a
        prescription, from its name (PTV_70, PTV7000) or from ``prescriptions``."""
        from doseai.mrml import segment_names
        from doseai.structures import is_target, match_structures, prescription_from_name

        if segNode is None:
            return ""
        try:
            canonical = match_structures(segment_names(segNode)).values()
        except DoseAIError as error:  # two segments with one structure name
            return str(error)
        if any(name in (prescriptions or {}) or (is_target(name) and prescription_from_name(name))
               for name in canonical):
            return ""
        return ("No target with a prescription: name a PTV segment with its dose (e.g. 'PTV_70'), or give "
                "prescriptions")

    @staticmethod
    def defaultInputs(scene):
        """Obvious choices in ``scene`` as ``(ctNode, segNode, desiredDoseNode)``, None where there is none:
        the first plain scalar volume that is not a dose, the first segmentation that is not an isodose
        display, and as desired dose the first predicted dose (DosePreference's), else the first RT dose
        that is not a plan optimized here."""
        from doseai.mrml import scene_inputs

        cts, segmentations, doses = scene_inputs(scene)
        candidates = [volume for volume in doses if not volume.GetAttribute(PLAN_MODE_ATTRIBUTE)]
        predicted = [volume for volume in candidates if volume.GetAttribute(PREDICTION_ATTRIBUTE)]
        desired = (predicted or candidates or [None])[0]
        return (cts[0] if cts else None), (segmentations[0] if segmentations else None), desired

    @staticmethod
    def outputProblem(planDoseNode, desiredDoseNode=None) -> str:
        """Why ``planDoseNode`` must not receive the plan's dose (a sentence), or "": only an empty volume
        or a plan optimized before may be overwritten, never the CT, the desired dose or other data."""
        if planDoseNode is None:
            return ""
        if planDoseNode is desiredDoseNode:
            return "The plan dose must not be the desired dose; choose 'Create new plan dose volume'"
        if planDoseNode.GetAttribute(PLAN_MODE_ATTRIBUTE) or planDoseNode.GetImageData() is None:
            return ""
        return (f"The plan dose '{planDoseNode.GetName()}' holds other data (not an optimized plan); "
                "choose 'Create new plan dose volume' or a plan optimized before")

    @property
    def lastPlan(self):
        """The core's PlanResult of the last optimization (what exportPlan writes), or None."""
        return self._last.plan if self._last else None

    @property
    def lastObjectives(self) -> list | None:
        """The objectives of the last optimization or :meth:`objectives` call (what exportObjectives writes)."""
        return self._objectives

    def forget(self) -> None:
        """Drop the last plan and objectives (e.g. when the scene closes); the influence cache stays."""
        self._last, self._objectives = None, None

    def _case(self, ctNode, segNode, overrides, prescriptions):
        from doseai.mrml import case_from_nodes

        case = case_from_nodes(ctNode, segNode, overrides=overrides, prescriptions=prescriptions)
        case.require_target()
        return case

    # --- objectives ------------------------------------------------------------------------------
    def objectives(self, ctNode, segNode, doseNode, overrides: Mapping[str, str | None] | None = None,
                   prescriptions: Mapping[str, float] | None = None, rules=None) -> list:
        """The planning objectives a planner would enter in a TPS to get ``doseNode`` (DVH points and mean
        doses with rule-based margins, see :mod:`doseai.optimize.from_dose`), for every structure of
        ``segNode`` on the CT grid. ``rules``: a ``FromDoseRules`` (default margins and priorities)."""
        from doseai.mrml import missing_inputs

        reason = missing_inputs(ctNode, segNode, doseNode)
        if reason:
            raise DoseAIError(reason)
        from doseai.mrml import dose_on_grid

        case = self._case(ctNode, segNode, overrides, prescriptions)
        dose = dose_on_grid(doseNode, case.geometry)
        require_packages("objectives")
        from doseai.optimize.from_dose import objectives_from_dose

        self._objectives = objectives_from_dose(dose, case.structures, case.prescriptions, rules)
        return self._objectives

    # --- optimization ----------------------------------------------------------------------------
    # The dose-influence matrix of the last (case, beams): shared by every logic instance (the module's
    # and the console's), one at a time (a 9-beam matrix takes hundreds of MB).
    _influenceCache = None  # (key, beams, influence)

    @classmethod
    def clearCache(cls) -> None:
        """Drop the cached dose-influence matrix (the next optimization runs the dose engine)."""
        DoseOptimizerLogic._influenceCache = None

    @staticmethod
    def influenceKey(case, settings) -> str:
        """What the dose-influence matrix depends on: the CT, the structures and prescriptions (they place
        the beams and bixels) on their grid, and the engine and beam settings."""
        import numpy as np

        digest = hashlib.sha1()
        digest.update(repr(case.geometry).encode())
        digest.update(np.ascontiguousarray(case.ct).tobytes() if case.ct is not None else b"no CT")
        for name in sorted(case.structures):
            digest.update(name.encode())
            digest.update(np.packbits(case.structures[name]).tobytes())
        digest.update(repr(sorted(case.prescriptions.items())).encode())
        digest.update(repr((settings.engine, settings.n_beams, settings.bixel_width_mm, settings.lateral_cutoff_mm,
                            settings.working_spacing_mm)).encode())
        return digest.hexdigest()

    def _influence(self, case, settings, report: Progress):
        """``(beams, influence, reused)``: the cached matrix when it was made for this case and these
        beams, else the dose engine's (which then replaces the cached one)."""
        from doseai.engine import default_beams
        from doseai.optimize.plan import make_engine

        key = self.influenceKey(case, settings)
        cached = DoseOptimizerLogic._influenceCache
        if cached is not None and cached[0] == key:
            return cached[1], cached[2], True
        DoseOptimizerLogic._influenceCache = None  # free the old matrix before computing the next
        beams = default_beams(case, n_beams=settings.n_beams, bixel_width_mm=settings.bixel_width_mm)
        report(f"Computing the dose-influence matrix ({settings.n_beams} beams, {settings.bixel_width_mm:g} mm "
               f"bixels, {engine_class(settings.engine).label})", 15)
        influence = make_engine(settings).compute(case, beams, progress=False)  # DoseEngineError says what to do
        DoseOptimizerLogic._influenceCache = (key, influence.beams, influence)
        return influence.beams, influence, False

    def optimize(
        self,
        ctNode,
        segNode,
        desiredDoseNode,
        mode: str = "mimic",
        numberOfBeams: int = 9,
        bixelWidthMm: float = 5.0,
        planDoseNode=None,
        chartNode=None,
        metricsTableNode=None,
        overrides: Mapping[str, str | None] | None = None,
        prescriptions: Mapping[str, float] | None = None,
        progress: Progress | None = None,
        maxIterations: int | None = None,
        optimizer: str = "lbfgsb",
        start: str = "uniform",
    ) -> OptimizationResult:
        """Optimize the fluences of ``numberOfBeams`` equispaced coplanar 6 MV beams so that the plan's dose
        comes as close as the beams allow to the dose of ``desiredDoseNode`` (resampled onto the CT grid
        when on another grid); ``mode``: "mimic" (voxel-wise dose mimicking) or "objectives" (the DVH
        objectives derived from the desired dose).

        Creates (or updates ``planDoseNode``) the plan's RT dose volume under the CT's study and shows its
        DVH, with the desired dose's DVH dashed, in one chart (``chartNode``) and its metrics in a table
        (``metricsTableNode``). The dose-influence matrix is kept: optimizing the same CT, structures and
        beams again (e.g. in the other mode) skips the dose engine. ``progress(text, percent)`` is told
        what is being done. Segments are matched to structure names (``overrides``: segment name ->
        canonical name or None); target prescriptions come from the names or ``prescriptions``.
        ``optimizer`` "lbfgsb", "adam" or "learned" (the LSTM) for ``maxIterations`` (None: its default),
        from the ``start`` "uniform" weights or the fluence "generator"'s.

        The keyword form of :meth:`run` (which takes an :class:`OptimizationRequest` and :class:`DisplayTargets`).
        """
        request = OptimizationRequest(ctNode, segNode, desiredDoseNode, mode, numberOfBeams, bixelWidthMm,
                                      maxIterations, overrides, prescriptions, optimizer, start)
        return self.run(request, DisplayTargets(planDoseNode, chartNode, metricsTableNode), progress)

    def run(self, request: OptimizationRequest, targets: DisplayTargets | None = None,
            progress: Progress | None = None) -> OptimizationResult:
        """Optimize the plan ``request`` asks for and show it in ``targets`` (new nodes where None), see
        :meth:`optimize`."""
        report = progress or (lambda text, percent: None)
        targets = targets or DisplayTargets()
        reason = (self.missingInputs(request.ctNode, request.segNode, request.desiredDoseNode)
                  or self.outputProblem(targets.planDoseNode, request.desiredDoseNode) or request.modeProblem())
        if reason:
            raise DoseAIError(reason)
        start = time.perf_counter()
        report("Preparing the case (structures and desired dose on the CT grid)", 5)
        case, desired, settings = self._prepare(request)
        timings = {"case_s": time.perf_counter() - start}

        step = time.perf_counter()
        beams, influence, reused = self._influence(case, settings, report)
        timings["engine_s"] = 0.0 if reused else time.perf_counter() - step

        step = time.perf_counter()
        report(f"Optimizing the fluences ({request.mode})", 55)
        from doseai.optimize.plan import mean_difference_in_body, plan_from_dose

        plan = plan_from_dose(case, desired, settings, beams=beams, influence=influence, progress=False)
        plan.timings_s["engine_s"] = timings["engine_s"]
        timings["optimize_s"] = time.perf_counter() - step

        step = time.perf_counter()
        report("Updating the plan dose volume and the DVH", 90)
        planDoseNode, dvh = self._show(request, targets, case, desired, plan)
        objectives = plan.objectives or self._objectivesOf(case, desired, settings)
        timings["display_s"] = time.perf_counter() - step
        timings["total_s"] = time.perf_counter() - start

        self._last = _LastPlan(case, desired, plan, request.ctNode, request.segNode)
        self._objectives = objectives
        result = OptimizationResult(planDoseNode, dvh, objectives, plan, desired, reused,
                                    mean_difference_in_body(case, plan.dose, desired), timings)
        logging.info(f"DoseOptimizer: {result.summary()}")
        report("Done", 100)
        return result

    def _prepare(self, request: OptimizationRequest):
        """``(case, desired dose on the CT grid, PlanSettings)``; checks the packages first."""
        from doseai.mrml import dose_on_grid

        case = self._case(request.ctNode, request.segNode, request.overrides, request.prescriptions)
        desired = dose_on_grid(request.desiredDoseNode, case.geometry, "desired dose")
        require_packages("optimize")
        from doseai.optimize.plan import PlanSettings, default_iterations

        iterations = request.maxIterations or default_iterations(request.optimizer)
        settings = PlanSettings(mode=request.mode, engine=PLAN_ENGINE.key, n_beams=request.numberOfBeams,
                                bixel_width_mm=request.bixelWidthMm, lateral_cutoff_mm=self.lateralCutoffMm,
                                working_spacing_mm=self.workingSpacingMm, max_iterations=iterations,
                                solver=request.optimizer, start=request.start)
        return case, desired, settings

    def _show(self, request: OptimizationRequest, targets: DisplayTargets, case, desired, plan):
        """``(plan dose node, DVHResult)``: the plan's dose in ``targets.planDoseNode`` (or a new RT dose
        volume) tagged with how it was made, its DVH beside the desired one and its metrics."""
        from doseai.mrml import create_or_update_dose_node, show_case_dvh
        from doseai.report import case_dvhs

        ctNode = request.ctNode
        name = targets.planDoseNode.GetName() if targets.planDoseNode is not None else f"{ctNode.GetName()} plan"
        node = create_or_update_dose_node(ctNode.GetScene(), plan.dose, case.geometry, name, ctNode=ctNode,
                                          node=targets.planDoseNode, display_max_gy=1.1 * case.max_prescription)
        node.SetAttribute(PLAN_MODE_ATTRIBUTE, request.mode)
        node.SetAttribute(PLAN_BEAMS_ATTRIBUTE, str(len(plan.beams.gantry_angles_deg)))
        node.SetAttribute(PLAN_BIXEL_ATTRIBUTE, f"{plan.beams.bixel_width_mm:g}")
        node.SetAttribute(PLAN_ENGINE_ATTRIBUTE, str(plan.engine_card.get("name", plan.settings.engine)))
        reference = case_dvhs(case, desired, bin_width_gy=self.dvhBinWidthGy)
        dvh = show_case_dvh(case, plan.dose, request.segNode, name, request.overrides, targets.chartNode,
                            targets.metricsTableNode, reference=reference, reference_label="desired",
                            bin_width_gy=self.dvhBinWidthGy)
        return node, dvh

    @staticmethod
    def _objectivesOf(case, desired, settings) -> list:
        """The TPS objectives of the desired dose (what a "mimic" plan exports beside its dose)."""
        from doseai.optimize.from_dose import objectives_from_dose

        return objectives_from_dose(desired, case.structures, case.prescriptions, settings.rules)

    # --- export ----------------------------------------------------------------------------------
    def dicomLookup(self) -> Lookup | None:
        """How to read a tag of a DICOM instance; the Slicer module asks its DICOM database. None here:
        without a database the exported RTDOSE gets fresh study and frame-of-reference UIDs."""
        return None

    @staticmethod
    def _refuseExisting(folder, names, force: bool) -> Path:
        if not folder or not str(folder).strip():
            raise DoseAIError("Choose an export folder")
        folder = Path(folder)
        existing = [name for name in names if (folder / name).exists()]
        if existing and not force:
            raise OutputExistsError(f"{len(existing)} file(s) exist in {folder}: {', '.join(existing)}")
        return folder

    def exportPlan(self, folder, force: bool = False, lookup: Lookup | None = None) -> list[Path]:
        """Write the last optimized plan into ``folder``: its dose (NRRD and RTDOSE, in the CT's DICOM study
        when the CT came from DICOM, see ``lookup``), the fluence maps (PNG and arrays), the objectives
        (JSON, CSV), a DVH plot against the desired dose, the metrics (CSV) and a summary (JSON).
        Nothing is written when any of these files exists, unless ``force``: raises OutputExistsError."""
        if self._last is None:
            raise DoseAIError("Optimize a plan first")
        require_packages("export")
        from doseai.optimize.outputs import PLAN_FILES, write_plan

        folder = self._refuseExisting(folder, PLAN_FILES, force)
        last = self._last
        reference = dicom_reference(last.ctNode, lookup or self.dicomLookup(), last.segNode)
        settings = last.plan.settings
        reference["DoseDescription"] = f"DoseAI plan {settings.mode} {settings.n_beams} beams"[:64]
        case = replace(last.case, metadata=reference)
        paths = [Path(path) for path in write_plan(last.plan, case, last.desired, folder, force=force)]
        logging.info(f"DoseOptimizer: wrote {', '.join(path.name for path in paths)} to {folder}")
        return paths

    def exportObjectives(self, folder, force: bool = False) -> list[Path]:
        """Write the objectives of the last optimization (or :meth:`objectives` call) as JSON and CSV
        (structure, type, dose, volume, priority) into ``folder``; never over existing files unless ``force``."""
        if self._objectives is None:
            raise DoseAIError("Optimize a plan (or compute the objectives of a dose) first")
        from doseai.optimize.outputs import write_objectives

        folder = self._refuseExisting(folder, OBJECTIVE_FILES, force)
        return [Path(path) for path in write_objectives(self._objectives, folder, force)]
