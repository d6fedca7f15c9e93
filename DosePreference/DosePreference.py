"""DosePreference: dose-volume histograms and dose metrics of a dose over a CT and its structures.

The Slicer module file stays thin: module metadata, the parameter node, the Widget (Qt) and the
self test. The Qt-free logic lives in ``DosePreferenceLib`` (importable and tested on slicer-core)
and the computations in the ``doseai`` core package.
"""

import importlib.util
import logging
import os
import sys


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
from slicer.parameterNodeWrapper import parameterNodeWrapper  # noqa: E402
from slicer.ScriptedLoadableModule import (  # noqa: E402
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin  # noqa: E402

import DosePreferenceLib  # noqa: E402

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
<p>Computes dose-volume histograms (DVH) and dose metrics of a dose volume that is already in the scene.</p>
<p><b>Compute DVH</b>: select the CT volume, the segmentation with the structures and the dose volume (Gy),
then click <i>Compute DVH</i>. The segments are rasterized on the CT grid (a dose on another grid is
resampled onto it) and their names matched to standard structure names (e.g. <i>Lt Parotid</i> &rarr;
<i>Parotid_L</i>, <i>PTV7000</i> &rarr; <i>PTV_70</i> with a 70 Gy prescription). One cumulative DVH curve per
structure appears in a plot chart and the metrics (Dmean, Dmax, D0.1cc, D2, D50, D95, D98; for targets with a
prescription also HI, Paddick CI and V100%) in a table.</p>
<p>Not available yet: AI dose prediction, the preference sliders (OAR sparing, PTV homogeneity) and
RTDOSE export. They will appear in this module once the dose prediction model is part of the extension.</p>
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
    ctVolume: the planning CT; its grid is the grid of the computation.
    segmentation: the structures (targets and organs at risk).
    doseVolume: the dose in Gy.
    dvhChart: the plot chart of the last Compute DVH (one per dose volume, updated when computed again).
    metricsTable: the dose metrics table of the last Compute DVH (one per dose volume, likewise).
    """

    ctVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    doseVolume: vtkMRMLScalarVolumeNode
    dvhChart: vtkMRMLPlotChartNode
    metricsTable: vtkMRMLTableNode


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

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DosePreference.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # the .ui connects mrmlSceneChanged(vtkMRMLScene*) of the top-level widget to each node selector
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = DosePreferenceLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.computeDVHButton.connect("clicked(bool)", self.onComputeDVHButton)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # the GUI is brought up to date again when the user comes back to the module
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanCompute)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        # save the user a few clicks: pick a CT, a segmentation and a dose if there are obvious ones
        ct, segmentation, dose = self.logic.defaultInputs(slicer.mrmlScene)
        if not self._parameterNode.ctVolume and ct:
            self._parameterNode.ctVolume = ct
        if not self._parameterNode.segmentation and segmentation:
            self._parameterNode.segmentation = segmentation
        if not self._parameterNode.doseVolume and dose:
            self._parameterNode.doseVolume = dose

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanCompute)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # widgets with a SlicerParameterName property in the .ui follow the parameter node and back
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanCompute)
            self._checkCanCompute()

    def _checkCanCompute(self, caller=None, event=None) -> None:
        parameters = self._parameterNode
        reason = self.logic.missingInputs(parameters.ctVolume, parameters.segmentation, parameters.doseVolume)
        self.ui.computeDVHButton.enabled = not reason
        self.ui.computeDVHButton.toolTip = reason or "Compute the DVH and dose metrics of each segment"

    def onComputeDVHButton(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to compute the DVH.", waitCursor=True):
            if not self._installMissingPackages():
                return
            parameters = self._parameterNode
            # each dose volume has its own chart and table, updated when its DVH is computed again
            result = self.logic.computeDVH(parameters.ctVolume, parameters.segmentation, parameters.doseVolume)
            parameters.dvhChart = result.chartNode
            parameters.metricsTable = result.metricsTableNode
            self.ui.statusLabel.text = result.summary()
            self._showResults(result)

    def _installMissingPackages(self) -> bool:
        """Python packages are installed when first needed, after the user agrees; never at import."""
        missing = DosePreferenceLib.missing_packages()
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
            f"Dose Preference needs these Python packages: {', '.join(missing)}. Install them now?"
        ):
            return False
        slicer.util.pip_install(" ".join(missing))
        return not DosePreferenceLib.missing_packages()

    def _showResults(self, result) -> None:
        """DVH chart and metrics table in a four-up layout, the dose over the CT in the slice views."""
        parameters = self._parameterNode
        layoutManager = slicer.app.layoutManager()
        if layoutManager:
            layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotTableView)
        appLogic = slicer.app.applicationLogic()
        selectionNode = appLogic.GetSelectionNode()
        selectionNode.SetActivePlotChartID(result.chartNode.GetID())
        selectionNode.SetActiveTableID(result.metricsTableNode.GetID())
        appLogic.PropagatePlotChartSelection()
        appLogic.PropagateTableSelection()
        slicer.util.setSliceViewerLayers(
            background=parameters.ctVolume, foreground=parameters.doseVolume, foregroundOpacity=0.4
        )


#
# DosePreferenceLogic
#


class DosePreferenceLogic(ScriptedLoadableModuleLogic, DosePreferenceLib.DosePreferenceLogic):
    """Qt-free computations, see :class:`DosePreferenceLib.DosePreferenceLogic`; this class adds the
    parameter node. From the Python console::

        logic = slicer.util.getModuleLogic("DosePreference")
        result = logic.computeDVH(ctNode, segNode, doseNode)
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        DosePreferenceLib.DosePreferenceLogic.__init__(self)

    def getParameterNode(self):
        return DosePreferenceParameterNode(super().getParameterNode())


#
# DosePreferenceTest
#


class DosePreferenceTest(ScriptedLoadableModuleTest):
    """Runs Compute DVH on the synthetic sample case of ``doseai``."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ComputeDVH()

    def test_ComputeDVH(self):
        if importlib.util.find_spec("scipy") is None:  # the sample phantom is built with scipy.ndimage
            slicer.util.pip_install("scipy")
        import numpy as np

        from doseai.dvh import compute_dvhs
        from doseai.mrml import nodes_from_case
        from doseai.sample import make_sample_case

        self.delayDisplay("Building the sample case")
        case = make_sample_case(shape=(24, 48, 48))
        ctNode, segNode, doseNode = nodes_from_case(slicer.mrmlScene, case)

        logic = DosePreferenceLogic()
        self.assertTrue(logic.missingInputs(ctNode, segNode, None))
        self.assertEqual(logic.missingInputs(ctNode, segNode, doseNode), "")
        self.assertEqual(logic.defaultInputs(slicer.mrmlScene), (ctNode, segNode, doseNode))
        parameters = logic.getParameterNode()
        parameters.ctVolume, parameters.segmentation, parameters.doseVolume = ctNode, segNode, doseNode
        self.assertIs(parameters.doseVolume, doseNode)

        self.delayDisplay("Computing the DVH")
        result = logic.computeDVH(ctNode, segNode, doseNode)
        self.assertEqual(result.chartNode.GetNumberOfPlotSeriesNodes(), len(case.structures))
        self.assertEqual(result.metricsTableNode.GetNumberOfRows(), len(case.structures))
        expected = compute_dvhs(case.dose, case.structures, case.geometry.voxel_volume_mm3 / 1000.0)
        for name, dvh in expected.items():
            np.testing.assert_allclose(result.dvhs[name].volume_cc, dvh.volume_cc)
        self.assertAlmostEqual(result.metrics["PTV_70"]["prescription"], 70.0)

        again = logic.computeDVH(ctNode, segNode, doseNode)
        self.assertIs(again.chartNode, result.chartNode)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode"), len(case.structures))
        logging.info("DosePreference self test passed")
        self.delayDisplay("Test passed")
