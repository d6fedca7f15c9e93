"""DoseOptimizer: placeholder module of the SlicerDoseAI extension.

The fluence optimizer is not implemented yet, so this module shows metadata and a notice only:
it has no buttons and no computation. It exists so that the extension layout (two modules) is
in place and its category, help and icon show up in Slicer.
"""

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

#
# DoseOptimizer
#


class DoseOptimizer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Dose Optimizer"
        self.parent.categories = ["Radiotherapy"]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerDoseAI contributors"]
        self.parent.helpText = """
<p><b>Not available yet.</b> This module does not compute anything in this version of the extension.</p>
<p>Planned: turn a chosen dose distribution into optimization objectives, optimize beam fluences with a
photon dose engine, and compare the achievable DVH with the preferred one. Until then use
<i>Dose Preference</i> to compute DVHs and dose metrics of an existing dose.</p>
"""
        self.parent.acknowledgementText = """
Developed in the SlicerDoseAI project. The module layout follows the scripted module template of 3D Slicer.
"""


#
# DoseOptimizerWidget
#


class DoseOptimizerWidget(ScriptedLoadableModuleWidget):
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        # a notice only: nothing here is clickable until the optimizer exists
        self.uiWidget = slicer.util.loadUI(self.resourcePath("UI/DoseOptimizer.ui"))
        self.layout.addWidget(self.uiWidget)
        self.ui = slicer.util.childWidgetVariables(self.uiWidget)
        self.uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DoseOptimizerLogic()


#
# DoseOptimizerLogic
#


class DoseOptimizerLogic(ScriptedLoadableModuleLogic):
    """Empty for now: the fluence optimizer is not part of the extension yet."""


#
# DoseOptimizerTest
#


class DoseOptimizerTest(ScriptedLoadableModuleTest):
    """Checks that the module loads and offers nothing that would pretend to work."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_NoActiveControls()

    def test_NoActiveControls(self):
        widget = slicer.util.getModuleWidget("DoseOptimizer")
        buttons = slicer.util.findChildren(widget.uiWidget, className="QAbstractButton")
        self.assertEqual([button.name for button in buttons if button.enabled], [])
        self.assertIn("Not available yet", slicer.util.getModule("DoseOptimizer").helpText)
        self.delayDisplay("Test passed")
