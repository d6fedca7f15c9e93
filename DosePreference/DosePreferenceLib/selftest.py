"""The DosePreference self test (what Slicer's Reload & Test and ctest run; the module file re-exports it): the
whole workflow on the synthetic sample case, and in the Slicer application the same through the GUI."""

import pathlib
import tempfile

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

import DosePreferenceLib
from DosePreferenceLib.sliders import POLL_INTERVAL_MS
from doseai.mrml.app import in_slicer_application


class DosePreferenceTest(ScriptedLoadableModuleTest):
    """The whole workflow on the synthetic sample case of ``doseai``: mapping, predict, slider change,
    isodose lines, reference DVH, export, a DVH edit (and, in the Slicer application, the same through the
    GUI)."""

    logicClass = None  # the module's logic (with its parameter node and Slicer's DICOM database): set by the module

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
        problem = self.logicClass().dvhModelProblem()
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
        logic = self.logicClass()
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

        logic = self.logicClass()
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
        widget.sliders.widgets["oar_sparing"].value = 0.5
        self._waitFor(lambda: doseNode.GetAttribute("DoseAI.OarSparing") == "0.5" and widget._pending is None,
                      "the live update after a slider move")
        parameters.exportFolder = pathlib.Path(tempfile.mkdtemp(prefix="DosePreferenceTest-"))
        widget.ui.exportButton.click()
        self.assertEqual(len(list(parameters.exportFolder.iterdir())), 3)
        self.delayDisplay("GUI test passed")
