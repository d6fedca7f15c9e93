"""DosePreference: AI dose prediction for a CT and its structures, steered by preference sliders,
with isodose lines, DVHs, metrics and RTDOSE export.

The Slicer module file stays thin: module metadata, the parameter node, the Widget (Qt) and the
self test. The Qt-free logic lives in ``DosePreferenceLib`` (importable and tested on slicer-core)
and the computations in the ``doseai`` core package.
"""

import importlib.util
import logging
import os
import pathlib
import sys
from typing import Annotated


def _ensureDoseAIImportable():
    """In an installed extension ``doseai`` is copied next to this file; in a developer checkout it
    sits at the repository root, one level up, which is then put on ``sys.path``."""
    if importlib.util.find_spec("doseai") is not None:
        return
    repoRoot = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(os.path.join(repoRoot, "doseai")) and repoRoot not in sys.path:
        sys.path.insert(0, repoRoot)


_ensureDoseAIImportable()

import vtk  # noqa: E402

import slicer  # noqa: E402
from slicer import vtkMRMLPlotChartNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode  # noqa: E402
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper  # noqa: E402
from slicer.ScriptedLoadableModule import (  # noqa: E402
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin  # noqa: E402

import DosePreferenceLib  # noqa: E402
from DosePreferenceLib.help import ACKNOWLEDGEMENT_TEXT, HELP_TEXT  # noqa: E402
from DosePreferenceLib.sliders import POLL_INTERVAL_MS, SLIDER_UPDATE_DELAY_MS  # noqa: E402
from doseai.mrml.app import export_asking_to_overwrite, packages_ready, progress_dialog, show_dose_and_dvh  # noqa: E402


#
# DosePreference
#


class DosePreference(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Dose Preference"
        self.parent.categories = ["Radiotherapy"]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerDoseAI contributors"]
        self.parent.helpText = HELP_TEXT

        self.parent.acknowledgementText = ACKNOWLEDGEMENT_TEXT



#
# DosePreferenceParameterNode
#


@parameterNodeWrapper
class DosePreferenceParameterNode:
    """
    ctVolume: the planning CT; the dose grid is aligned with it (see doseGridMm).
    segmentation: the structures (targets and organs at risk).
    structureMapping: the structure-mapping table as JSON (DosePreferenceLib.rows_to_json).
    outputDose: the predicted dose volume (created by the first Predict when empty).
    doseGridMm: the predicted dose's own grid, the CT's voxels binned to about this spacing; 0: the CT's grid.
    predictionModel: "preference" (one dose, live sliders) or "diffusion" (the mean of ``samples`` doses drawn
    with ``seed``; their voxel-wise spread goes into spreadVolume, their DVH bands into the chart).
    The preference sliders are not fields here: they come from the model card, and their values are kept as
    DoseAI.Slider.<name> parameters of the same node (DosePreferenceLib.sliders).
    showIsodose, isodoseLevels: isodose lines and their levels (percent of the highest prescription).
    isodoseSegmentation: the segmentation that draws the isodose lines.
    referenceDose: a dose whose DVH is shown dashed for comparison.
    dvhChart, metricsTable: the DVH chart and metrics table of the output dose.
    exportFolder: where Export writes.
    """

    ctVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    structureMapping: str = ""
    outputDose: vtkMRMLScalarVolumeNode
    doseGridMm: Annotated[float, WithinRange(0.0, 10.0)] = 2.5
    predictionModel: Annotated[str, Choice(["preference", "diffusion"])] = "preference"
    samples: Annotated[int, WithinRange(2, 32)] = 4
    seed: Annotated[int, WithinRange(0, 99999)] = 0
    spreadVolume: vtkMRMLScalarVolumeNode
    showIsodose: bool = True
    isodoseLevels: str = "30, 50, 70, 80, 90, 95, 100, 105"
    isodoseSegmentation: vtkMRMLSegmentationNode
    referenceDose: vtkMRMLScalarVolumeNode
    dvhChart: vtkMRMLPlotChartNode
    metricsTable: vtkMRMLTableNode
    exportFolder: pathlib.Path


#
# DosePreferenceWidget
#


class DosePreferenceWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._result = None  # the last PredictionResult, for live slider updates
        self._shown = {}  # what the GUI last showed: segmentation, sliders, reference, isodose settings
        self._updating = False  # True while the Widget itself writes the parameter node
        self._card = None  # the model card (slider semantics, model OARs), read once
        self._segmentationObserved = []  # the segmentation whose segment events refresh the table

    def setup(self) -> None:
        import qt

        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DosePreference.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # the .ui connects mrmlSceneChanged(vtkMRMLScene*) of the top-level widget to each node selector
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = DosePreferenceLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        DosePreferenceLib.set_up_mapping_table(self.ui.mappingTable)
        self.ui.mappingTable.connect("itemChanged(QTableWidgetItem*)", self.onMappingEdited)

        # one prediction per slider pause: the timer restarts on every slider step
        self._sliderTimer = qt.QTimer()
        self._sliderTimer.setSingleShot(True)
        self._sliderTimer.setInterval(SLIDER_UPDATE_DELAY_MS)
        self._sliderTimer.connect("timeout()", self.onSliderTimeout)
        # the worker thread's result is picked up on the main thread (MRML is not thread-safe)
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPollPrediction)
        self._pending = None  # a PendingPrediction while the worker computes a slider or DVH update
        self._pendingSliders = None  # the slider values it predicts with (None: from the desired DVH)
        self._sliderMovedWhileBusy = False

        self.dvhEditor = DosePreferenceLib.DVHEditor(self)  # the session of DVH edits, the dragged curve
        self.ui.dvhEditButton.connect("toggled(bool)", self.onDvhEditButton)
        self.ui.dvhUndoButton.connect("clicked(bool)", self.onDvhUndoButton)
        self.ui.dvhResetButton.connect("clicked(bool)", self.onDvhResetButton)
        self.ui.dvhStructureComboBox.connect("currentIndexChanged(int)", self.onDvhStructureChanged)

        # not bound to the parameter node in the .ui: that would rebuild the isodose lines at every keystroke
        self.ui.isodoseLevelsLineEdit.connect("editingFinished()", self.onIsodoseLevelsEdited)
        self.ui.predictButton.connect("clicked(bool)", self.onPredictButton)
        self.ui.resetButton.connect("clicked(bool)", self.onResetButton)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.sliders = DosePreferenceLib.PreferenceSliders(self.ui.slidersWidget, self.onSliderMoved)
        self._readModelCard()

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._sliderTimer.stop()
        self.dvhEditor.timer.stop()
        self._dropPendingUpdate()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # the GUI is brought up to date again when the user comes back to the module
        self._sliderTimer.stop()
        self.dvhEditor.stop()  # the plot view pans again; the edits are kept
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self._dropPendingUpdate()  # its nodes are about to go
        self.dvhEditor.end(touchScene=False)
        self.setParameterNode(None)
        self._result = None
        self._shown = {}

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        parameters = self._parameterNode
        # save the user a few clicks: pick a CT, a segmentation and a reference dose if there are obvious ones
        ct, segmentation, dose = self.logic.defaultInputs(slicer.mrmlScene)
        defaults = {}
        if not parameters.ctVolume and ct:
            defaults["ctVolume"] = ct
        if not parameters.segmentation and segmentation:
            defaults["segmentation"] = segmentation
        if not parameters.referenceDose and dose and dose is not parameters.outputDose:
            defaults["referenceDose"] = dose
        if str(parameters.exportFolder) in ("", "."):
            defaults["exportFolder"] = pathlib.Path(slicer.app.defaultScenePath) / "DoseAI"
        self._setParameters(**defaults)
        # a default reference is not a user's choice: its DVH waits for Predict or a selection
        self._shown["reference"] = parameters.referenceDose
        self.onParameterNodeModified()

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            if self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified):
                self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # widgets with a SlicerParameterName property in the .ui follow the parameter node and back
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            parameters = self._parameterNode
            # what the node holds now is shown as is (a restored scene recomputes nothing until asked)
            self._shown.update(reference=parameters.referenceDose,
                               isodose=(parameters.showIsodose, parameters.isodoseLevels))
            self._shown.pop("segmentation", None)  # but the mapping table is always refilled
            self.onParameterNodeModified()

    # --- reacting to the parameter node ------------------------------------------------------------
    def onParameterNodeModified(self, caller=None, event=None) -> None:
        if self._updating or not self._parameterNode:
            return
        parameters = self._parameterNode
        if self._changed("segmentation", parameters.segmentation):
            self._observeSegmentation(parameters.segmentation)
            self.refreshMappingTable()
        if self._changed("reference", parameters.referenceDose):
            self.onReferenceDoseChanged()
        if self.ui.isodoseLevelsLineEdit.text != parameters.isodoseLevels:
            self.ui.isodoseLevelsLineEdit.text = parameters.isodoseLevels
        if self._changed("isodose", (parameters.showIsodose, parameters.isodoseLevels)):
            self.updateIsodose()
        values = self._sliderValues()
        self.sliders.show(values)  # e.g. a restored scene's
        if self._result is not None and self._changed("sliders", tuple(values.items())):
            self._sliderTimer.start()  # (re)starts: the prediction runs once the slider rests
        self._updateButtons()

    def _changed(self, what: str, value) -> bool:
        """True (and remembered) when ``value`` differs from what the GUI last showed for ``what``."""
        if what in self._shown and self._shown[what] == value:
            return False
        self._shown[what] = value
        return True

    def _observeSegmentation(self, segmentationNode) -> None:
        """Segments added, removed or renamed refresh the mapping table."""
        events = (slicer.vtkSegmentation.SegmentAdded, slicer.vtkSegmentation.SegmentRemoved,
                  slicer.vtkSegmentation.SegmentModified)
        for node in self._segmentationObserved:
            for event in events:
                self.removeObserver(node, event, self.onSegmentsModified)
        self._segmentationObserved = [segmentationNode] if segmentationNode else []
        for event in events if segmentationNode else ():
            self.addObserver(segmentationNode, event, self.onSegmentsModified)

    def onSegmentsModified(self, caller=None, event=None) -> None:
        self.refreshMappingTable()

    def _setParameters(self, **values) -> None:
        """Write the parameter node without reacting to the write."""
        self._updating = True
        try:
            for name, value in values.items():
                setattr(self._parameterNode, name, value)
        finally:
            self._updating = False

    # --- structure mapping -------------------------------------------------------------------------
    def _rows(self):
        return DosePreferenceLib.rows_from_json(self._parameterNode.structureMapping) if self._parameterNode else []

    def refreshMappingTable(self) -> None:
        """Rows from the segment names (edits of segments still present are kept), shown in the table."""
        if not self._parameterNode:
            return
        rows = self.logic.structureRows(self._parameterNode.segmentation, previous=self._rows())
        self._setParameters(structureMapping=DosePreferenceLib.rows_to_json(rows))
        self._fillMappingTable(rows)
        self._updateButtons()

    def _fillMappingTable(self, rows) -> None:
        DosePreferenceLib.fill_mapping_table(self.ui.mappingTable, rows, lambda _index: self.onMappingEdited())

    def onMappingEdited(self, item=None) -> None:
        import qt

        self.dvhEditor.end("The structure table changed: DVH edits discarded.")  # other structures, doses
        rows = DosePreferenceLib.rows_from_table(self.ui.mappingTable)
        for row in rows:  # a segment just made a target gets the prescription its name states
            if row.role == DosePreferenceLib.mapping.TARGET and row.prescriptionGy is None:
                row.prescriptionGy = DosePreferenceLib.default_row(row.canonical).prescriptionGy
        self._setParameters(structureMapping=DosePreferenceLib.rows_to_json(rows))
        # refilled later: the combo box that sent the signal must not be replaced while it emits
        qt.QTimer.singleShot(0, lambda: self._fillMappingTable(self._rows()))
        self._updateButtons()

    def _mappingArguments(self):
        """(overrides, prescriptions) of the mapping table, for every logic call; the logic takes the case's
        dose grid from the panel here too (a changed grid is a new case)."""
        spacing = self._parameterNode.doseGridMm if self._parameterNode else 0.0
        self.logic.doseGridMm = spacing if spacing > 0 else None
        return DosePreferenceLib.mapping_arguments(self._rows())

    # --- buttons -------------------------------------------------------------------------------------
    def _updateButtons(self) -> None:
        parameters = self._parameterNode
        if not parameters:
            return
        check = DosePreferenceLib.check_mapping(self._rows(), DosePreferenceLib.model_oars(self._card))
        if parameters.segmentation is None:
            check = DosePreferenceLib.MappingCheck()
        self.ui.mappingStatusLabel.text = DosePreferenceLib.mapping_html(check)
        reason = ("Select the CT volume" if parameters.ctVolume is None
                  else "Select the segmentation" if parameters.segmentation is None
                  else "Fix the structure table first (see the warning below it)" if not check.ok
                  else self.logic.outputProblem(parameters.outputDose))
        self.ui.predictButton.enabled = not reason
        self.ui.predictButton.toolTip = reason or "Predict the dose for the CT and structures"
        canExport = not self.logic.missingInputs(parameters.ctVolume, parameters.segmentation, parameters.outputDose)
        self.ui.exportButton.enabled = canExport
        self.ui.exportButton.toolTip = ("Write the output dose as RTDOSE and its DVH and metrics as CSV" if canExport
                                        else "Predict a dose first (or select an output dose)")
        conditions = self.sliders.conditions
        self.ui.resetButton.enabled = bool(conditions) and not conditions.is_neutral(self._sliderValues())
        self.dvhEditor.updateButtons()

    def _readModelCard(self) -> None:
        """The card gives the sliders (names, ranges, labels, tooltips) and the OARs the model reads (no torch
        needed)."""
        self._card = self.logic.modelCard()
        self.sliders.build(DosePreferenceLib.model_conditions(self._card))
        self.sliders.show(self._sliderValues())

    def _sliderValues(self) -> dict:
        """The sliders' values by name, as the parameter node keeps them."""
        node = self._parameterNode.parameterNode if self._parameterNode else None
        return DosePreferenceLib.stored_values(node, self.sliders.conditions or ())

    def onSliderMoved(self, name: str, value: float) -> None:
        """A user's move goes into the parameter node (whose observer then schedules the prediction)."""
        if self._parameterNode:
            DosePreferenceLib.store_values(self._parameterNode.parameterNode, {name: value})

    def _sampling(self) -> bool:
        """Whether Predict draws samples with the diffusion model (the model choice in the parameter node)."""
        return bool(self._parameterNode) and self._parameterNode.predictionModel == "diffusion"

    def onPredictButton(self) -> None:
        from doseai.errors import CancelledError

        if not self._installPackages("sample" if self._sampling() else "predict"):  # asked before the wait cursor
            return
        with slicer.util.tryWithErrorDisplay("Failed to predict the dose.", waitCursor=True):
            self.dvhEditor.end("Predict started over from the sliders: DVH edits discarded.")
            try:
                with progress_dialog("Predicting the dose") as progress:
                    result = self._predict(progress=progress)
            except CancelledError:
                self.ui.statusLabel.text = "Prediction cancelled."
                return
            self._readModelCard()  # the card of the model just loaded
            self._showResult(result)

    def _predict(self, progress=None):
        """Predict with the current settings and remember the result (shared by Predict and the sliders)."""
        parameters = self._parameterNode
        overrides, prescriptions = self._mappingArguments()
        values = self._sliderValues()
        common = {"doseNode": parameters.outputDose, "overrides": overrides, "prescriptions": prescriptions,
                  "chartNode": parameters.dvhChart, "metricsTableNode": parameters.metricsTable,
                  "referenceDoseNode": parameters.referenceDose, "progress": progress}
        if self._sampling():
            result = self.logic.sampleDoses(parameters.ctVolume, parameters.segmentation, parameters.samples,
                                            parameters.seed, values, spreadNode=parameters.spreadVolume, **common)
            self._setParameters(spreadVolume=result.spreadNode)
        else:
            result = self.logic.predict(parameters.ctVolume, parameters.segmentation, values, **common)
        return self._acceptResult(result, tuple(values.items()))

    def _acceptResult(self, result, sliders):
        """Remember a prediction made with these slider values (None: from the desired DVH) and show its
        summary and isodose lines."""
        self._result = result
        if sliders is not None:
            self._shown["sliders"] = sliders
        self._setParameters(outputDose=result.doseNode, dvhChart=result.dvh.chartNode,
                            metricsTable=result.dvh.metricsTableNode)
        self.updateIsodose()
        self.ui.statusLabel.text = result.summary()
        self._updateButtons()
        return result

    def _startSliderPrediction(self, overrides, prescriptions) -> None:
        """The sliders' dose on the worker thread (``self._pending``), remembering which values it is for."""
        parameters, values = self._parameterNode, self._sliderValues()
        self._pending = self.logic.predictAsync(
            parameters.ctVolume, parameters.segmentation, values, doseNode=parameters.outputDose, overrides=overrides, prescriptions=prescriptions,
            chartNode=parameters.dvhChart, metricsTableNode=parameters.metricsTable,
            referenceDoseNode=parameters.referenceDose)
        self._pendingSliders = tuple(values.items())

    def onSliderTimeout(self) -> None:
        """Live update after a slider rested: the network runs on a worker thread so the GUI never stalls;
        values that change meanwhile are predicted as soon as it is free (only the latest counts)."""
        parameters = self._parameterNode
        if self._result is None or not parameters or parameters.outputDose is not self._result.doseNode:
            return
        if self._sampling():  # drawing samples takes seconds: not on every slider rest
            self.ui.statusLabel.text = "Sliders changed: press Predict to draw the samples at these values."
            return
        self.dvhEditor.end("The sliders changed the dose: DVH edits discarded.")
        if self._pending is not None:
            self._sliderMovedWhileBusy = True
            return
        try:
            self._startSliderPrediction(*self._mappingArguments())
            self.ui.statusLabel.text = "Updating the dose..."
            self._pollTimer.start()
        except Exception as error:  # shown, not raised: a dialog per slider step would be unusable
            self._sliderUpdateFailed(error)

    def onPollPrediction(self) -> None:
        """Main thread: once the worker is done, put its dose into MRML and start the next update."""
        if self._pending is None or not self._pending.done():
            return
        self._pollTimer.stop()
        pending, self._pending = self._pending, None
        try:
            self._acceptResult(pending.finish(), self._pendingSliders)
            if self.dvhEditor.session is not None:
                self.ui.dvhStatusLabel.text = self.dvhEditor.status()
        except Exception as error:
            self._sliderUpdateFailed(error)
        if self._sliderMovedWhileBusy:
            self._sliderMovedWhileBusy = False
            self.onSliderTimeout()
        elif self.dvhEditor.changedWhileBusy:
            self.dvhEditor.changedWhileBusy = False
            self.dvhEditor.requestPrediction()

    def _dropPendingUpdate(self) -> None:
        self._pollTimer.stop()
        self._pending, self._sliderMovedWhileBusy, self.dvhEditor.changedWhileBusy = None, False, False

    def _sliderUpdateFailed(self, error) -> None:
        logging.exception("DosePreference: slider update failed")
        self.ui.statusLabel.text = f"Update failed: {error}"

    # --- DVH editing (DosePreferenceLib.dvh_editor) ---------------------------------------------------
    def onDvhEditButton(self, checked) -> None:
        self.dvhEditor.onEditButton(checked)

    def onDvhUndoButton(self) -> None:
        self.dvhEditor.undo()

    def onDvhResetButton(self) -> None:
        self.dvhEditor.reset()

    def onDvhStructureChanged(self, index=None) -> None:
        self.dvhEditor.onStructureChanged(index)

    def onResetButton(self) -> None:
        neutral = {c.name: c.neutral for c in self.sliders.conditions or ()}
        DosePreferenceLib.store_values(self._parameterNode.parameterNode, neutral)

    def updateIsodose(self) -> None:
        """Isodose lines of the output dose at the chosen levels, or hidden."""
        from doseai.errors import DoseAIError
        from doseai.mrml import show_isodose_lines

        parameters = self._parameterNode
        if not parameters or self._result is None or self._result.doseNode is not parameters.outputDose:
            return
        try:
            isodose = show_isodose_lines(parameters.outputDose, self._result.dvh.case.max_prescription,
                                         parameters.isodoseLevels, parameters.isodoseSegmentation,
                                         visible=parameters.showIsodose)
        except DoseAIError as error:
            self.ui.statusLabel.text = str(error)
            return
        self._setParameters(isodoseSegmentation=isodose)

    def onIsodoseLevelsEdited(self) -> None:
        """The typed levels go to the parameter node (and so to the isodose lines) once editing ends."""
        text = self.ui.isodoseLevelsLineEdit.text.strip()
        if self._parameterNode and text != self._parameterNode.isodoseLevels:
            self._parameterNode.isodoseLevels = text

    def onReferenceDoseChanged(self) -> None:
        """Dashed reference curves in the output dose's chart; without a prediction, the reference's own DVH."""
        parameters = self._parameterNode
        reference = parameters.referenceDose
        if parameters.ctVolume is None or parameters.segmentation is None:
            return
        with slicer.util.tryWithErrorDisplay("Failed to compute the reference DVH.", waitCursor=True):
            overrides, prescriptions = self._mappingArguments()
            if self._result is not None and self._result.doseNode is parameters.outputDose:
                result = self.logic.computeDVH(
                    parameters.ctVolume, parameters.segmentation, parameters.outputDose, overrides, prescriptions,
                    parameters.dvhChart, parameters.metricsTable, referenceDoseNode=reference)
            elif reference is not None and reference is not parameters.ctVolume:
                result = self.logic.computeDVH(parameters.ctVolume, parameters.segmentation, reference, overrides,
                                               prescriptions)
            else:
                return
            self.ui.statusLabel.text = result.summary()
            self._showViews(result.chartNode, result.metricsTableNode)

    def onExportButton(self) -> None:
        if not self._installPackages("export"):
            return
        parameters = self._parameterNode
        overrides, prescriptions = self._mappingArguments()
        arguments = (parameters.ctVolume, parameters.segmentation, parameters.outputDose,
                     parameters.exportFolder, overrides, prescriptions)
        paths = export_asking_to_overwrite(lambda force: self.logic.exportResults(*arguments, force=force),
                                           "Failed to export.")
        if paths is not None:
            self.ui.statusLabel.text = "Exported " + ", ".join(path.name for path in paths.values()) + \
                f" to {parameters.exportFolder}"

    # --- showing results -----------------------------------------------------------------------------
    def _showResult(self, result) -> None:
        """Dose over the CT in the slice views, DVH chart and metrics table in the plot and table views."""
        self._showViews(result.dvh.chartNode, result.dvh.metricsTableNode, result.doseNode)

    def _showViews(self, chartNode, tableNode, doseNode=None) -> None:
        show_dose_and_dvh(self._parameterNode.ctVolume, doseNode, chartNode, tableNode)

    # --- dependencies --------------------------------------------------------------------------------
    def _installPackages(self, task: str) -> bool:
        """Python packages are installed when first needed, after the user agrees; never at import.
        torch first (through the PyTorch extension where present), then the rest with pip (see
        doseai.mrml.app), after one question that lists them. False: the user declined, or installing
        failed (the error is shown)."""
        return packages_ready(lambda: DosePreferenceLib.missing_packages_for(task), "Dose Preference",
                              DosePreferenceLib.TASK_PACKAGES[task])


#
# DosePreferenceLogic
#


class DosePreferenceLogic(ScriptedLoadableModuleLogic, DosePreferenceLib.DosePreferenceLogic):
    """Qt-free computations, see :class:`DosePreferenceLib.DosePreferenceLogic`; this class adds the
    parameter node and Slicer's DICOM database. From the Python console::

        logic = DosePreference.DosePreferenceLogic()
        result = logic.predict(ctNode, segNode, oarSparing=0.5)
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        DosePreferenceLib.DosePreferenceLogic.__init__(self)

    def getParameterNode(self):
        return DosePreferenceParameterNode(super().getParameterNode())

    def dicomLookup(self):
        """Tags of the instances in Slicer's DICOM database (what an exported RTDOSE refers to)."""
        from doseai.mrml.dicom import database_lookup

        return database_lookup(getattr(slicer, "dicomDatabase", None))


#
# DosePreferenceTest (DosePreferenceLib/selftest.py: what Slicer's Reload & Test and ctest run)
#

from DosePreferenceLib.selftest import DosePreferenceTest  # noqa: E402

DosePreferenceTest.logicClass = DosePreferenceLogic
