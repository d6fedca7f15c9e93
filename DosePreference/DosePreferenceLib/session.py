"""What the logic keeps between predictions, as one explicit object: the loaded models, the case they are set to,
the worker thread and the reference DVHs; and the small records a prediction is asked with (the case's inputs,
where its results are shown).

One :class:`PredictionSession` per Slicer process is shared (:data:`SHARED_SESSION`): the module's logic and one
made in the Python console then use the same loaded model. A logic may be given its own (tests, batch work).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

Progress = Callable[[str, int], None]  # told (what is being done, percent)


@dataclass(frozen=True)
class CaseInputs:
    """What a case is made of: the CT and segmentation nodes, the structure mapping (raw segment name ->
    canonical name, or None to leave it out) and the prescriptions (Gy) of targets whose names hold none."""

    ctNode: object
    segNode: object
    overrides: Mapping[str, str | None] | None = None
    prescriptions: Mapping[str, float] | None = None

    def key(self, doseGridMm: float | None) -> tuple:
        """What a cached case is made from: the nodes as they are now, the mapping and the dose grid."""
        image = self.ctNode.GetImageData()
        return (self.ctNode.GetID(), self.ctNode.GetMTime(), image.GetMTime() if image else 0, self.segNode.GetID(),
                self.segNode.GetSegmentation().GetMTime(), repr(self.overrides), repr(self.prescriptions), doseGridMm)


@dataclass(frozen=True)
class DisplayTargets:
    """Where a prediction is shown: the dose volume (None: a new one), the DVH chart and metrics table (None:
    new ones), and a dose whose DVH is drawn dashed for comparison."""

    doseNode: object = None
    chartNode: object = None
    metricsTableNode: object = None
    referenceDoseNode: object = None


class PendingPrediction:
    """A prediction running on the worker thread (see :meth:`DosePreferenceLogic.predictAsync` and
    :meth:`~DosePreferenceLogic.predictFromDVHAsync`)."""

    def __init__(self, future, show: Callable) -> None:
        self._future, self._show = future, show

    def done(self) -> bool:
        return self._future.done()

    def finish(self):
        """Wait if needed, then update the dose node and the DVH; call on the main thread. Raises what
        the prediction raised."""
        return self._show(self._future.result())


class PredictionSession:
    """The loaded models (slider model, DVH-conditioned model), the case they are set to (rebuilt only when its
    inputs change; one case shared by both), one worker thread (predictions never run side by side) and the
    DVHs of the last reference dose."""

    def __init__(self) -> None:
        self.predictor = None
        self.dvhPredictor = None
        self.diffusionPredictor = None
        self.caseKey = None
        self.case = None
        self.casePredictors: list = []  # the loaded predictors that are set to ``case``
        self._worker = None
        self._referenceKey = None
        self._referenceDVHs = None

    # --- models ------------------------------------------------------------------------------------
    def sliderModel(self, weights=None, device: str = "auto"):
        """The :class:`doseai.predict.DosePredictor` (loaded on first use and when ``weights`` change)."""
        from doseai.predict import DosePredictor

        if self.predictor is None or (weights and str(self.predictor.weights) != str(weights)):
            self.predictor = DosePredictor(weights, device=device)
        return self.predictor

    def dvhModel(self, weights=None, device: str = "auto"):
        """The :class:`doseai.predict.DVHDosePredictor` (default ``Resources/Models/dose_dvh_v3.pt``), loaded on
        first use and when ``weights`` change; UnreadableInputError when its file is missing."""
        from doseai.errors import UnreadableInputError
        from doseai.predict import DVHDosePredictor

        if self.dvhPredictor is None or (weights and str(self.dvhPredictor.weights) != str(weights)):
            problem = self.dvhModelProblem(weights)
            if problem:
                raise UnreadableInputError(problem)
            self.dvhPredictor = DVHDosePredictor(weights, device=device)
        return self.dvhPredictor

    def diffusionModel(self, weights=None, device: str = "auto"):
        """The :class:`doseai.diffusion_predict.DiffusionDosePredictor` (default
        ``Resources/Models/dose_diffusion_v1.pt``), loaded on first use and when ``weights`` change; it holds its
        own copy of its base preference model (2.5 MB of weights)."""
        from doseai.diffusion_predict import DiffusionDosePredictor

        loaded = self.diffusionPredictor
        if loaded is None or (weights and str(loaded.weights) != str(weights)):
            self.diffusionPredictor = DiffusionDosePredictor(weights, device=device)
        return self.diffusionPredictor

    def dvhModelProblem(self, weights=None) -> str:
        """Why DVH editing cannot load its model (a sentence), or "" (loaded, or the weights file exists)."""
        from doseai.predict import DEFAULT_DVH_MODEL

        loaded = self.dvhPredictor
        if loaded is not None and (not weights or str(loaded.weights) == str(weights)):
            return ""
        path = Path(weights) if weights else DEFAULT_DVH_MODEL
        if path.is_file():
            return ""
        return (f"The DVH model is not found at {path}: DVH editing needs the DVH-conditioned model "
                "(Resources/Models/dose_dvh_v3.pt; made with `doseai train dvh` and `doseai train export-dvh`)")

    def modelCard(self, weights=None) -> dict | None:
        """The card of the loaded slider model, else of ``weights`` (default: the shipped model), read without
        loading torch; None when there is no card."""
        if self.predictor is not None and not weights:
            return self.predictor.card
        from doseai.errors import UnreadableInputError
        from doseai.predict import DEFAULT_MODEL, load_card

        try:
            return load_card(Path(weights) if weights else DEFAULT_MODEL)
        except UnreadableInputError:
            return None

    # --- the worker thread -------------------------------------------------------------------------
    def submit(self, run: Callable, show: Callable) -> PendingPrediction:
        """``run()`` on the worker thread; ``show(its result)`` by ``finish()`` on the main thread."""
        if self._worker is None:  # one worker: predictions never run side by side
            self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="DoseAI")
        return PendingPrediction(self._worker.submit(run), show)

    def waitForWorker(self) -> None:
        if self._worker is not None:
            self._worker.submit(lambda: None).result()

    # --- the case ----------------------------------------------------------------------------------
    def prepare(self, inputs: CaseInputs, predictor, doseGridMm: float | None, report: Progress):
        """The case of ``inputs`` on its dose grid, with ``predictor`` set to it (built again only when the
        inputs changed)."""
        key = inputs.key(doseGridMm)
        if key != self.caseKey:
            from doseai.dose_grid import on_dose_grid
            from doseai.mrml import case_from_nodes

            report("Preparing the case (structures on the CT grid, then on the dose grid)", 20)
            self.waitForWorker()  # a running update must not see the case change
            self.caseKey, self.case, self.casePredictors = None, None, []
            ctGridCase = case_from_nodes(inputs.ctNode, inputs.segNode, overrides=inputs.overrides,
                                         prescriptions=inputs.prescriptions)
            self.case = on_dose_grid(ctGridCase, doseGridMm)
            del ctGridCase  # on a 512 x 512 CT its masks are most of the memory; the dose grid keeps what it needs
            self.caseKey = key
        if not any(prepared is predictor for prepared in self.casePredictors):
            self.waitForWorker()
            predictor.set_case(self.case)
            self.casePredictors = [p for p in self.casePredictors if any(
                p is loaded for loaded in (self.predictor, self.dvhPredictor, self.diffusionPredictor))] + [predictor]
        return self.case

    def caseWithDose(self, inputs: CaseInputs, doseNode, doseGridMm: float | None):
        """The case with the dose of ``doseNode``: the cached case on the dose grid when the dose lies on it (a
        prediction: DVHs and metrics then weigh partial volumes as shown), else the case on the CT grid with
        the dose resampled onto it."""
        from doseai.mrml import case_from_nodes, geometry_from_volume_node, volume_array

        if (self.case is not None and self.caseKey == inputs.key(doseGridMm)
                and geometry_from_volume_node(doseNode).matches(self.case.geometry)):
            return self.case.with_dose(volume_array(doseNode))
        return case_from_nodes(inputs.ctNode, inputs.segNode, doseNode, overrides=inputs.overrides,
                               prescriptions=inputs.prescriptions)

    def referenceDVHs(self, case, referenceDoseNode, binWidthGy: float) -> dict | None:
        """DVHs of a reference dose for the structures of ``case``, resampled onto the case grid when on another
        grid; kept while neither changes, so that moving a slider does not recompute them."""
        if referenceDoseNode is None:
            return None
        image = referenceDoseNode.GetImageData()
        key = (id(case), referenceDoseNode.GetID(), referenceDoseNode.GetMTime(), image.GetMTime() if image else 0)
        if key != self._referenceKey:
            from doseai.mrml import dose_on_grid
            from doseai.report import case_dvhs

            dose = dose_on_grid(referenceDoseNode, case.geometry, "reference dose")
            self._referenceKey = key
            self._referenceDVHs = case_dvhs(case, dose, bin_width_gy=binWidthGy)
        return self._referenceDVHs


SHARED_SESSION = PredictionSession()  # this Slicer process's: the model is loaded once, whichever logic asks
