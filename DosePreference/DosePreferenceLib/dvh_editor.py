"""DVH editing in the module panel: the desired curve of one structure dragged in the plot view, predicted once
it rests (DVH-conditioned model), with undo and reset; the session of edits lives until a slider move or
Predict starts over. The Widget owns the panel's buttons and hands their signals to this class."""

import logging

import slicer
import vtk

from .results import editReportText
from .sliders import SLIDER_UPDATE_DELAY_MS


class DVHEditor:
    """The DVH-editing part of the DosePreference Widget (``widget``: its ui, logic, parameter node and the
    pending worker update it shares with the sliders)."""

    def __init__(self, widget) -> None:
        import qt

        self._widget = widget
        self.session = None  # DVHEditSession: the desired DVH and its undo history
        self.editing = False  # the plot view drags the desired curve's points
        self.table = None  # the table of the draggable curve (observed)
        self._writing = False  # True while the module itself writes that table
        self._fillingCombo = False
        self.changedWhileBusy = False  # an edit waits for the worker to finish the update before it
        self.timer = qt.QTimer()  # a dragged curve is predicted once it rests, like a slider
        self.timer.setSingleShot(True)
        self.timer.setInterval(SLIDER_UPDATE_DELAY_MS)
        self.timer.connect("timeout()", self.onCurveTimeout)

    def onEditButton(self, checked) -> None:
        """Edit on: the desired curve of the chosen structure in the chart, the plot view moving points."""
        if bool(checked) == self.editing:
            return
        if not checked:
            self.stop()
            return
        try:
            self.start()
        except Exception as error:  # a missing model or a changed input: said in the status line
            logging.exception("DosePreference: DVH editing could not start")
            self.stop()
            self._widget.ui.dvhStatusLabel.text = f"DVH editing unavailable: {error}"

    def start(self) -> None:
        from doseai.errors import DoseAIError

        parameters = self._widget._parameterNode
        if self._widget._result is None or parameters.outputDose is not self._widget._result.doseNode or not parameters.dvhChart:
            raise DoseAIError("predict a dose first")
        if self.session is None:
            import qt

            overrides, prescriptions = self._widget._mappingArguments()
            slicer.app.setOverrideCursor(qt.Qt.WaitCursor)  # the first time loads the DVH model
            try:
                self.session = self._widget.logic.dvhEditSession(parameters.ctVolume, parameters.segmentation,
                                                             parameters.outputDose, overrides, prescriptions)
            finally:
                slicer.app.restoreOverrideCursor()
        self._fillStructures()
        self.editing = True
        self._widget.ui.dvhEditButton.checked = True
        self._showDesiredCurve()
        self._widget._showViews(parameters.dvhChart, parameters.metricsTable)  # the chart in the plot view
        self._widget.logic.setDVHEditMode(parameters.dvhChart, True)
        self._widget.ui.dvhStatusLabel.text = self.status()
        self.updateButtons()

    def stop(self, touchScene: bool = True) -> None:
        """The draggable curve goes and the plot view pans again; the session (and its edits) stays."""
        self.timer.stop()
        wasEditing, self.editing = self.editing, False
        self._widget.ui.dvhEditButton.checked = False
        if self.table is not None:
            self._widget.removeObserver(self.table, vtk.vtkCommand.ModifiedEvent, self.onTableModified)
            self.table = None
        chart = self._widget._parameterNode.dvhChart if self._widget._parameterNode else None
        if wasEditing and touchScene and chart is not None:
            self._widget.logic.removeDesiredDVHCurve(chart)
            self._widget.logic.setDVHEditMode(chart, False)
        self.updateButtons()

    def end(self, reason: str = "", touchScene: bool = True) -> None:
        """Forget the edits (a slider move or Predict starts over from the sliders)."""
        if self.session is None:
            return
        hadEdits = bool(self.session.edited)
        self.stop(touchScene)
        self.session, self.changedWhileBusy = None, False
        self._widget.ui.dvhStatusLabel.text = reason if hadEdits else ""
        self.updateButtons()

    def _fillStructures(self) -> None:
        """The combo box lists the model's structures the segmentation has (the choice is kept)."""
        combo = self._widget.ui.dvhStructureComboBox
        names = self.session.editable
        current = combo.currentText if combo.count else ""
        self._fillingCombo = True
        try:
            combo.clear()
            combo.addItems(names)
            preferred = current if current in names else next((n for n in names if "Parotid" in n), names[0])
            combo.setCurrentIndex(names.index(preferred))
        finally:
            self._fillingCombo = False

    def onStructureChanged(self, index=None) -> None:
        if not self._fillingCombo and self.editing:
            self._showDesiredCurve()
            self._widget.ui.dvhStatusLabel.text = self.status()

    def _showDesiredCurve(self) -> None:
        """The chosen structure's desired curve as the draggable curve of the chart, its table observed."""
        parameters = self._widget._parameterNode
        overrides, _ = self._widget._mappingArguments()
        self._writing = True
        try:
            table = self._widget.logic.desiredDVHTableNode(parameters.dvhChart, self.session,
                                                   self._widget.ui.dvhStructureComboBox.currentText,
                                                   parameters.segmentation, overrides)
        finally:
            self._writing = False
        if table is not self.table:
            if self.table is not None:
                self._widget.removeObserver(self.table, vtk.vtkCommand.ModifiedEvent, self.onTableModified)
            self.table = table
            self._widget.addObserver(table, vtk.vtkCommand.ModifiedEvent, self.onTableModified)

    def onTableModified(self, caller=None, event=None) -> None:
        """A point was dragged: predict once the curve rests (the timer restarts on every move)."""
        if self.editing and not self._writing:
            self.timer.start()

    def onCurveTimeout(self) -> None:
        if not self.editing or self.session is None or self.table is None:
            return
        self._writing = True
        try:
            changed = self._widget.logic.applyDesiredCurve(self.session, self.table)
        except Exception as error:  # shown, not raised: a dialog per drag would be unusable
            logging.exception("DosePreference: the dragged DVH curve was not taken")
            self._widget.ui.dvhStatusLabel.text = f"Curve not taken: {error}"
            return
        finally:
            self._writing = False
        if changed:
            self.requestPrediction()
        self.updateButtons()

    def undo(self) -> None:
        if self.session is not None and self.session.undo():
            self._afterSessionChange()

    def reset(self) -> None:
        if self.session is not None and self.session.reset():
            self._afterSessionChange()

    def _afterSessionChange(self) -> None:
        if self.editing:
            self._showDesiredCurve()
        self.requestPrediction()
        self.updateButtons()

    def requestPrediction(self) -> None:
        """The dose for the session's desired DVH, on the worker thread (only the latest request waits while
        it computes); without edits, the dose before editing (the sliders' prediction)."""
        parameters, session = self._widget._parameterNode, self.session
        if (session is None or not parameters or self._widget._result is None
                or parameters.outputDose is not self._widget._result.doseNode):
            return  # the output dose was changed by hand: nothing is written into another node
        if self._widget._pending is not None:
            self.changedWhileBusy = True
            return
        try:
            overrides, prescriptions = self._widget._mappingArguments()
            if session.edited:
                self._widget._pending = self._widget.logic.predictFromDVHAsync(
                    parameters.ctVolume, parameters.segmentation, session.desiredVector(),
                    doseNode=parameters.outputDose, overrides=overrides, prescriptions=prescriptions,
                    chartNode=parameters.dvhChart, metricsTableNode=parameters.metricsTable,
                    editedStructures=sorted(session.edited), startDose=session.startDose)
                self._widget._pendingSliders = None
            else:
                self._widget._startSliderPrediction(overrides, prescriptions)
            self._widget.ui.statusLabel.text = "Updating the dose from the desired DVH..."
            self._widget._pollTimer.start()
        except Exception as error:
            self._widget._sliderUpdateFailed(error)

    def status(self) -> str:
        session = self.session
        if session is None:
            return ""
        edited = ", ".join(name for name in session.structures if name in session.edited) or "none"
        text = f"Edited: {edited}."
        if self._widget._result is not None and self._widget._result.dvhEditReport:
            text += f" Achieved: {editReportText(self._widget._result.dvhEditReport)}."
        if self.editing:
            text = (f"Drag the markers of {self._widget.ui.dvhStructureComboBox.currentText}'s desired curve up or down "
                    "in the plot view. " + text)
        return text

    def updateButtons(self) -> None:
        parameters, session = self._widget._parameterNode, self.session
        predicted = bool(parameters) and self._widget._result is not None and parameters.outputDose is self._widget._result.doseNode
        problem = "" if predicted else "Predict a dose first"
        if not problem and session is None:
            problem = self._widget.logic.dvhModelProblem()
        self._widget.ui.dvhEditButton.enabled = not problem or self.editing
        self._widget.ui.dvhEditButton.toolTip = problem or ("Drag the points of the chosen structure's desired DVH in the "
                                                    "plot view; the dose follows")
        self._widget.ui.dvhUndoButton.enabled = session is not None and session.canUndo
        self._widget.ui.dvhResetButton.enabled = session is not None and bool(session.edited)
        self._widget.ui.dvhStructureComboBox.enabled = session is not None
