"""DosePreference logic without Qt: MRML nodes in, ``doseai`` core call, MRML nodes out.

``doseai`` is imported inside the methods, so that the module loads in Slicer even before a missing
Python package is installed (that happens when the user first clicks a button, never at import); only
``doseai.packages`` and ``doseai.mrml.dicom`` (numpy, SimpleITK, VTK: bundled with Slicer) load with it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from doseai.mrml.plots import DVHResult
from doseai.packages import BASE_PACKAGES, TORCH_REQUIREMENT, missing_packages

from .export import Lookup, dicom_reference, existing_outputs, export_paths, safe_file_stem
from .mapping import StructureRow, structure_rows

# import name -> pip requirement; what "Compute DVH" needs beyond the doseai package itself
REQUIRED_PACKAGES: dict[str, str] = BASE_PACKAGES
# what each action needs (Slicer bundles numpy and SimpleITK; the rest is installed on first use)
TASK_PACKAGES: dict[str, dict[str, str]] = {
    "dvh": REQUIRED_PACKAGES,
    "predict": {**REQUIRED_PACKAGES, "torch": TORCH_REQUIREMENT, "monai": "monai>=1.4"},
    "export": {**REQUIRED_PACKAGES, "pydicom": "pydicom>=3.0", "contourpy": "contourpy>=1.0",
               "matplotlib": "matplotlib>=3.7"},
}

Progress = Callable[[str, int], None]  # (what is being done, percent done)


def missing_packages_for(task: str) -> list[str]:
    """pip requirements missing for ``task`` ("dvh", "predict" or "export")."""
    return missing_packages(TASK_PACKAGES[task])


def model_oars(card: Mapping | None) -> list[str]:
    """The organ channels of a model card (what the model reads besides CT, targets, body, beams)."""
    if not card:
        return []
    return [name for name in card["inputs"]["channels"] if name not in ("ct", "target_dose", "body", "beam_plate")]


def slider_tooltips(card: Mapping | None) -> dict[str, str]:
    """Tooltip per slider ("oar_sparing", "homogeneity") from the card's slider semantics text: the
    clauses about that slider, then the clauses about both."""
    if not card:
        text = "Model card not found: the slider semantics are unknown."
        return {"oar_sparing": text, "homogeneity": text}
    preference = card["preference"]
    sliders = list(preference.get("sliders", ["oar_sparing", "homogeneity"]))
    clauses = [c.strip() for c in re.split(r"(?<=[.;])\s+", preference.get("text", "")) if c.strip()]
    general = [c for c in clauses if not any(c.startswith(s) for s in sliders)]
    low, high = preference.get("range", (-1.0, 1.0))
    tips = {}
    for slider in sliders:
        own = [c.rstrip(";") + "." if c.endswith(";") else c for c in clauses if c.startswith(slider)]
        tips[slider] = " ".join(own + general + [f"Range [{low:g}, {high:g}]."]).replace("..", ".")
    return tips


@dataclass
class PredictionResult:
    """What :meth:`DosePreferenceLogic.predict` made: the dose node, its DVH (chart, table, metrics),
    how long the prediction and the whole update took, and the model structures the case lacks."""

    doseNode: object
    dvh: DVHResult
    predictSeconds: float
    totalSeconds: float
    missingStructures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"Predicted in {self.predictSeconds:.2f} s (update {self.totalSeconds:.2f} s). {self.dvh.summary()}"
        if self.missingStructures:
            text += f". Not in the segmentation (empty model inputs): {', '.join(self.missingStructures)}"
        return text


class PendingPrediction:
    """A prediction running on the worker thread (see :meth:`DosePreferenceLogic.predictAsync`)."""

    def __init__(self, future, show: Callable) -> None:
        self._future, self._show = future, show

    def done(self) -> bool:
        return self._future.done()

    def finish(self) -> PredictionResult:
        """Wait if needed, then update the dose node and the DVH; call on the main thread. Raises what
        the prediction raised."""
        return self._show(self._future.result())


class DosePreferenceLogic:
    """Dose prediction steered by preference sliders, DVHs, isodose lines and export.

    Usable without the module GUI, in the Slicer Python console or in a batch script::

        logic = DosePreferenceLogic()
        result = logic.predict(ctNode, segNode, oarSparing=0.5)
        result = logic.computeDVH(ctNode, segNode, doseNode)
    """

    def __init__(self) -> None:
        self.dvhBinWidthGy = 0.1
        self._referenceKey = None
        self._referenceDVHs = None

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
        ct = cts[0] if cts else None
        segmentation = segmentations[0] if segmentations else None
        dose = next((volume for volume in doses if not volume.GetAttribute("DoseAI.Model")), None)
        return ct, segmentation, dose

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
        if segNode is None:
            return []
        segmentation = segNode.GetSegmentation()
        return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]

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
        from doseai.mrml import case_from_nodes

        start = time.time()
        case = case_from_nodes(ctNode, segNode, doseNode, overrides=overrides, prescriptions=prescriptions)
        result = self._showDVH(case, case.dose, segNode, doseNode.GetName(), overrides, chartNode, metricsTableNode,
                               referenceDoseNode)
        logging.info(f"DosePreference: DVH of {len(result.dvhs)} structures in {time.time() - start:.2f} s")
        return result

    def _showDVH(self, case, dose, segNode, name, overrides=None, chartNode=None, metricsTableNode=None,
                 referenceDoseNode=None) -> DVHResult:
        """DVH curves (segment colours) in a chart and metrics in a table, both named after ``name``."""
        from doseai.mrml import show_case_dvh

        return show_case_dvh(case, dose, segNode, name, overrides, chartNode, metricsTableNode,
                             reference=self.referenceDVHs(case, referenceDoseNode), bin_width_gy=self.dvhBinWidthGy)

    def referenceDVHs(self, case, referenceDoseNode) -> dict | None:
        """DVHs of a reference dose (e.g. the clinical plan's RTDOSE) for the structures of ``case``,
        resampled onto the case grid when on another grid; cached while neither changes, so moving a
        slider does not recompute them."""
        if referenceDoseNode is None:
            return None
        image = referenceDoseNode.GetImageData()
        key = (id(case), referenceDoseNode.GetID(), referenceDoseNode.GetMTime(), image.GetMTime() if image else 0)
        if key != self._referenceKey:
            from doseai.mrml import dose_on_grid
            from doseai.report import case_dvhs

            dose = dose_on_grid(referenceDoseNode, case.geometry, "reference dose")
            self._referenceKey = key
            self._referenceDVHs = case_dvhs(case, dose, bin_width_gy=self.dvhBinWidthGy)
        return self._referenceDVHs

    # --- prediction ------------------------------------------------------------------------------
    _predictor = None  # shared by every logic instance: the model is loaded once per Slicer session

    @classmethod
    def predictor(cls, weights=None, device: str = "auto"):
        """The cached :class:`doseai.predict.DosePredictor` (loaded on first use)."""
        from doseai.predict import DosePredictor

        shared = DosePreferenceLogic  # not cls: the module's subclass must share the one loaded model
        if shared._predictor is None or (weights and str(shared._predictor.weights) != str(weights)):
            shared._predictor = DosePredictor(weights, device=device)
        return shared._predictor

    @classmethod
    def modelCard(cls, weights=None) -> dict | None:
        """The model card of the loaded model, else of ``weights`` (default: the shipped model), read
        without loading torch; None when there is no card."""
        if DosePreferenceLogic._predictor is not None and not weights:
            return DosePreferenceLogic._predictor.card
        from doseai.errors import UnreadableInputError
        from doseai.predict import DEFAULT_MODEL, load_card

        try:
            return load_card(Path(weights) if weights else DEFAULT_MODEL)
        except UnreadableInputError:
            return None

    def predict(
        self,
        ctNode,
        segNode,
        oarSparing: float = 0.0,
        homogeneity: float = 0.0,
        doseNode=None,
        overrides: Mapping[str, str | None] | None = None,
        prescriptions: Mapping[str, float] | None = None,
        chartNode=None,
        metricsTableNode=None,
        referenceDoseNode=None,
        progress: Progress | None = None,
    ) -> PredictionResult:
        """Predict the dose for the CT and segmentation, steered by the two sliders (each in [-1, 1],
        0 = the typical plan); create (or update ``doseNode``) the RT dose volume and show its DVH
        (with the DVH of ``referenceDoseNode`` dashed, when given).

        The case is rebuilt from the nodes only when they changed since the last call: moving a slider
        re-runs only the slider-dependent half of the network. ``progress(text, percent)`` is told
        what is being done.
        """
        report = progress or (lambda text, percent: None)
        start = time.time()
        predictor, case = self._prepareCase(ctNode, segNode, doseNode, overrides, prescriptions, report)
        report("Predicting the dose", 60)
        self._waitForWorker()  # one prediction at a time
        dose = predictor.predict(oarSparing, homogeneity)
        report("Updating the dose volume and the DVH", 85)
        result = self._showPrediction(
            case, dose, time.time() - start, start, ctNode, segNode, oarSparing, homogeneity, doseNode,
            overrides, chartNode, metricsTableNode, referenceDoseNode)
        report("Done", 100)
        return result

    def predictAsync(self, ctNode, segNode, oarSparing: float = 0.0, homogeneity: float = 0.0, doseNode=None,
                     overrides=None, prescriptions=None, chartNode=None, metricsTableNode=None,
                     referenceDoseNode=None) -> "PendingPrediction":
        """Like :meth:`predict`, but the network runs on a worker thread so that the GUI stays responsive
        while a slider moves (torch releases the GIL). Call ``finish()`` of the returned object on the main
        thread once ``done()``: it updates the MRML nodes. Reading MRML (a changed case) happens here, on
        the calling thread, before the work is handed over."""
        import concurrent.futures

        start = time.time()
        predictor, case = self._prepareCase(ctNode, segNode, doseNode, overrides, prescriptions, lambda *a: None)
        if DosePreferenceLogic._worker is None:  # one worker: predictions never run side by side
            DosePreferenceLogic._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="DoseAI")
        def run():
            return predictor.predict(oarSparing, homogeneity), time.time() - start

        future = DosePreferenceLogic._worker.submit(run)

        def show(done):
            dose, predictSeconds = done
            return self._showPrediction(case, dose, predictSeconds, start, ctNode, segNode, oarSparing,
                                        homogeneity, doseNode, overrides, chartNode, metricsTableNode,
                                        referenceDoseNode)

        return PendingPrediction(future, show)

    _worker = None  # the thread pool of predictAsync, shared like the predictor

    @staticmethod
    def _waitForWorker() -> None:
        if DosePreferenceLogic._worker is not None:
            DosePreferenceLogic._worker.submit(lambda: None).result()

    def _prepareCase(self, ctNode, segNode, doseNode, overrides, prescriptions, report):
        """The cached predictor, with the case built from the nodes (again only when they changed)."""
        from doseai.errors import DoseAIError
        from doseai.mrml import case_from_nodes

        if ctNode is None or segNode is None:
            raise DoseAIError("Select the CT volume and the segmentation")
        if self.outputProblem(doseNode):
            raise DoseAIError(self.outputProblem(doseNode))
        if DosePreferenceLogic._predictor is None:
            report("Loading the dose prediction model", 5)
        predictor = self.predictor()
        key = (ctNode.GetID(), ctNode.GetMTime(), ctNode.GetImageData().GetMTime() if ctNode.GetImageData() else 0,
               segNode.GetID(), segNode.GetSegmentation().GetMTime(), repr(overrides), repr(prescriptions))
        cache = DosePreferenceLogic  # the case cache describes the shared predictor, so it is shared too
        if key != cache._caseKey or predictor is not cache._casePredictor:
            report("Preparing the case (structures on the CT grid, model inputs)", 20)
            self._waitForWorker()  # a running slider update must not see the case change
            case = case_from_nodes(ctNode, segNode, overrides=overrides, prescriptions=prescriptions)
            predictor.set_case(case)
            cache._caseKey, cache._case, cache._casePredictor = key, case, predictor
        return predictor, cache._case

    def _showPrediction(self, case, dose, predictSeconds, start, ctNode, segNode, oarSparing, homogeneity,
                        doseNode, overrides, chartNode, metricsTableNode, referenceDoseNode) -> PredictionResult:
        """Put a predicted dose into the dose node (created when None) and show its DVH."""
        from doseai.mrml import create_or_update_dose_node

        predictor = self.predictor()
        shown_at = time.time()
        name = doseNode.GetName() if doseNode is not None else f"{ctNode.GetName()} predicted dose"
        doseNode = create_or_update_dose_node(ctNode.GetScene(), dose, case.geometry, name, ctNode=ctNode,
                                              node=doseNode, display_max_gy=1.1 * case.max_prescription)
        doseNode.SetAttribute("DoseAI.OarSparing", f"{oarSparing:g}")
        doseNode.SetAttribute("DoseAI.Homogeneity", f"{homogeneity:g}")
        doseNode.SetAttribute("DoseAI.Model", predictor.card["name"])
        dvh = self._showDVH(case, dose, segNode, name, overrides, chartNode, metricsTableNode, referenceDoseNode)
        missing = case.missing(model_oars(predictor.card))
        logging.info(f"DosePreference: predicted in {predictSeconds:.2f} s, shown in {time.time() - shown_at:.2f} s")
        return PredictionResult(doseNode, dvh, predictSeconds, time.time() - start, missing)

    # the case the cached predictor holds, and the inputs it was made from
    _caseKey = None
    _case = None
    _casePredictor = None

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
        from doseai.io.dicom import write_rtdose
        from doseai.mrml import case_from_nodes, geometry_from_volume_node, volume_array
        from doseai.report import case_dvhs, case_metrics, write_dvh_csv, write_metrics_csv

        case = case_from_nodes(ctNode, segNode, doseNode, overrides=overrides, prescriptions=prescriptions)
        reference = dicom_reference(ctNode, lookup or self.dicomLookup(), segNode)
        reference["DoseDescription"] = self._doseDescription(doseNode)
        write_rtdose(volume_array(doseNode), geometry_from_volume_node(doseNode), paths["rtdose"], reference,
                     force=force)
        write_dvh_csv(case_dvhs(case, case.dose, bin_width_gy=self.dvhBinWidthGy), paths["dvh"], force=force)
        write_metrics_csv(case_metrics(case, case.dose), paths["metrics"], force=force)
        logging.info(f"DosePreference: exported {', '.join(str(p) for p in paths.values())}")
        return paths

    @staticmethod
    def _doseDescription(doseNode) -> str:
        """Series description of the RTDOSE (DICOM LO: at most 64 characters)."""
        model = doseNode.GetAttribute("DoseAI.Model")
        if not model:
            return doseNode.GetName()[:64]
        oar = float(doseNode.GetAttribute("DoseAI.OarSparing") or 0)
        hi = float(doseNode.GetAttribute("DoseAI.Homogeneity") or 0)
        return f"DoseAI {model} OAR {oar:+.2f} HI {hi:+.2f}"[:64]
