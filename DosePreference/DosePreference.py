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
import tempfile
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
from slicer import (  # noqa: E402
    vtkMRMLPlotChartNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
)
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper  # noqa: E402
from slicer.ScriptedLoadableModule import (  # noqa: E402
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin  # noqa: E402

import DosePreferenceLib  # noqa: E402
from doseai.mrml.app import (  # noqa: E402
    export_asking_to_overwrite,
    in_slicer_application,
    packages_ready,
    progress_dialog,
    show_dose_and_dvh,
)

SLIDER_UPDATE_DELAY_MS = 150  # a slider update waits until the slider rested this long (debounce)
POLL_INTERVAL_MS = 20  # how often the GUI looks whether the worker thread has finished a dose

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
        self.parent.helpText = """
<p>Predicts a 3D dose for a planning CT and its structures with the AI model shipped with the
extension (head-and-neck IMRT, trained on OpenKBP), and lets you steer it with two preference sliders.</p>
<ol>
<li><b>Inputs</b>: select the CT and the segmentation. The table lists each segment with the structure
name the model uses (matched automatically, e.g. <i>Lt Parotid</i> &rarr; <i>Parotid_L</i>,
<i>PTV7000</i> &rarr; <i>PTV_70</i>), its role (target, OAR, body, ignored) and, for targets, the
prescription in Gy; double-click a name or a prescription to correct it, pick the role from its list.
A red warning names what is missing: at least one target (PTV) with a prescription is required. OARs the model knows but the segmentation lacks are
listed; they are treated as absent.</li>
<li><b>Predict dose</b>: the first click installs missing or too old Python packages after one question
that lists them (PyTorch through the PyTorch extension when it is installed, and MONAI), loads the model and
predicts; CPU is enough. The progress dialog's <i>Cancel</i> stops it between steps.
After the network, a calibration fitted on training plans (from the model card) brings a dose whose level
in the highest target lies outside the training plans' range back onto it, raises the cold part of
each target toward its prescription and lowers the OARs' hottest voxels outside targets: the network's dose
is smooth where a plan is steep. The status line warns of an OAR far larger or smaller than any in the
training cases (most likely another structure under its name), which the network would misread, and of
targets reaching beyond the model's field (about 50 &times; 31 &times; 32&nbsp;cm), where the dose is 0.
The dose lies on a grid of its own, as a planning system keeps an RTDOSE: the CT's voxels binned to about
the <i>Dose grid</i> spacing (default 2.5&nbsp;mm; 0 = the CT's grid), aligned with the CT, over the body; its DVH
weighs the structures' boundary voxels by their partial volume. On a 512 &times; 512 CT this keeps a slider change
near 0.3&nbsp;s. The dose appears over the CT with the dose colour table (0 to 110&nbsp;% of the highest prescription),
under the CT's study in the Data module, tagged as an RT dose (so SlicerRT's modules accept it).</li>
<li><b>Preferences</b>: <i>OAR sparing</i> and <i>PTV homogeneity</i> (&minus;1 to 1, 0 = the typical
plan of the training data) re-predict the dose, isodose lines and DVH once a dose was predicted, each
time the slider rests for 150&nbsp;ms (only the slider-dependent half of the network runs again, on a
worker thread, so the views stay responsive while it computes).
Their tooltips quote the model card. <i>Reset</i> sets both to 0.</li>
<li><b>DVH editing</b>: shapes the dose by its DVH, with a second model that predicts the dose from a
desired DVH (<code>Resources/Models/dose_dvh_v3.pt</code>, loaded on first use). Once a dose was predicted,
pick a structure and press <i>Edit DVH</i>: its desired curve appears in the DVH chart, dashed with
markers, and the plot view switches to moving points; drag the markers up or down (the doses stay
where they are; the curve is kept between 0 and 100&nbsp;% and non-increasing). Each time the curve
rests for 150&nbsp;ms, on the worker thread, the dose before editing is changed by what the desired DVH
(edited curves as drawn, the other structures as in the dose before editing) asks: the model's dose for the
desired DVH less its dose for the DVH before editing, scaled by the card's per-structure gain, is added to it,
so no edit changes nothing and an edit moves the other structures only as the trade-off does. The chart shows
the new DVH solid and the desired curves of the edited structures dashed; the status line gives each edited
structure's mean dose and D0.1cc against what its curve asks (a curve out of reach shows there).
<i>Undo</i> takes the last change back, <i>Reset</i> drops every edit (the dose before editing again).
Releasing <i>Edit DVH</i> returns the plot view to panning; moving a slider or <i>Predict dose</i>
discards the edits. Only the curve with markers is read: the plot view lets the solid curves be dragged
too, but such a move is ignored and redrawn at the next prediction.</li>
<li><b>Display and DVH</b>: isodose lines at the given percentages of the highest prescription
(default 30, 50, 70, 80, 90, 95, 100, 105&nbsp;%), drawn as outlines of an isodose segmentation.
The DVH chart (one curve per structure, in segment colours) and the metrics table (volume, Dmean,
Dmax, Dmin, D0.1cc, D2, D50, D95, D98; for targets HI, Paddick CI, V100&nbsp;% and V95&nbsp;%; for
organs V20, V30, V50&nbsp;Gy) appear in the plot and table views. A <i>reference dose</i> (e.g. the clinical RTDOSE) adds its
DVH as dashed curves; without a prediction, selecting it shows its own DVH.</li>
<li><b>Export</b>: writes the output dose as RTDOSE (in the CT's DICOM study and frame of reference
when the CT was loaded from DICOM, new UIDs otherwise) with the RTPLAN it references (a minimal plan that says
the dose is a prediction: research intent, unapproved, the prescriptions, no beams) and its DVH and metrics as
CSV into the chosen folder. Existing files are overwritten only after you confirm.</li>
</ol>
<p>Python console: <code>logic = slicer.util.getModuleLogic("DosePreference")</code> (or
<code>DosePreference.DosePreferenceLogic()</code>), then
<code>result = logic.predict(ctNode, segNode, oarSparing=0.5)</code>; <code>result.doseNode</code>,
<code>result.dvh.metrics</code>; <code>logic.computeDVH(ctNode, segNode, doseNode)</code> gives the DVH of
any dose; <code>logic.predictFromDVH(ctNode, segNode, {"Parotid_L": (doseGy, volumePct)},
doseNode=result.doseNode)</code> predicts from edited DVH curves;
<code>logic.predictor().mirror_average = True</code> also runs the network on the left-right mirrored case
and averages the two doses at every slider position (twice the time per slider change); the shipped card's
<code>mirror_neutral</code> does that at neutral sliders only, once per case, and carries the correction to every
slider position (one network run per slider change).
Batch over a folder of DICOM studies:
<code>DosePreference/Scripts/batch_predict.py</code> (see the README).</p>
<p>Needs Slicer 5.10 or newer (tested with the Python packages Slicer 5.10 and 5.12 bundle). SlicerRT, which the
extension depends on, loads DICOM RTSTRUCT and RTDOSE and shows our doses in its Dose Volume Histogram and Isodose
modules like imported ones.</p>
<p>The predicted dose is a model estimate for research, not a deliverable plan.</p>
"""
        self.parent.acknowledgementText = """
Developed in the SlicerDoseAI project. The module layout follows the scripted module template of 3D Slicer;
dose volumes follow the conventions of SlicerRT (DICOM-RT import), so that its Isodose and Dose Volume
Histogram modules work on them too.
"""


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
    oarSparing, homogeneity: the preference sliders.
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
    oarSparing: Annotated[float, WithinRange(-1.0, 1.0)] = 0.0
    homogeneity: Annotated[float, WithinRange(-1.0, 1.0)] = 0.0
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
    MAPPING_COLUMNS = ("Segment", "Structure", "Role", "Rx [Gy]")

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

        table = self.ui.mappingTable
        table.setColumnCount(len(self.MAPPING_COLUMNS))
        table.setHorizontalHeaderLabels(list(self.MAPPING_COLUMNS))
        table.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        table.verticalHeader().visible = False
        table.connect("itemChanged(QTableWidgetItem*)", self.onMappingEdited)

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

        # DVH editing: the session (desired DVH, undo) lives until a slider move or Predict starts over
        self._dvhSession = None
        self._dvhEditing = False  # the plot view drags the desired curve's points
        self._dvhTable = None  # the table of the draggable curve (observed)
        self._dvhWriting = False  # True while the module itself writes that table
        self._dvhFillingCombo = False
        self._dvhChangedWhileBusy = False
        self._dvhTimer = qt.QTimer()  # a dragged curve is predicted once it rests, like a slider
        self._dvhTimer.setSingleShot(True)
        self._dvhTimer.setInterval(SLIDER_UPDATE_DELAY_MS)
        self._dvhTimer.connect("timeout()", self.onDvhCurveTimeout)
        self.ui.dvhEditButton.connect("toggled(bool)", self.onDvhEditButton)
        self.ui.dvhUndoButton.connect("clicked(bool)", self.onDvhUndoButton)
        self.ui.dvhResetButton.connect("clicked(bool)", self.onDvhResetButton)
        self.ui.dvhStructureComboBox.connect("currentIndexChanged(int)", self.onDvhStructureChanged)

        # not bound to the parameter node in the .ui: that would rebuild the isodose lines at every keystroke
        self.ui.isodoseLevelsLineEdit.connect("editingFinished()", self.onIsodoseLevelsEdited)
        self.ui.predictButton.connect("clicked(bool)", self.onPredictButton)
        self.ui.resetButton.connect("clicked(bool)", self.onResetButton)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self._readModelCard()

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._sliderTimer.stop()
        self._dvhTimer.stop()
        self._dropPendingUpdate()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # the GUI is brought up to date again when the user comes back to the module
        self._sliderTimer.stop()
        self._stopDVHEditing()  # the plot view pans again; the edits are kept
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self._dropPendingUpdate()  # its nodes are about to go
        self._endDVHSession(touchScene=False)
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
        if self._result is not None and self._changed("sliders", (parameters.oarSparing, parameters.homogeneity)):
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
        import qt

        table = self.ui.mappingTable
        wasBlocked = table.blockSignals(True)
        table.setRowCount(len(rows))
        for index, row in enumerate(rows):
            segmentItem = qt.QTableWidgetItem(row.segment)
            segmentItem.setFlags(segmentItem.flags() & ~qt.Qt.ItemIsEditable)
            table.setItem(index, 0, segmentItem)
            table.setItem(index, 1, qt.QTableWidgetItem(row.canonical))
            roleBox = qt.QComboBox()
            roleBox.addItems(list(DosePreferenceLib.ROLES))
            roleBox.setCurrentIndex(DosePreferenceLib.ROLES.index(row.role) if row.role in DosePreferenceLib.ROLES else 0)
            roleBox.connect("currentIndexChanged(int)", lambda _index: self.onMappingEdited())
            table.setCellWidget(index, 2, roleBox)
            rxItem = qt.QTableWidgetItem(f"{row.prescriptionGy:g}" if row.prescriptionGy else "")
            if row.role != DosePreferenceLib.mapping.TARGET:
                rxItem.setFlags(rxItem.flags() & ~qt.Qt.ItemIsEditable & ~qt.Qt.ItemIsEnabled)
            table.setItem(index, 3, rxItem)
        table.blockSignals(wasBlocked)

    def _rowsFromTable(self):
        table = self.ui.mappingTable
        rows = []
        for index in range(table.rowCount):
            text = table.item(index, 3).text().strip().replace(",", ".") if table.item(index, 3) else ""
            try:
                prescription = float(text) if text else None
            except ValueError:
                prescription = None  # the mapping check then asks for a prescription
            rows.append(DosePreferenceLib.StructureRow(
                table.item(index, 0).text(), table.item(index, 1).text(),
                table.cellWidget(index, 2).currentText, prescription))
        return rows

    def onMappingEdited(self, item=None) -> None:
        import qt

        self._endDVHSession("The structure table changed: DVH edits discarded.")  # other structures, doses
        rows = self._rowsFromTable()
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
        self.ui.mappingStatusLabel.text = self._mappingHtml(check)
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
        self.ui.resetButton.enabled = parameters.oarSparing != 0.0 or parameters.homogeneity != 0.0
        self._updateDVHButtons()

    @staticmethod
    def _mappingHtml(check) -> str:
        errors = "".join(f'<p style="color:#c00000"><b>&#9888; {text}</b></p>' for text in check.errors)
        notes = "".join(f'<p style="color:#606060">{text}</p>' for text in check.notes)
        return errors + notes

    def _readModelCard(self) -> None:
        """The card gives the slider tooltips and the OARs the model reads (no torch needed)."""
        self._card = self.logic.modelCard()
        tips = DosePreferenceLib.slider_tooltips(self._card)
        self.ui.oarSparingSlider.toolTip = tips.get("oar_sparing", "")
        self.ui.homogeneitySlider.toolTip = tips.get("homogeneity", "")

    def onPredictButton(self) -> None:
        from doseai.errors import CancelledError

        if not self._installPackages("predict"):  # asks before the wait cursor, not under it
            return
        with slicer.util.tryWithErrorDisplay("Failed to predict the dose.", waitCursor=True):
            self._endDVHSession("Predict started over from the sliders: DVH edits discarded.")
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
        result = self.logic.predict(
            parameters.ctVolume, parameters.segmentation, parameters.oarSparing, parameters.homogeneity,
            doseNode=parameters.outputDose, overrides=overrides, prescriptions=prescriptions,
            chartNode=parameters.dvhChart, metricsTableNode=parameters.metricsTable,
            referenceDoseNode=parameters.referenceDose, progress=progress)
        return self._acceptResult(result, (parameters.oarSparing, parameters.homogeneity))

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
        parameters = self._parameterNode
        self._pending = self.logic.predictAsync(
            parameters.ctVolume, parameters.segmentation, parameters.oarSparing, parameters.homogeneity,
            doseNode=parameters.outputDose, overrides=overrides, prescriptions=prescriptions,
            chartNode=parameters.dvhChart, metricsTableNode=parameters.metricsTable,
            referenceDoseNode=parameters.referenceDose)
        self._pendingSliders = (parameters.oarSparing, parameters.homogeneity)

    def onSliderTimeout(self) -> None:
        """Live update after a slider rested: the network runs on a worker thread so the GUI never stalls;
        values that change meanwhile are predicted as soon as it is free (only the latest counts)."""
        parameters = self._parameterNode
        if self._result is None or not parameters or parameters.outputDose is not self._result.doseNode:
            return
        self._endDVHSession("The sliders changed the dose: DVH edits discarded.")
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
            if self._dvhSession is not None:
                self.ui.dvhStatusLabel.text = self._dvhStatus()
        except Exception as error:
            self._sliderUpdateFailed(error)
        if self._sliderMovedWhileBusy:
            self._sliderMovedWhileBusy = False
            self.onSliderTimeout()
        elif self._dvhChangedWhileBusy:
            self._dvhChangedWhileBusy = False
            self._requestDVHPrediction()

    def _dropPendingUpdate(self) -> None:
        self._pollTimer.stop()
        self._pending, self._sliderMovedWhileBusy, self._dvhChangedWhileBusy = None, False, False

    def _sliderUpdateFailed(self, error) -> None:
        logging.exception("DosePreference: slider update failed")
        self.ui.statusLabel.text = f"Update failed: {error}"

    # --- DVH editing ---------------------------------------------------------------------------------
    def onDvhEditButton(self, checked) -> None:
        """Edit on: the desired curve of the chosen structure in the chart, the plot view moving points."""
        if bool(checked) == self._dvhEditing:
            return
        if not checked:
            self._stopDVHEditing()
            return
        try:
            self._startDVHEditing()
        except Exception as error:  # a missing model or a changed input: said in the status line
            logging.exception("DosePreference: DVH editing could not start")
            self._stopDVHEditing()
            self.ui.dvhStatusLabel.text = f"DVH editing unavailable: {error}"

    def _startDVHEditing(self) -> None:
        from doseai.errors import DoseAIError

        parameters = self._parameterNode
        if self._result is None or parameters.outputDose is not self._result.doseNode or not parameters.dvhChart:
            raise DoseAIError("predict a dose first")
        if self._dvhSession is None:
            import qt

            overrides, prescriptions = self._mappingArguments()
            slicer.app.setOverrideCursor(qt.Qt.WaitCursor)  # the first time loads the DVH model
            try:
                self._dvhSession = self.logic.dvhEditSession(parameters.ctVolume, parameters.segmentation,
                                                             parameters.outputDose, overrides, prescriptions)
            finally:
                slicer.app.restoreOverrideCursor()
        self._fillDVHStructures()
        self._dvhEditing = True
        self.ui.dvhEditButton.checked = True
        self._showDesiredCurve()
        self._showViews(parameters.dvhChart, parameters.metricsTable)  # the chart in the plot view
        self.logic.setDVHEditMode(parameters.dvhChart, True)
        self.ui.dvhStatusLabel.text = self._dvhStatus()
        self._updateDVHButtons()

    def _stopDVHEditing(self, touchScene: bool = True) -> None:
        """The draggable curve goes and the plot view pans again; the session (and its edits) stays."""
        self._dvhTimer.stop()
        wasEditing, self._dvhEditing = self._dvhEditing, False
        self.ui.dvhEditButton.checked = False
        if self._dvhTable is not None:
            self.removeObserver(self._dvhTable, vtk.vtkCommand.ModifiedEvent, self.onDvhTableModified)
            self._dvhTable = None
        chart = self._parameterNode.dvhChart if self._parameterNode else None
        if wasEditing and touchScene and chart is not None:
            self.logic.removeDesiredDVHCurve(chart)
            self.logic.setDVHEditMode(chart, False)
        self._updateDVHButtons()

    def _endDVHSession(self, reason: str = "", touchScene: bool = True) -> None:
        """Forget the edits (a slider move or Predict starts over from the sliders)."""
        if self._dvhSession is None:
            return
        hadEdits = bool(self._dvhSession.edited)
        self._stopDVHEditing(touchScene)
        self._dvhSession, self._dvhChangedWhileBusy = None, False
        self.ui.dvhStatusLabel.text = reason if hadEdits else ""
        self._updateDVHButtons()

    def _fillDVHStructures(self) -> None:
        """The combo box lists the model's structures the segmentation has (the choice is kept)."""
        combo = self.ui.dvhStructureComboBox
        names = self._dvhSession.editable
        current = combo.currentText if combo.count else ""
        self._dvhFillingCombo = True
        try:
            combo.clear()
            combo.addItems(names)
            preferred = current if current in names else next((n for n in names if "Parotid" in n), names[0])
            combo.setCurrentIndex(names.index(preferred))
        finally:
            self._dvhFillingCombo = False

    def onDvhStructureChanged(self, index=None) -> None:
        if not self._dvhFillingCombo and self._dvhEditing:
            self._showDesiredCurve()
            self.ui.dvhStatusLabel.text = self._dvhStatus()

    def _showDesiredCurve(self) -> None:
        """The chosen structure's desired curve as the draggable curve of the chart, its table observed."""
        parameters = self._parameterNode
        overrides, _ = self._mappingArguments()
        self._dvhWriting = True
        try:
            table = self.logic.desiredDVHTableNode(parameters.dvhChart, self._dvhSession,
                                                   self.ui.dvhStructureComboBox.currentText,
                                                   parameters.segmentation, overrides)
        finally:
            self._dvhWriting = False
        if table is not self._dvhTable:
            if self._dvhTable is not None:
                self.removeObserver(self._dvhTable, vtk.vtkCommand.ModifiedEvent, self.onDvhTableModified)
            self._dvhTable = table
            self.addObserver(table, vtk.vtkCommand.ModifiedEvent, self.onDvhTableModified)

    def onDvhTableModified(self, caller=None, event=None) -> None:
        """A point was dragged: predict once the curve rests (the timer restarts on every move)."""
        if self._dvhEditing and not self._dvhWriting:
            self._dvhTimer.start()

    def onDvhCurveTimeout(self) -> None:
        if not self._dvhEditing or self._dvhSession is None or self._dvhTable is None:
            return
        self._dvhWriting = True
        try:
            changed = self.logic.applyDesiredCurve(self._dvhSession, self._dvhTable)
        except Exception as error:  # shown, not raised: a dialog per drag would be unusable
            logging.exception("DosePreference: the dragged DVH curve was not taken")
            self.ui.dvhStatusLabel.text = f"Curve not taken: {error}"
            return
        finally:
            self._dvhWriting = False
        if changed:
            self._requestDVHPrediction()
        self._updateDVHButtons()

    def onDvhUndoButton(self) -> None:
        if self._dvhSession is not None and self._dvhSession.undo():
            self._afterDVHSessionChange()

    def onDvhResetButton(self) -> None:
        if self._dvhSession is not None and self._dvhSession.reset():
            self._afterDVHSessionChange()

    def _afterDVHSessionChange(self) -> None:
        if self._dvhEditing:
            self._showDesiredCurve()
        self._requestDVHPrediction()
        self._updateDVHButtons()

    def _requestDVHPrediction(self) -> None:
        """The dose for the session's desired DVH, on the worker thread (only the latest request waits while
        it computes); without edits, the dose before editing (the sliders' prediction)."""
        parameters, session = self._parameterNode, self._dvhSession
        if (session is None or not parameters or self._result is None
                or parameters.outputDose is not self._result.doseNode):
            return  # the output dose was changed by hand: nothing is written into another node
        if self._pending is not None:
            self._dvhChangedWhileBusy = True
            return
        try:
            overrides, prescriptions = self._mappingArguments()
            if session.edited:
                self._pending = self.logic.predictFromDVHAsync(
                    parameters.ctVolume, parameters.segmentation, session.desiredVector(),
                    doseNode=parameters.outputDose, overrides=overrides, prescriptions=prescriptions,
                    chartNode=parameters.dvhChart, metricsTableNode=parameters.metricsTable,
                    editedStructures=sorted(session.edited), startDose=session.startDose)
                self._pendingSliders = None
            else:
                self._startSliderPrediction(overrides, prescriptions)
            self.ui.statusLabel.text = "Updating the dose from the desired DVH..."
            self._pollTimer.start()
        except Exception as error:
            self._sliderUpdateFailed(error)

    def _dvhStatus(self) -> str:
        session = self._dvhSession
        if session is None:
            return ""
        edited = ", ".join(name for name in session.structures if name in session.edited) or "none"
        text = f"Edited: {edited}."
        if self._result is not None and self._result.dvhEditReport:
            from DosePreferenceLib.logic import editReportText

            text += f" Achieved: {editReportText(self._result.dvhEditReport)}."
        if self._dvhEditing:
            text = (f"Drag the markers of {self.ui.dvhStructureComboBox.currentText}'s desired curve up or down "
                    "in the plot view. " + text)
        return text

    def _updateDVHButtons(self) -> None:
        parameters, session = self._parameterNode, self._dvhSession
        predicted = bool(parameters) and self._result is not None and parameters.outputDose is self._result.doseNode
        problem = "" if predicted else "Predict a dose first"
        if not problem and session is None:
            problem = self.logic.dvhModelProblem()
        self.ui.dvhEditButton.enabled = not problem or self._dvhEditing
        self.ui.dvhEditButton.toolTip = problem or ("Drag the points of the chosen structure's desired DVH in the "
                                                    "plot view; the dose follows")
        self.ui.dvhUndoButton.enabled = session is not None and session.canUndo
        self.ui.dvhResetButton.enabled = session is not None and bool(session.edited)
        self.ui.dvhStructureComboBox.enabled = session is not None

    def onResetButton(self) -> None:
        self._parameterNode.oarSparing = 0.0
        self._parameterNode.homogeneity = 0.0

    def updateIsodose(self) -> None:
        """Isodose lines of the output dose at the chosen levels, or hidden."""
        parameters = self._parameterNode
        isodose = parameters.isodoseSegmentation if parameters else None
        if not parameters or self._result is None or self._result.doseNode is not parameters.outputDose:
            return
        if not parameters.showIsodose:
            if isodose and isodose.GetDisplayNode():
                isodose.GetDisplayNode().SetVisibility(False)
            return
        from doseai.errors import DoseAIError
        from doseai.mrml import parse_isodose_levels

        try:
            levels = parse_isodose_levels(parameters.isodoseLevels)
        except DoseAIError as error:
            self.ui.statusLabel.text = str(error)
            return
        prescription = self._result.dvh.case.max_prescription
        isodose = self.logic.isodoseSegmentation(parameters.outputDose, prescription, levels, isodose)
        isodose.GetDisplayNode().SetVisibility(True)
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
# DosePreferenceTest
#


class DosePreferenceTest(ScriptedLoadableModuleTest):
    """The whole workflow on the synthetic sample case of ``doseai``: mapping, predict, slider change,
    isodose lines, reference DVH, export, a DVH edit (and, in the Slicer application, the same through the
    GUI)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        """What Slicer's Reload & Test and ctest run. A part whose requirements are missing is left out with
        a message (ScriptedLoadableModule reports a raised SkipTest as an error)."""
        missing = self._missingPackages()
        if missing:
            self.delayDisplay(f"DosePreferenceTest left out: it needs these packages: {', '.join(missing)}")
            return
        self.setUp()
        self.test_PredictSlidersExport()
        problem = DosePreferenceLogic().dvhModelProblem()
        if problem:
            self.delayDisplay(f"DVH edit test left out: {problem}")
        else:
            self.setUp()
            self.test_DVHEdit()
        if in_slicer_application():
            self.setUp()
            self.test_Widget()

    @staticmethod
    def _missingPackages() -> list[str]:
        return DosePreferenceLib.missing_packages_for("predict") + DosePreferenceLib.missing_packages_for("export")

    def _sampleNodes(self):
        missing = self._missingPackages()
        if missing:
            self.skipTest(f"the test needs these packages: {', '.join(missing)}")
        from doseai.mrml import nodes_from_case
        from doseai.sample import make_sample_case

        self.delayDisplay("Building the sample case")
        case = make_sample_case(seed=4, shape=(32, 64, 64))
        return case, nodes_from_case(slicer.mrmlScene, case)

    def _waitFor(self, condition, what: str, timeoutS: float = 120.0) -> None:
        """Process events until ``condition()`` holds (a worker thread's result is picked up by a timer on
        the main thread); fail after ``timeoutS`` seconds. A fixed delay would be too short on a slow CPU
        and, below 400 ms, delayDisplay only processes pending events once."""
        import time

        deadline = time.monotonic() + timeoutS
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"timed out after {timeoutS:.0f} s waiting for {what}")
            slicer.app.processEvents()
            time.sleep(POLL_INTERVAL_MS / 1000)

    def test_PredictSlidersExport(self):
        import numpy as np

        from doseai.errors import OutputExistsError
        from doseai.mrml import volume_array

        case, (ctNode, segNode, referenceNode) = self._sampleNodes()
        logic = DosePreferenceLogic()
        rows = logic.structureRows(segNode)
        self.assertEqual([row.segment for row in rows], list(case.structures))
        self.assertTrue(DosePreferenceLib.check_mapping(rows).ok)
        overrides, prescriptions = DosePreferenceLib.mapping_arguments(rows)
        self.assertEqual(prescriptions, case.prescriptions)

        self.delayDisplay("Predicting")
        steps = []
        result = logic.predict(ctNode, segNode, overrides=overrides, prescriptions=prescriptions,
                               referenceDoseNode=referenceNode, progress=lambda text, percent: steps.append(percent))
        self.assertEqual(steps[-1], 100)
        doseNode = result.doseNode
        self.assertEqual(doseNode.GetAttribute("DicomRtImport.DoseVolume"), "1")
        self.assertEqual(result.dvh.chartNode.GetNumberOfPlotSeriesNodes(), 2 * len(case.structures))  # + dashed
        dose = volume_array(doseNode)

        self.delayDisplay("Moving the OAR sparing slider")
        spared = logic.predict(ctNode, segNode, oarSparing=0.5, doseNode=doseNode, overrides=overrides,
                               prescriptions=prescriptions, chartNode=result.dvh.chartNode,
                               metricsTableNode=result.dvh.metricsTableNode, referenceDoseNode=referenceNode)
        self.assertIs(spared.doseNode, doseNode)
        self.assertEqual(doseNode.GetAttribute("DoseAI.OarSparing"), "0.5")
        self.assertFalse(np.array_equal(volume_array(doseNode), dose))

        isodose = logic.isodoseSegmentation(doseNode, case.max_prescription)
        self.assertEqual(isodose.GetSegmentation().GetNumberOfSegments(), 8)

        self.delayDisplay("Exporting")
        folder = tempfile.mkdtemp(prefix="DosePreferenceTest-")
        paths = logic.exportResults(ctNode, segNode, doseNode, folder, overrides, prescriptions)
        self.assertTrue(all(path.is_file() for path in paths.values()))
        with self.assertRaises(OutputExistsError):
            logic.exportResults(ctNode, segNode, doseNode, folder, overrides, prescriptions)
        logic.exportResults(ctNode, segNode, doseNode, folder, overrides, prescriptions, force=True)
        self.delayDisplay("Test passed")

    def test_DVHEdit(self):
        """Lower the left parotid's DVH curve of a predicted dose, predict from the edited DVH, undo."""
        import numpy as np

        from doseai.mrml import volume_array

        logic = DosePreferenceLogic()
        problem = logic.dvhModelProblem()
        if problem:
            self.skipTest(problem)
        case, (ctNode, segNode, _) = self._sampleNodes()
        self.delayDisplay("Predicting the dose to edit")
        doseNode = logic.predict(ctNode, segNode).doseNode
        session = logic.dvhEditSession(ctNode, segNode, doseNode)
        self.assertIn("Parotid_L", session.editable)
        doses, volumes = session.curve("Parotid_L")
        self.assertTrue(session.setCurvePoints("Parotid_L", 0.8 * doses, volumes))  # 20 % lower doses
        self.assertEqual(session.edited, {"Parotid_L"})

        self.delayDisplay("Predicting from the edited DVH")
        before = volume_array(doseNode).copy()
        result = logic.predictFromDVH(ctNode, segNode, session.desiredVector(), doseNode=doseNode,
                                      editedStructures=sorted(session.edited))
        self.assertIs(result.doseNode, doseNode)
        self.assertIsNotNone(doseNode.GetAttribute("DoseAI.DesiredDVH"))
        self.assertIsNone(doseNode.GetAttribute("DoseAI.OarSparing"))
        self.assertEqual(list(result.dvhDistancePct), ["Parotid_L"])
        self.assertFalse(np.array_equal(volume_array(doseNode), before))
        self.assertTrue(session.undo())
        self.assertEqual(session.edited, set())
        self.delayDisplay("DVH edit test passed")

    def test_Widget(self):
        """Predict, a slider move (debounced live update) and export through the module GUI."""
        if not in_slicer_application():
            self.skipTest("the module GUI needs the Slicer application")
        case, (ctNode, segNode, referenceNode) = self._sampleNodes()
        slicer.util.selectModule("DosePreference")
        widget = slicer.modules.dosepreference.widgetRepresentation().self()
        parameters = widget._parameterNode
        parameters.ctVolume, parameters.segmentation = ctNode, segNode
        parameters.outputDose = None
        self.assertEqual(widget.ui.mappingTable.rowCount, len(case.structures))
        self.assertTrue(widget.ui.predictButton.enabled)
        widget.ui.predictButton.click()
        doseNode = parameters.outputDose
        self.assertIsNotNone(doseNode)
        widget.ui.oarSparingSlider.value = 0.5
        self._waitFor(lambda: doseNode.GetAttribute("DoseAI.OarSparing") == "0.5" and widget._pending is None,
                      "the live update after a slider move")
        parameters.exportFolder = pathlib.Path(tempfile.mkdtemp(prefix="DosePreferenceTest-"))
        widget.ui.exportButton.click()
        self.assertEqual(len(list(parameters.exportFolder.iterdir())), 3)
        self.delayDisplay("GUI test passed")
