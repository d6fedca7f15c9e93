"""DoseOptimizer: from a desired dose (e.g. the one predicted in DosePreference) to a plan: beam
fluences optimized with a photon dose engine, the plan's dose and DVH beside the desired one, the
planning objectives for a TPS, and export.

The Slicer module file stays thin: module metadata, the parameter node, the Widget (Qt) and the
self test. The Qt-free logic lives in ``DoseOptimizerLib`` (importable and tested on slicer-core)
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
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper  # noqa: E402
from slicer.ScriptedLoadableModule import (  # noqa: E402
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin  # noqa: E402

import DoseOptimizerLib  # noqa: E402
from doseai.mrml.app import (  # noqa: E402
    export_asking_to_overwrite,
    in_slicer_application,
    packages_ready,
    progress_dialog,
    show_dose_and_dvh,
)

#
# DoseOptimizer
#


class DoseOptimizer(ScriptedLoadableModule):
    """The module's metadata: title, category, help and acknowledgement (what Slicer shows about it)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Dose Optimizer"
        self.parent.categories = ["Radiotherapy"]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerDoseAI contributors"]
        self.parent.helpText = """
<p>Turns a desired 3D dose (typically the one predicted in <i>Dose Preference</i>) into a plan: it optimizes
the fluences of equispaced coplanar photon beams so that the plan's dose comes as close as the beams allow
to the desired dose, and shows the achievable DVH beside the desired one.</p>
<ol>
<li><b>Inputs</b>: the CT, the segmentation and the <i>desired dose</i> (an RT dose volume; on another grid
it is resampled onto the CT's). Segment names are matched to standard structure names; a target needs a
prescription in its name (e.g. <i>PTV_70</i>, <i>PTV7000</i>).</li>
<li><b>Plan</b>: <i>Mode</i> <i>mimic</i> optimizes voxel-wise dose mimicking (two-sided in targets and the rest
of the body, one-sided in organs at risk); <i>objectives</i> optimizes the DVH point and mean-dose objectives
derived from the desired dose with rule-based margins (what a planner would enter in a TPS).
<i>Beams</i>: number of equispaced coplanar beams (gantry angles from 0&deg;, isocentre at the target
centroid); <i>Bixel width</i>: the fluence resolution (coarser is faster). <i>Optimizer</i>: L-BFGS-B (300
iterations, the reference), projected Adam, or the LSTM <i>learned</i> optimizer (30 steps, about ten times less
optimizer time than L-BFGS-B and about twice its objective). <i>Start</i>: the uniform weights, or the fluence
generator's maps (one network evaluation; mode mimic); Docs/DoseToPlan.md has how each fares.</li>
<li><b>Optimize</b>: the first click installs missing or too old Python packages after one question that
lists them (PyTorch through the PyTorch extension when it is installed; pyRadPlan 0.5.0 without its dependency
list, then the packages its dose engine imports). The progress dialog's <i>Cancel</i> stops it between steps. Then the dose engine computes the dose-influence matrix on a 5&nbsp;mm grid
cropped to the body (measured on 2 CPU cores: one to two minutes for 9 beams on a head-and-neck case of
OpenKBP), and L-BFGS-B optimizes the bixel weights (up to 300 iterations). The matrix is kept: optimizing the same CT,
structures and beams again, e.g. in the other mode, skips the dose engine. The plan's dose appears over
the CT with the dose colour table, under the CT's study, tagged as an RT dose; the DVH chart shows the plan
solid and the desired dose dashed, the metrics table the plan's metrics.</li>
<li><b>Export</b>: <i>Export plan</i> writes the plan dose (NRRD and RTDOSE, in the CT's DICOM study when the
CT was loaded from DICOM), the RTPLAN the RTDOSE references (beams, isocentre, energy and jaws; the fluence itself
is in the arrays, as DICOM holds no fluence without a leaf sequence), the fluence maps (PNG and arrays), the objectives (JSON, CSV), a DVH plot against
the desired dose, the metrics (CSV) and a summary (JSON); <i>Export objectives</i> writes the objectives
only. Existing files are overwritten only after you confirm.</li>
</ol>
<p><b>Dose engine</b>: pyRadPlan's photon pencil beam with singular-value-decomposed kernels (matRad's SVD
pencil beam, generic 6&nbsp;MV machine): depth dose at the radiological depth (Siddon ray tracing through
densities from the CT's HU), lateral kernel spread with a Gaussian source penumbra, inverse square law.
It does <b>not</b> model: Monte Carlo transport or lateral density scaling (electron disequilibrium at
tissue/air and tissue/lung interfaces), MLC leaves and jaws (no leaf geometry, transmission,
tongue-and-groove; bixels are ideal squares, so the fluence is not sequenced into deliverable segments),
head scatter and field-size output factors beyond the kernels, dose beyond the lateral cut-off (50&nbsp;mm)
around each bixel's ray, and dose outside the body (set to 0). Its dose per bixel weight is not calibrated to
monitor units: the plan's absolute dose comes from the optimization toward the desired dose.</p>
<p>Python console: <code>logic = slicer.util.getModuleLogic("DoseOptimizer")</code> (or
<code>DoseOptimizer.DoseOptimizerLogic()</code>), then <code>result = logic.optimize(ctNode, segNode,
desiredDoseNode, mode="mimic", numberOfBeams=9, bixelWidthMm=5.0, optimizer="lbfgsb", start="uniform")</code>; <code>result.planDoseNode</code>,
<code>result.objectives</code>, <code>result.summary()</code>; <code>logic.objectives(ctNode, segNode,
doseNode)</code> gives the objectives of any dose; <code>logic.exportPlan(folder)</code>,
<code>logic.exportObjectives(folder)</code>.</p>
<p>Needs Slicer 5.10 or newer (tested with the Python packages Slicer 5.10 and 5.12 bundle).</p>
<p>The plan is a research estimate of what beams can deliver, not a clinical plan.</p>
"""
        self.parent.acknowledgementText = """
Developed in the SlicerDoseAI project. The dose engine is pyRadPlan (e0404, DKFZ; a Python port of matRad),
its photon SVD pencil beam after Bortfeld, Schlegel and Rhein 1993. Dose mimicking follows the OpenKBP-Opt
study (Babier et al. 2022). The module layout follows the scripted module template of 3D Slicer; dose volumes
follow the conventions of SlicerRT (DICOM-RT import), so that its Isodose and Dose Volume Histogram modules
work on them too.
"""


