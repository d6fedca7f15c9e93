"""DosePreference logic without Qt: MRML nodes in, ``doseai`` core call, MRML nodes out.

``doseai`` is imported inside the methods, so that the module loads in Slicer even before a missing
Python package is installed (that happens when the user first clicks a button, never at import); only
``doseai.packages`` and ``doseai.mrml.dicom`` (numpy, SimpleITK, VTK: bundled with Slicer) load with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from doseai.mrml.plots import DVHResult
from doseai.packages import BASE_PACKAGES, TORCH_REQUIREMENT, missing_packages

from .dvh_edit import DesiredDVHError, DVHEditSession, check_curve, check_desired_vector
from .export import (Lookup, dicom_reference, dose_description, existing_outputs, export_paths, safe_file_stem,
                     write_dose_export)
from .mapping import StructureRow, structure_rows
from .results import DVHRequest, PredictionResult, calibrationText, model_conditions, model_oars, modelName
from .session import SHARED_SESSION, CaseInputs, DisplayTargets, PendingPrediction, PredictionSession, Progress

# import name -> pip requirement; what "Compute DVH" needs beyond the doseai package itself
REQUIRED_PACKAGES: dict[str, str] = BASE_PACKAGES
# what each action needs (Slicer bundles numpy and SimpleITK; the rest is installed on first use)
TASK_PACKAGES: dict[str, dict[str, str]] = {
    "dvh": REQUIRED_PACKAGES,
    "predict": {**REQUIRED_PACKAGES, "torch": TORCH_REQUIREMENT, "monai": "monai>=1.4"},
    # the diffusion model's MONAI DiffusionModelUNet needs einops for its attention blocks
    "sample": {**REQUIRED_PACKAGES, "torch": TORCH_REQUIREMENT, "monai": "monai>=1.4", "einops": "einops>=0.6"},
    "export": {**REQUIRED_PACKAGES, "pydicom": "pydicom>=2.4", "contourpy": "contourpy>=1.0",
               "matplotlib": "matplotlib>=3.7"},
}

# desired DVH curves by structure: (dose in Gy, cumulative volume in %)
Curves = Mapping[str, tuple[Sequence[float], Sequence[float]]]
# attributes of a predicted dose node that say how it was steered besides its sliders' (see doseai.conditions);
# the ones a prediction does not set are removed
PREDICTION_ATTRIBUTES = ("DoseAI.Calibration", "DoseAI.DesiredDVH", "DoseAI.Samples", "DoseAI.Seed")


def missing_packages_for(task: str) -> list[str]:
    """pip requirements missing for ``task`` ("dvh", "predict", "sample" or "export")."""
    return missing_packages(TASK_PACKAGES[task])


class DosePreferenceLogic:
    """Dose prediction steered by preference sliders or a desired DVH, DVHs, isodose lines and export.

    Usable without the module GUI, in the Slicer Python console or in a batch script::

        logic = DosePreferenceLogic()
        result = logic.predict(ctNode, segNode, sliders={"oar_sparing": 0.5})  # or oarSparing=0.5
        result = logic.computeDVH(ctNode, segNode, doseNode)
        edited = logic.predictFromDVH(ctNode, segNode, {"Parotid_L": ([0, 20, 40], [100, 40, 0])},
                                      doseNode=result.doseNode)

    The loaded models, the case they are set to and the worker thread live in ``session``
    (:class:`~DosePreferenceLib.session.PredictionSession`; default: the one shared by this Slicer process).
    """

    def __init__(self, session: PredictionSession | None = None) -> None:
        from doseai.dose_grid import DEFAULT_DOSE_GRID_MM

        self.session = session or SHARED_SESSION
        self.dvhBinWidthGy = 0.1
        # the predicted dose's own grid (doseai.dose_grid): the CT's voxels binned to about this spacing (mm), as
        # a planning system keeps an RTDOSE; None: the CT's grid (a 512 x 512 CT then costs seconds per change)
        self.doseGridMm: float | None = DEFAULT_DOSE_GRID_MM

    # --- inputs ----------------------------------------------------------------------------------
    @staticmethod
    def missingInputs(ctNode, segNode, doseNode) -> str:
        """Why Compute DVH cannot run with these inputs (a sentence for the button's tooltip), or ""."""
        from doseai.mrml import missing_inputs

        return missing_inputs(ctNode, segNode, doseNode)

    @staticmethod
    def defaultInputs(scene):
        """Obvious choices in ``scene`` as ``(ctNode, segNode, doseNode)``, None where there is none:
        the first plain scalar volume that is not a dose, the first segmentation that is not an
        isodose display, the first volume marked as an RT dose (``DicomRtImport.DoseVolume``) that
        is not a prediction (a predicted dose is an output, e.g. never the obvious reference)."""
        from doseai.mrml import scene_inputs

        cts, segmentations, doses = scene_inputs(scene)
        return (cts[0] if cts else None, segmentations[0] if segmentations else None,
                next((volume for volume in doses if not volume.GetAttribute("DoseAI.Model")), None))

    @staticmethod
    def outputProblem(doseNode) -> str:
        """Why ``doseNode`` must not receive a prediction (a sentence), or "": only an empty volume or a
        dose predicted before may be overwritten, never the CT, a clinical dose or any other data."""
        if doseNode is None or doseNode.GetAttribute("DoseAI.Model") or doseNode.GetImageData() is None:
            return ""
        return (f"The output dose '{doseNode.GetName()}' holds other data (not a predicted dose); "
                "choose 'Create new dose volume' or a predicted dose")

    @staticmethod
    def segmentNames(segNode) -> list[str]:
        from doseai.mrml import segment_names

        return segment_names(segNode)

    def structureRows(self, segNode, previous: Sequence[StructureRow] = ()) -> list[StructureRow]:
        """The structure-mapping table of ``segNode`` (see :mod:`DosePreferenceLib.mapping`)."""
        return structure_rows(self.segmentNames(segNode), previous)

    # --- DVH -------------------------------------------------------------------------------------
    def computeDVH(
        self,
        ctNode,
        segNode,
        doseNode,
        overrides: Mapping[str, str | None] | None = None,
        prescriptions: Mapping[str, float] | None = None,
        chartNode=None,
        metricsTableNode=None,
        referenceDoseNode=None,
    ) -> DVHResult:
        """DVHs and metrics of ``doseNode`` for every segment of ``segNode`` on the grid of ``ctNode``.

        Segments are matched to canonical structure names (``overrides``: raw segment name ->
        canonical name, or None to leave it out); targets get prescription metrics (D95, HI,
        Paddick CI, V100%) when their prescription is known from the name or ``prescriptions``.
        Shows the curves in a plot chart (one table + series per structure, segment colours) and
        the metrics in a table; ``chartNode`` / ``metricsTableNode`` given are updated in place.
        ``referenceDoseNode`` adds its DVHs as dashed curves.
        """
        from doseai.errors import DoseAIError

        reason = self.missingInputs(ctNode, segNode, doseNode)
        if reason:
            raise DoseAIError(reason)
        start = time.time()
        inputs = CaseInputs(ctNode, segNode, overrides, prescriptions)
        case = self.session.caseWithDose(inputs, doseNode, self.doseGridMm)
        targets = DisplayTargets(doseNode, chartNode, metricsTableNode, referenceDoseNode)
        result = self._showDVH(case, case.dose, inputs, doseNode.GetName(), targets)
        logging.info(f"DosePreference: DVH of {len(result.dvhs)} structures in {time.time() - start:.2f} s")
        return result

    def _showDVH(self, case, dose, inputs: CaseInputs, name: str, targets: DisplayTargets, reference=None,
                 referenceLabel: str = "reference", bands=None) -> DVHResult:
        """DVH curves (segment colours) in a chart and metrics in a table, both named after ``name``; dashed:
        the ``reference`` DVHs, else those of the targets' reference dose; dotted: ``bands`` of sampled doses."""
        from doseai.mrml import show_case_dvh

        if reference is None:
            reference = self.referenceDVHs(case, targets.referenceDoseNode)
        return show_case_dvh(case, dose, inputs.segNode, name, inputs.overrides, targets.chartNode,
                             targets.metricsTableNode, reference=reference, reference_label=referenceLabel,
                             bin_width_gy=self.dvhBinWidthGy, bands=bands)

    def referenceDVHs(self, case, referenceDoseNode) -> dict | None:
        """DVHs of a reference dose (e.g. the clinical plan's RTDOSE) for the structures of ``case``,
        resampled onto the case grid when on another grid; cached while neither changes, so moving a
        slider does not recompute them."""
        return self.session.referenceDVHs(case, referenceDoseNode, self.dvhBinWidthGy)

    # --- the models ----------------------------------------------------------------------------------
    def predictor(self, weights=None, device: str = "auto"):
        """The session's :class:`doseai.predict.DosePredictor` (loaded on first use)."""
        return self.session.sliderModel(weights, device)

    def dvhPredictor(self, weights=None, device: str = "auto"):
        """The session's :class:`doseai.predict.DVHDosePredictor` (default weights
        ``Resources/Models/dose_dvh_v3.pt``), loaded on first use and again when ``weights`` change."""
        return self.session.dvhModel(weights, device)

    def dvhModelProblem(self, weights=None) -> str:
        """Why DVH editing cannot load its model (a sentence), or "" (loaded, or the weights file exists)."""
        return self.session.dvhModelProblem(weights)

    def modelCard(self, weights=None) -> dict | None:
        """The model card of the loaded model, else of ``weights`` (default: the shipped model), read
        without loading torch; None when there is no card."""
        return self.session.modelCard(weights)

    # --- prediction from the sliders -----------------------------------------------------------------
    def predict(
        self,
        ctNode,
        segNode,
        sliders: Mapping[str, float] | None = None,
        doseNode=None,
        overrides: Mapping[str, str | None] | None = None,
        prescriptions: Mapping[str, float] | None = None,
        chartNode=None,
        metricsTableNode=None,
        referenceDoseNode=None,
        progress: Progress | None = None,
        **sliderValues: float,
    ) -> PredictionResult:
        """Predict the dose for the CT and segmentation, steered by the model's sliders (``sliders`` by name,
        ``{"oar_sparing": 0.5}``, or as keywords, ``oarSparing=0.5``; names, ranges and texts come from the
        model card, a slider not given is at 0 = the typical plan); create (or update ``doseNode``) the RT dose
        volume and show its DVH (with the DVH of ``referenceDoseNode`` dashed, when given).

        The case is rebuilt from the nodes only when they changed since the last call: moving a slider
        re-runs only the slider-dependent half of the network. ``progress(text, percent)`` is told
        what is being done.
        """
        report = progress or (lambda text, percent: None)
        start = time.time()
        inputs = CaseInputs(ctNode, segNode, overrides, prescriptions)
        targets = DisplayTargets(doseNode, chartNode, metricsTableNode, referenceDoseNode)
        predictor, case = self._prepareCase(inputs, doseNode, report)
        report("Predicting the dose", 60)
        self.session.waitForWorker()  # one prediction at a time
        values = predictor.conditions.values(sliders, **sliderValues)
        dose = predictor.predict(sliders=values)
        report("Updating the dose volume and the DVH", 85)
        result = self._showSliderPrediction(case, dose, values, time.time() - start, start, inputs, targets)
        report("Done", 100)
        return result

    def predictAsync(self, ctNode, segNode, sliders: Mapping[str, float] | None = None, doseNode=None,
                     overrides=None, prescriptions=None, chartNode=None, metricsTableNode=None,
                     referenceDoseNode=None, **sliderValues: float) -> PendingPrediction:
        """Like :meth:`predict`, but the network runs on a worker thread so that the GUI stays responsive
        while a slider moves (torch releases the GIL). Call ``finish()`` of the returned object on the main
        thread once ``done()``: it updates the MRML nodes (and raises what the prediction raised, e.g. a slider
        out of range). Reading MRML (a changed case) happens here, on the calling thread."""
        start = time.time()
        inputs = CaseInputs(ctNode, segNode, overrides, prescriptions)
        targets = DisplayTargets(doseNode, chartNode, metricsTableNode, referenceDoseNode)
        predictor, case = self._prepareCase(inputs, doseNode, lambda *a: None)

        def run():
            values = predictor.conditions.values(sliders, **sliderValues)
            return predictor.predict(sliders=values), values, time.time() - start

        def show(done):
            dose, values, predictSeconds = done
            return self._showSliderPrediction(case, dose, values, predictSeconds, start, inputs, targets)

        return self.session.submit(run, show)

    # --- several plausible doses: the diffusion model --------------------------------------------------
    def diffusionPredictor(self, weights=None, device: str = "auto"):
        """The session's :class:`doseai.diffusion_predict.DiffusionDosePredictor` (loaded on first use)."""
        return self.session.diffusionModel(weights, device)

    def sampleDoses(self, ctNode, segNode, samples: int = 4, seed: int = 0, sliders: Mapping[str, float] | None = None,
                    doseNode=None, spreadNode=None, overrides=None, prescriptions=None, chartNode=None,
                    metricsTableNode=None, referenceDoseNode=None, progress: Progress | None = None) -> PredictionResult:
        """Draw ``samples`` doses with the diffusion model (the same ``seed``, the same doses) around its base
        model's dose at ``sliders`` (``overrides``, ``prescriptions``, the display nodes: as :meth:`predict`). The
        dose node gets their mean, ``spreadNode`` (created when None) the width of their voxel-wise 5-95 % band,
        the chart the mean's DVH with each structure's band across the samples (dotted)."""
        from doseai.mrml import create_or_update_spread_node

        report, start = progress or (lambda text, percent: None), time.time()
        inputs = CaseInputs(ctNode, segNode, overrides, prescriptions)
        if self.session.diffusionPredictor is None:
            report("Loading the diffusion model", 5)
        predictor, case = self._prepareCase(inputs, doseNode, report, loadPredictor=self.diffusionPredictor)
        report(f"Drawing {samples} doses", 50)
        self.session.waitForWorker()  # one prediction at a time
        values = predictor.conditions.values(sliders)
        drawn = predictor.sample(samples, seed, sliders=values)
        report("Updating the dose, its spread and the DVH bands", 85)
        attributes = {c.attribute: f"{values[c.name]:g}" for c in predictor.conditions}
        attributes.update({"DoseAI.Calibration": calibrationText(predictor.base), "DoseAI.Model": modelName(predictor),
                           "DoseAI.Samples": str(samples), "DoseAI.Seed": str(seed)})
        targets = DisplayTargets(doseNode, chartNode, metricsTableNode, referenceDoseNode)
        result = self._showPrediction(case, drawn.mean, time.time() - start, start, inputs, targets, predictor,
                                      attributes, bands=drawn.structure_bands(case))
        result.spreadNode = create_or_update_spread_node(
            ctNode.GetScene(), drawn.spread, case.geometry, f"{result.doseNode.GetName()} spread (5-95 %)",
            ctNode=ctNode, node=spreadNode)
        result.samples = samples
        report("Done", 100)
        return result

    def _showSliderPrediction(self, case, dose, values, predictSeconds: float, start: float, inputs: CaseInputs,
                              targets: DisplayTargets) -> PredictionResult:
        predictor = self.predictor()
        attributes = {c.attribute: f"{values[c.name]:g}" for c in predictor.conditions}
        attributes.update({"DoseAI.Calibration": calibrationText(predictor), "DoseAI.Model": modelName(predictor)})
        return self._showPrediction(case, dose, predictSeconds, start, inputs, targets, predictor, attributes)

    # --- prediction from a desired DVH ---------------------------------------------------------------
    def predictFromDVH(
        self,
        ctNode,
        segNode,
        desiredDVH: np.ndarray | Curves,
        doseNode=None,
        overrides: Mapping[str, str | None] | None = None,
        prescriptions: Mapping[str, float] | None = None,
        chartNode=None,
        metricsTableNode=None,
        editedStructures: Sequence[str] | None = None,
        weights=None,
        progress: Progress | None = None,
        startDose: np.ndarray | None = None,
    ) -> PredictionResult:
        """Predict the dose whose DVH should follow ``desiredDVH``, with the DVH-conditioned model
        (:meth:`dvhPredictor`); create (or update ``doseNode``) the RT dose volume and show its DVH with the
        desired curves of ``editedStructures`` dashed.

        ``desiredDVH`` is either an array in the model's layout (one row per model structure, cumulative
        volume fractions at its dose levels: see :meth:`dvhEditSession`, or
        ``dvhPredictor().dvh_vector(dose)``), or edited curves ``{structure: (dose_gy, volume_pct)}``: then
        every other structure keeps the DVH of the dose in ``doseNode`` (the dose being edited), or, without
        one, of the sliders' typical plan (the preference model at neutral sliders). ``editedStructures``
        default: the structures of the curves, or every model structure in the segmentation for an array.

        Raises DoseAIError when the DVH model is missing, the array has the wrong shape or holds NaN or
        values outside [0, 1], or a curve names a structure the model does not know or the segmentation lacks.

        The edit changes the dose it starts from (``startDose`` on the case grid, e.g. a session's
        :attr:`DVHEditSession.startDose`; default: the dose in ``doseNode``, else the sliders' typical plan) by
        what the desired DVH asks (:meth:`doseai.predict.DVHDosePredictor.predict_edit`): no edit, no change.
        """
        report = progress or (lambda text, percent: None)
        start = time.time()
        inputs = CaseInputs(ctNode, segNode, overrides, prescriptions)
        targets = DisplayTargets(doseNode, chartNode, metricsTableNode)
        request = self._dvhRequest(inputs, desiredDVH, doseNode, editedStructures, weights, report, startDose)
        report("Predicting the dose from the desired DVH", 60)
        self.session.waitForWorker()  # one prediction at a time
        done = request.run(start)
        report("Updating the dose volume and the DVH", 85)
        result = self._showDVHPrediction(request, done, start, inputs, targets)
        report("Done", 100)
        return result

    def predictFromDVHAsync(self, ctNode, segNode, desiredDVH: np.ndarray | Curves, doseNode=None, overrides=None,
                            prescriptions=None, chartNode=None, metricsTableNode=None, editedStructures=None,
                            weights=None, startDose=None) -> PendingPrediction:
        """:meth:`predictFromDVH` with the network on the worker thread, as :meth:`predictAsync` (the
        desired DVH is checked here, so a bad one raises at once)."""
        start = time.time()
        inputs = CaseInputs(ctNode, segNode, overrides, prescriptions)
        targets = DisplayTargets(doseNode, chartNode, metricsTableNode)
        request = self._dvhRequest(inputs, desiredDVH, doseNode, editedStructures, weights, lambda *a: None,
                                   startDose)
        return self.session.submit(lambda: request.run(start),
                                   lambda done: self._showDVHPrediction(request, done, start, inputs, targets))

    def dvhEditSession(self, ctNode, segNode, doseNode=None, overrides=None, prescriptions=None, weights=None,
                       progress: Progress | None = None) -> DVHEditSession:
        """A :class:`DVHEditSession` for the case: the model's structures and dose levels, starting from the
        DVH of the dose in ``doseNode`` (without one: the sliders' typical plan); the structures present in
        the segmentation are editable. Loads the DVH model (and prepares the case) when needed."""
        report = progress or (lambda text, percent: None)
        inputs = CaseInputs(ctNode, segNode, overrides, prescriptions)
        predictor, case = self._prepareDVHCase(inputs, doseNode, weights, report)
        base = self._baseDose(inputs, doseNode, case, report)
        return DVHEditSession(predictor.structures, predictor.dose_levels_gy(), predictor.dvh_vector(base),
                              editable=self._presentStructures(predictor, case), start_dose=base)

    def _prepareDVHCase(self, inputs: CaseInputs, doseNode, weights, report):
        problem = self.dvhModelProblem(weights)
        if problem:
            from doseai.errors import UnreadableInputError

            raise UnreadableInputError(problem)
        if self.session.dvhPredictor is None or weights:
            report("Loading the DVH model", 5)
        return self._prepareCase(inputs, doseNode, report, lambda: self.dvhPredictor(weights))

    @staticmethod
    def _presentStructures(predictor, case) -> list[str]:
        """The model's structures the case has (not empty on the case's grid)."""
        return [name for name in predictor.structures
                if name in case.structures and bool(case.structures[name].any())]

    def _baseDose(self, inputs: CaseInputs, doseNode, case, report):
        """The dose an edit starts from: the dose node's (on the case grid), else the sliders' typical plan."""
        if doseNode is not None and doseNode.GetImageData() is not None:
            from doseai.mrml import dose_on_grid

            return dose_on_grid(doseNode, case.geometry, "dose being edited")
        report("Predicting the typical plan the edit starts from", 40)
        slider, _ = self._prepareCase(inputs, doseNode, report)
        self.session.waitForWorker()
        return slider.predict()

    def _dvhRequest(self, inputs: CaseInputs, desiredDVH, doseNode, editedStructures, weights, report,
                    startDose=None) -> DVHRequest:
        """On the calling thread: the DVH model with the case, the desired DVH checked and in the model's
        layout, and the structures to show as edited."""
        predictor, case = self._prepareDVHCase(inputs, doseNode, weights, report)
        structures, present = predictor.structures, self._presentStructures(predictor, case)

        def check_names(names, what):
            for name in names:
                if name not in structures:
                    raise DesiredDVHError(f"{what}: the DVH model does not know the structure '{name}' (it reads: "
                                          f"{', '.join(structures)})")
                if name not in present:
                    raise DesiredDVHError(f"{what}: {name} is not in the segmentation (or is empty on the case's grid)")

        if isinstance(desiredDVH, Mapping):
            if not desiredDVH:
                raise DesiredDVHError("the desired DVH has no curve")
            check_names(desiredDVH, "desired DVH")
            curves = {name: check_curve(name, *curve) for name, curve in desiredDVH.items()}
        if startDose is None:
            base = self._baseDose(inputs, doseNode, case, report)
        elif np.shape(startDose) != case.geometry.shape:
            raise DesiredDVHError(f"the dose the edit starts from is on a {np.shape(startDose)} grid, the case on "
                                  f"{case.geometry.shape}")
        else:
            base = np.asarray(startDose, np.float32)
        if isinstance(desiredDVH, Mapping):
            vector, edited = predictor.desired_from_curves(curves, base)
        else:
            vector = check_desired_vector(desiredDVH, structures, predictor.card["dvh"]["n_points"])
            edited = present
        if editedStructures is not None:
            check_names(editedStructures, "edited structures")
            edited = [name for name in structures if name in set(editedStructures)]
        return DVHRequest(predictor, case, vector, list(edited), base)

    def _showDVHPrediction(self, request: DVHRequest, done, start: float, inputs: CaseInputs,
                           targets: DisplayTargets) -> PredictionResult:
        dose, predictSeconds, distances, editReport = done
        predictor = request.predictor
        result = self._showPrediction(
            request.case, dose, predictSeconds, start, inputs, targets, predictor,
            {"DoseAI.Model": modelName(predictor), "DoseAI.DesiredDVH": ", ".join(request.edited) or "-"},
            reference=predictor.as_dvhs(request.vector, request.edited), referenceLabel="desired")
        result.desiredDVH, result.editedStructures, result.dvhDistancePct = request.vector, request.edited, distances
        result.dvhEditReport = editReport
        return result

    # --- the desired-DVH curve the user drags --------------------------------------------------------
    def desiredDVHTableNode(self, chartNode, session: DVHEditSession, structure: str, segNode=None,
                            overrides: Mapping[str, str | None] | None = None):
        """The desired curve of ``structure`` (from ``session``) as a table node (columns ``Dose [Gy]``,
        ``Volume [%]``) with a dashed series with markers in ``chartNode``, in the segment's colour: a plot
        view in move-points mode (:meth:`setDVHEditMode`) drags its points. One per chart: showing another
        structure reuses the nodes. Returns the table node (its attribute ``DoseAI.EditedStructure`` names
        the structure); :meth:`applyDesiredCurve` reads it back."""
        from doseai.mrml import editable_curve, segment_colors

        dose, volume = session.curve(structure)
        color = segment_colors(segNode, overrides).get(structure) if segNode is not None else None
        return editable_curve(chartNode.GetScene(), chartNode, structure, dose, volume, color)

    @staticmethod
    def readDesiredCurve(tableNode) -> tuple[str, object, object]:
        """``(structure, dose_gy, volume_pct)`` of a table made by :meth:`desiredDVHTableNode` (as dragged)."""
        from doseai.mrml import EDIT_ATTRIBUTE, read_curve

        structure = tableNode.GetAttribute(EDIT_ATTRIBUTE) if tableNode is not None else None
        if not structure:
            raise DesiredDVHError("the table is not a desired-DVH curve (made by desiredDVHTableNode)")
        dose, volume = read_curve(tableNode)
        return structure, dose, volume

    def applyDesiredCurve(self, session: DVHEditSession, tableNode) -> bool:
        """Put the (dragged) curve of ``tableNode`` into ``session``; True when the desired DVH changed. The
        table then shows the curve as taken (clamped to 0..100 %, non-increasing, at the model's doses)."""
        from doseai.mrml import editable_curve, editable_curve_chart

        structure, dose, volume = self.readDesiredCurve(tableNode)
        changed = session.setCurvePoints(structure, dose, volume)
        taken_dose, taken_volume = session.curve(structure)
        if dose.shape != taken_dose.shape or not (np.allclose(dose, taken_dose) and np.allclose(volume, taken_volume)):
            chart = editable_curve_chart(tableNode)
            if chart is not None:
                editable_curve(tableNode.GetScene(), chart, structure, taken_dose, taken_volume)
        return changed

    @staticmethod
    def removeDesiredDVHCurve(chartNode) -> None:
        """Take the draggable curve out of the chart (the desired curves of a prediction stay, dashed)."""
        from doseai.mrml import remove_editable_curve

        remove_editable_curve(chartNode)

    @staticmethod
    def setDVHEditMode(chartNode, enabled: bool) -> int:
        """Plot views showing ``chartNode`` in move-points mode, points moving along the volume axis only
        (``enabled``), or back to pan-view mode. Returns how many plot views showed the chart."""
        from doseai.mrml import set_point_dragging

        return set_point_dragging(chartNode, enabled)

    # --- shared by both predictions -------------------------------------------------------------------
    def _prepareCase(self, inputs: CaseInputs, doseNode, report: Progress, loadPredictor=None):
        """The session's predictor (``loadPredictor()``, default :meth:`predictor`) with the case built from the
        nodes (again only when they changed; one case shared by both models)."""
        from doseai.errors import DoseAIError

        if inputs.ctNode is None or inputs.segNode is None:
            raise DoseAIError("Select the CT volume and the segmentation")
        if self.outputProblem(doseNode):
            raise DoseAIError(self.outputProblem(doseNode))
        if loadPredictor is None:
            if self.session.predictor is None:
                report("Loading the dose prediction model", 5)
            loadPredictor = self.predictor
        predictor = loadPredictor()
        return predictor, self.session.prepare(inputs, predictor, self.doseGridMm, report)

    def _showPrediction(self, case, dose, predictSeconds: float, start: float, inputs: CaseInputs,
                        targets: DisplayTargets, predictor, attributes: Mapping[str, str], reference=None,
                        referenceLabel: str = "reference", bands=None) -> PredictionResult:
        """Put a predicted dose (by ``predictor``, set to ``case``) into the targets' dose node (created when None),
        tagged with ``attributes`` (how it was steered), and show its DVH (dashed: ``reference`` DVHs, else those
        of the reference dose)."""
        from doseai.mrml import create_or_update_dose_node

        shown_at = time.time()
        ctNode = inputs.ctNode
        name = targets.doseNode.GetName() if targets.doseNode is not None else f"{ctNode.GetName()} predicted dose"
        doseNode = create_or_update_dose_node(ctNode.GetScene(), dose, case.geometry, name, ctNode=ctNode,
                                              node=targets.doseNode, display_max_gy=1.1 * case.max_prescription)
        for key in self._provenanceAttributes():
            if key not in attributes and doseNode.GetAttribute(key) is not None:
                doseNode.RemoveAttribute(key)
        for key, value in attributes.items():
            doseNode.SetAttribute(key, value)
        dvh = self._showDVH(case, dose, inputs, name, targets, reference, referenceLabel, bands)
        missing = case.missing(model_oars(getattr(predictor, "base", predictor).card))  # a diffusion model: its base
        logging.info(f"DosePreference: predicted in {predictSeconds:.2f} s, shown in {time.time() - shown_at:.2f} s")
        return PredictionResult(doseNode, dvh, predictSeconds, time.time() - start, missing,
                                caseWarnings=list(predictor.case_warnings))

    def _provenanceAttributes(self) -> list[str]:
        """The attributes that say how a predicted dose was steered: the sliders' of the card, and the rest."""
        conditions = model_conditions(self.modelCard())
        return [c.attribute for c in conditions or ()] + list(PREDICTION_ATTRIBUTES)

    # --- display ---------------------------------------------------------------------------------
    @staticmethod
    def isodoseSegmentation(doseNode, prescriptionGy: float, levels: Sequence[float] | None = None,
                            segmentationNode=None):
        """Isodose lines of ``doseNode``: a segmentation with one segment per level (percent of
        ``prescriptionGy``, default 30/50/70/80/90/95/100/105), shown as outlines; updated in place
        when ``segmentationNode`` is given. (SlicerRT's Isodose module works on the dose too.)"""
        from doseai.mrml import DEFAULT_ISODOSE_LEVELS_PCT, isodose_segmentation

        return isodose_segmentation(doseNode, prescriptionGy, levels or DEFAULT_ISODOSE_LEVELS_PCT,
                                    node=segmentationNode)

    # --- export ----------------------------------------------------------------------------------
    def dicomLookup(self) -> Lookup | None:
        """How to read a tag of a DICOM instance; the Slicer module asks its DICOM database. None
        here: without a database the exported RTDOSE gets fresh study and frame-of-reference UIDs."""
        return None

    def exportResults(
        self,
        ctNode,
        segNode,
        doseNode,
        folder,
        overrides: Mapping[str, str | None] | None = None,
        prescriptions: Mapping[str, float] | None = None,
        force: bool = False,
        lookup: Lookup | None = None,
    ) -> dict[str, Path]:
        """Write ``doseNode`` as RTDOSE and its DVH and metrics as CSV into ``folder`` (file names
        from the dose's name); returns the paths. The RTDOSE refers to the CT's DICOM study and frame
        of reference when the CT came from DICOM (``lookup``, default :meth:`dicomLookup`).

        Nothing is written when any of the files exists, unless ``force``: raises OutputExistsError.
        The DVH is recomputed from the dose node, so the files always describe the dose written.
        """
        from doseai.errors import DoseAIError, OutputExistsError

        if not folder or not str(folder).strip():
            raise DoseAIError("Choose an export folder")
        reason = self.missingInputs(ctNode, segNode, doseNode)
        if reason:
            raise DoseAIError(reason)
        paths = export_paths(folder, safe_file_stem(doseNode.GetName()))
        existing = existing_outputs(paths.values())
        if existing and not force:
            raise OutputExistsError(f"{len(existing)} file(s) exist in {Path(folder)}: "
                                    f"{', '.join(p.name for p in existing)}")
        case = self.session.caseWithDose(CaseInputs(ctNode, segNode, overrides, prescriptions), doseNode,
                                         self.doseGridMm)
        reference = dicom_reference(ctNode, lookup or self.dicomLookup(), segNode)
        reference["DoseDescription"] = self._doseDescription(doseNode)
        write_dose_export(case, doseNode, paths, reference, self.dvhBinWidthGy, force)
        logging.info(f"DosePreference: exported {', '.join(str(p) for p in paths.values())}")
        return paths

    def _doseDescription(self, doseNode) -> str:
        return dose_description(doseNode, model_conditions(self.modelCard()))
