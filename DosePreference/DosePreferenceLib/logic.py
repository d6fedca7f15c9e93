"""DosePreference logic without Qt: MRML nodes in, ``doseai`` core call, MRML nodes out.

``doseai`` is imported inside the methods, so that the module loads in Slicer even before a missing
Python package is installed (that happens when the user first clicks a button, never at import).
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

# import name -> pip requirement; what "Compute DVH" needs beyond the doseai package itself
REQUIRED_PACKAGES: dict[str, str] = {"numpy": "numpy", "SimpleITK": "SimpleITK"}


def missing_packages(required: Mapping[str, str] | None = None) -> list[str]:
    """pip requirements of the packages in ``required`` (import name -> requirement) that are not installed."""
    required = REQUIRED_PACKAGES if required is None else required
    return [requirement for module, requirement in required.items() if importlib.util.find_spec(module) is None]


@dataclass
class DVHResult:
    """What :meth:`DosePreferenceLogic.computeDVH` made: the case on the CT grid, the DVHs and
    metrics per structure, and the chart and table nodes that show them."""

    case: object
    dvhs: dict
    metrics: dict[str, dict[str, float]]
    chartNode: object
    metricsTableNode: object
    emptyStructures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"DVH of {len(self.dvhs)} structures"
        if self.emptyStructures:
            text += f"; empty on the CT grid, left out: {', '.join(self.emptyStructures)}"
        return text


class DosePreferenceLogic:
    """Computes DVHs and dose metrics of a dose volume for the segments of a segmentation.

    Usable without the module GUI, in the Slicer Python console or in a batch script::

        logic = DosePreferenceLogic()
        result = logic.computeDVH(ctNode, segNode, doseNode)
    """

    def __init__(self) -> None:
        self.dvhBinWidthGy = 0.1

    @staticmethod
    def missingInputs(ctNode, segNode, doseNode) -> str:
        """Why Compute DVH cannot run with these inputs (a sentence for the button's tooltip), or ""."""
        if ctNode is None:
            return "Select the CT volume"
        if segNode is None:
            return "Select the segmentation with the structures"
        if doseNode is None:
            return "Select the dose volume"
        if doseNode is ctNode:
            return "The dose volume must not be the CT volume"
        return ""

    @staticmethod
    def defaultInputs(scene):
        """Obvious choices in ``scene`` as ``(ctNode, segNode, doseNode)``, None where there is none:
        the first plain scalar volume that is not a dose, the first segmentation, the first volume
        marked as an RT dose (``DicomRtImport.DoseVolume``)."""
        from doseai.mrml import is_dose_volume

        ct = dose = None
        volumes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
        for index in range(volumes.GetNumberOfItems()):
            volume = volumes.GetItemAsObject(index)
            if volume.GetClassName() != "vtkMRMLScalarVolumeNode":  # labelmaps and other subclasses
                continue
            if is_dose_volume(volume):
                dose = dose or volume
            else:
                ct = ct or volume
        return ct, scene.GetFirstNodeByClass("vtkMRMLSegmentationNode"), dose

    def computeDVH(
        self,
        ctNode,
        segNode,
        doseNode,
        overrides: Mapping[str, str | None] | None = None,
        prescriptions: Mapping[str, float] | None = None,
        chartNode=None,
        metricsTableNode=None,
    ) -> DVHResult:
        """DVHs and metrics of ``doseNode`` for every segment of ``segNode`` on the grid of ``ctNode``.

        Segments are matched to canonical structure names (``overrides``: raw segment name ->
        canonical name, or None to leave it out); targets get prescription metrics (D95, HI,
        Paddick CI, V100%) when their prescription is known from the name or ``prescriptions``.
        Shows the curves in a plot chart (one table + series per structure, segment colours) and
        the metrics in a table; ``chartNode`` / ``metricsTableNode`` given are updated in place.
        """
        from doseai.dvh import compute_dvhs, structure_metrics
        from doseai.errors import DoseAIError

        reason = self.missingInputs(ctNode, segNode, doseNode)
        if reason:
            raise DoseAIError(reason)
        from doseai.mrml import case_from_nodes, metrics_table, segment_colors, show_dvh

        start = time.time()
        case = case_from_nodes(ctNode, segNode, doseNode, overrides=overrides, prescriptions=prescriptions)
        voxel_cc = case.geometry.voxel_volume_mm3 / 1000.0
        dvhs = compute_dvhs(case.dose, case.structures, voxel_cc, bin_width_gy=self.dvhBinWidthGy)
        metrics = {
            name: structure_metrics(
                case.dose, case.structures[name], voxel_cc, name=name, prescription_gy=case.prescriptions.get(name)
            )
            for name in dvhs
        }
        scene = ctNode.GetScene()
        chartNode = show_dvh(
            scene, dvhs, colors=segment_colors(segNode, overrides), chartNode=chartNode,
            name_prefix=f"{doseNode.GetName()} DVH",
        )
        metricsTableNode = metrics_table(
            scene, metrics, tableNode=metricsTableNode, name=f"{doseNode.GetName()} DVH metrics"
        )
        empty = [name for name in case.structures if name not in dvhs]
        logging.info(f"DosePreference: DVH of {len(dvhs)} structures in {time.time() - start:.2f} s")
        return DVHResult(case, dvhs, metrics, chartNode, metricsTableNode, empty)