#
# DoseOptimizerParameterNode
#


@parameterNodeWrapper
class DoseOptimizerParameterNode:
    """
    ctVolume: the planning CT; its grid is the grid of the plan's dose.
    segmentation: the structures (targets with prescriptions in their names, organs at risk, body).
    desiredDose: the dose the plan should come close to (e.g. the predicted dose).
    mode: "mimic" (voxel-wise dose mimicking) or "objectives" (DVH objectives derived from the desired dose).
    numberOfBeams, bixelWidthMm: the beams (equispaced, coplanar) and their fluence resolution.
    optimizer: "lbfgsb", "adam" or "learned" (the LSTM learned optimizer, its trained number of steps).
    start: where the optimizer starts, "uniform" weights or the fluence "generator"'s (mode mimic).
    planDose: the plan's dose volume (created by the first Optimize when empty).
    dvhChart, metricsTable: the DVH chart (plan solid, desired dashed) and the plan's metrics table.
    exportFolder: where the export buttons write.
    """

    ctVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    desiredDose: vtkMRMLScalarVolumeNode
    mode: Annotated[str, Choice(list(DoseOptimizerLib.MODES))] = "mimic"
    numberOfBeams: Annotated[int, WithinRange(1, 36)] = 9
    bixelWidthMm: Annotated[float, WithinRange(2.5, 20.0)] = 5.0
    optimizer: Annotated[str, Choice(list(DoseOptimizerLib.OPTIMIZERS))] = "lbfgsb"
    start: Annotated[str, Choice(list(DoseOptimizerLib.STARTS))] = "uniform"
    planDose: vtkMRMLScalarVolumeNode
    dvhChart: vtkMRMLPlotChartNode
    metricsTable: vtkMRMLTableNode
    exportFolder: pathlib.Path


#
# DoseOptimizerWidget
#


class DoseOptimizerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: inputs and plan settings bound to the parameter node, Optimize and the exports."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        """Build the panel from the .ui file and connect the buttons and scene events (once, on first show)."""
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DoseOptimizer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # the .ui connects mrmlSceneChanged(vtkMRMLScene*) of the top-level widget to each node selector
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = DoseOptimizerLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.optimizeButton.connect("clicked(bool)", self.onOptimizeButton)
        self.ui.exportPlanButton.connect("clicked(bool)", self.onExportPlanButton)
        self.ui.exportObjectivesButton.connect("clicked(bool)", self.onExportObjectivesButton)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Stop observing when the application closes or the module is reloaded."""
        self.removeObservers()

    def enter(self) -> None:
        """The module is shown: follow its parameter node again."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """The module is hidden: let go of the parameter node's GUI connection until it is shown again."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        """The scene is about to close: drop its parameter node and the last plan."""
        self.setParameterNode(None)
        self.logic.forget()  # the last plan's nodes are about to go

    def onSceneEndClose(self, caller, event) -> None:
        """The scene closed: a new parameter node when the module is shown."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Follow the logic's parameter node, with the obvious inputs of the scene filled in where empty."""
        self.setParameterNode(self.logic.getParameterNode())
        parameters = self._parameterNode
        # save the user a few clicks: the obvious CT, segmentation and desired (predicted) dose
        ct, segmentation, desired = self.logic.defaultInputs(slicer.mrmlScene)
        if not parameters.ctVolume and ct:
            parameters.ctVolume = ct
        if not parameters.segmentation and segmentation:
            parameters.segmentation = segmentation
        if not parameters.desiredDose and desired and desired is not parameters.planDose:
            parameters.desiredDose = desired
        if str(parameters.exportFolder) in ("", "."):
            parameters.exportFolder = pathlib.Path(slicer.app.defaultScenePath) / "DoseAI" / "plan"
        self._updateButtons()

    def setParameterNode(self, inputParameterNode) -> None:
        """Bind the GUI to ``inputParameterNode`` (None: to nothing) and observe its changes."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            if self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified):
                self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # widgets with a SlicerParameterName property in the .ui follow the parameter node and back
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self._updateButtons()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        """A parameter changed: the buttons and their tooltips follow."""
        self._updateButtons()

    def _updateButtons(self) -> None:
        parameters = self._parameterNode
        if not parameters:
            return
        choices = DoseOptimizerLib.OptimizationRequest(None, None, None, mode=parameters.mode,
                                                       optimizer=parameters.optimizer, start=parameters.start)
        reason = (self.logic.missingInputs(parameters.ctVolume, parameters.segmentation, parameters.desiredDose)
                  or choices.modeProblem() or self.logic.targetProblem(parameters.segmentation)
                  or self.logic.outputProblem(parameters.planDose, parameters.desiredDose))
        self.ui.optimizeButton.enabled = not reason
        self.ui.optimizeButton.toolTip = reason or (
            f"Optimize {parameters.numberOfBeams} beams ({parameters.mode}, {parameters.optimizer} from the "
            f"{parameters.start} start) toward the desired dose")
        hasPlan = self.logic.lastPlan is not None
        self.ui.exportPlanButton.enabled = hasPlan
        self.ui.exportPlanButton.toolTip = ("Write the plan dose, fluence maps, objectives, DVH plot and metrics"
                                            if hasPlan else "Optimize a plan first")
        hasObjectives = self.logic.lastObjectives is not None
        self.ui.exportObjectivesButton.enabled = hasObjectives
        self.ui.exportObjectivesButton.toolTip = ("Write the planning objectives as JSON and CSV" if hasObjectives
                                                  else "Optimize a plan first")

    # --- actions -------------------------------------------------------------------------------------
    def onOptimizeButton(self) -> None:
        """Install what is missing (after asking), optimize with a progress dialog, show the plan and its DVH."""
        from doseai.errors import CancelledError

        if not self._installPackages("optimize"):  # asks before the wait cursor, not under it
            return
        with slicer.util.tryWithErrorDisplay("Failed to optimize the plan.", waitCursor=True):
            parameters = self._parameterNode
            try:
                with progress_dialog("Optimizing the plan") as progress:
                    result = self.logic.optimize(
                        parameters.ctVolume, parameters.segmentation, parameters.desiredDose, mode=parameters.mode,
                        numberOfBeams=parameters.numberOfBeams, bixelWidthMm=parameters.bixelWidthMm,
                        optimizer=parameters.optimizer, start=parameters.start, planDoseNode=parameters.planDose, chartNode=parameters.dvhChart,
                        metricsTableNode=parameters.metricsTable, progress=progress)
            except CancelledError:
                self.ui.statusLabel.text = "Optimization cancelled."
                return
            parameters.planDose = result.planDoseNode
            parameters.dvhChart = result.chartNode
            parameters.metricsTable = result.metricsTableNode
            self.ui.statusLabel.text = result.summary()
            self._updateButtons()
            show_dose_and_dvh(parameters.ctVolume, result.planDoseNode, result.chartNode, result.metricsTableNode)

    def onExportPlanButton(self) -> None:
        """Write the last plan's files into the export folder."""
        self._export("plan", "export", self.logic.exportPlan)

    def onExportObjectivesButton(self) -> None:
        """Write the last objectives (JSON, CSV) into the export folder."""
        self._export("objectives", "objectives", self.logic.exportObjectives)

    def _export(self, what: str, task: str, export) -> None:
        """Run ``export(folder, force)``; when files exist, ask before writing over them."""
        if not self._installPackages(task):
            return
        folder = self._parameterNode.exportFolder
        paths = export_asking_to_overwrite(lambda force: export(folder, force=force), f"Failed to export the {what}.")
        if paths is not None:
            self.ui.statusLabel.text = f"Exported {', '.join(path.name for path in paths)} to {folder}"

    def _installPackages(self, task: str) -> bool:
        """Python packages are installed when first needed, after one question that lists them; never at
        import. False: the user declined, or installing failed (the error is shown)."""
        return packages_ready(lambda: DoseOptimizerLib.missing_packages_for(task), "Dose Optimizer",
                              DoseOptimizerLib.TASK_PACKAGES[task])


#
# DoseOptimizerLogic
#


class DoseOptimizerLogic(ScriptedLoadableModuleLogic, DoseOptimizerLib.DoseOptimizerLogic):
    """Qt-free computations, see :class:`DoseOptimizerLib.DoseOptimizerLogic`; this class adds the
    parameter node and Slicer's DICOM database. From the Python console::

        logic = DoseOptimizer.DoseOptimizerLogic()
        result = logic.optimize(ctNode, segNode, desiredDoseNode, mode="mimic", numberOfBeams=9)
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        DoseOptimizerLib.DoseOptimizerLogic.__init__(self)

    def getParameterNode(self):
        """The module's parameter node, typed (:class:`DoseOptimizerParameterNode`)."""
        return DoseOptimizerParameterNode(super().getParameterNode())

    def dicomLookup(self):
        """Tags of the instances in Slicer's DICOM database (what an exported RTDOSE refers to)."""
        from doseai.mrml.dicom import database_lookup

        return database_lookup(getattr(slicer, "dicomDatabase", None))


#
# DoseOptimizerTest
#


class DoseOptimizerTest(ScriptedLoadableModuleTest):
    """The workflow on the synthetic sample case of ``doseai`` with 3 beams and 10 mm bixels (seconds):
    optimize in both modes (the second reuses the dose-influence matrix), objectives, export (and, in the
    Slicer application, Optimize and Export through the GUI)."""

    BEAMS, BIXEL_MM, ITERATIONS = 3, 10.0, 40

    def setUp(self):
        """An empty scene for each test."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """What Slicer's Reload & Test and ctest run. Missing requirements leave the test out with a message
        (ScriptedLoadableModule reports a raised SkipTest as an error)."""
        missing = self._missingPackages()
        if missing:
            self.delayDisplay(f"DoseOptimizerTest left out: it needs these packages: {', '.join(missing)}")
            return
        self.setUp()
        self.test_OptimizeExport()
        if in_slicer_application():
            self.setUp()
            self.test_Widget()

    @staticmethod
    def _missingPackages() -> list[str]:
        return DoseOptimizerLib.missing_packages_for("optimize") + DoseOptimizerLib.missing_packages_for("export")

    def _sampleNodes(self):
        missing = self._missingPackages()
        if missing:
            self.skipTest(f"the test needs these packages: {', '.join(missing)}")
        from doseai.mrml import nodes_from_case
        from doseai.sample import make_sample_case

        self.delayDisplay("Building the sample case")
        case = make_sample_case(seed=3, shape=(24, 48, 48))
        return case, nodes_from_case(slicer.mrmlScene, case)

    def test_OptimizeExport(self):
        """The logic: optimize in both modes on the sample case (the second reuses the matrix), then export."""
        import numpy as np

        from doseai.errors import OutputExistsError
        from doseai.mrml import geometry_from_volume_node, volume_array

        case, (ctNode, segNode, desiredNode) = self._sampleNodes()
        logic = DoseOptimizerLogic()
        self.delayDisplay("Optimizing (mimic)")
        steps = []
        result = logic.optimize(ctNode, segNode, desiredNode, numberOfBeams=self.BEAMS, bixelWidthMm=self.BIXEL_MM,
                                maxIterations=self.ITERATIONS, progress=lambda text, percent: steps.append(percent))
        self.assertEqual(steps[-1], 100)
        planNode = result.planDoseNode
        self.assertEqual(planNode.GetAttribute("DicomRtImport.DoseVolume"), "1")
        self.assertEqual(planNode.GetAttribute(DoseOptimizerLib.PLAN_MODE_ATTRIBUTE), "mimic")
        self.assertTrue(geometry_from_volume_node(planNode).matches(case.geometry))
        self.assertEqual(float(volume_array(planNode)[~case.structures["External"]].max(initial=0)), 0.0)
        self.assertEqual(result.chartNode.GetNumberOfPlotSeriesNodes(), 2 * len(case.structures))  # + dashed

        self.delayDisplay("Optimizing again (objectives): the dose-influence matrix is reused")
        again = logic.optimize(ctNode, segNode, desiredNode, mode="objectives", numberOfBeams=self.BEAMS,
                               bixelWidthMm=self.BIXEL_MM, maxIterations=self.ITERATIONS, planDoseNode=planNode,
                               chartNode=result.chartNode, metricsTableNode=result.metricsTableNode)
        self.assertTrue(again.influenceReused)
        self.assertIs(again.planDoseNode, planNode)
        self.assertEqual(planNode.GetAttribute(DoseOptimizerLib.PLAN_MODE_ATTRIBUTE), "objectives")
        self.assertTrue(again.objectives)
        self.assertTrue(np.isfinite(again.meanAbsoluteDifferenceGy))

        self.delayDisplay("Exporting")
        folder = tempfile.mkdtemp(prefix="DoseOptimizerTest-")
        paths = logic.exportPlan(folder)
        self.assertTrue(all(path.is_file() for path in paths))
        with self.assertRaises(OutputExistsError):
            logic.exportPlan(folder)
        with self.assertRaises(OutputExistsError):
            logic.exportObjectives(folder)
        logic.exportObjectives(folder, force=True)
        self.delayDisplay("Test passed")

    def test_Widget(self):
        """Optimize and Export through the module GUI."""
        if not in_slicer_application():
            self.skipTest("the module GUI needs the Slicer application")
        case, (ctNode, segNode, desiredNode) = self._sampleNodes()
        slicer.util.selectModule("DoseOptimizer")
        widget = slicer.modules.doseoptimizer.widgetRepresentation().self()
        parameters = widget._parameterNode
        parameters.ctVolume, parameters.segmentation, parameters.desiredDose = ctNode, segNode, desiredNode
        parameters.numberOfBeams, parameters.bixelWidthMm = self.BEAMS, self.BIXEL_MM
        parameters.planDose = None
        self.assertTrue(widget.ui.optimizeButton.enabled)
        widget.ui.optimizeButton.click()
        self.assertIsNotNone(parameters.planDose)
        parameters.exportFolder = pathlib.Path(tempfile.mkdtemp(prefix="DoseOptimizerTest-"))
        widget.ui.exportPlanButton.click()
        self.assertTrue((parameters.exportFolder / "RD_plan.dcm").is_file())
        logging.info("DoseOptimizerTest: GUI test passed")
        self.delayDisplay("GUI test passed")
