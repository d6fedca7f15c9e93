"""What the module Widgets share that needs the Slicer application (not slicer-core): installing
missing Python packages (asks the user, then runs pip; called when the user first clicks a button that
needs a package, never at import; what is needed and in what order comes from :mod:`doseai.packages`),
a progress dialog, and showing a dose with its DVH chart and metrics table in the views.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from doseai.packages import TORCH_REQUIREMENT, install_plan, pip_commands


def ensure_packages(missing: Callable[[], list[str]], requester: str) -> bool:
    """Install what ``missing()`` lists (pip requirements): torch first (see :func:`install_torch`),
    then the rest with pip. ``requester`` (the module's title) is named in the questions. True when
    nothing is missing afterwards; False when the user declined; raises when packages are still missing."""
    required = missing()
    if not required:
        return True
    needs_torch, others = install_plan(required)
    if needs_torch and not install_torch(requester):
        return False
    if others and not pip_install(others, requester):
        return False
    importlib.invalidate_caches()
    still = missing()
    if still:
        raise RuntimeError(f"These Python packages are still missing: {', '.join(still)}. Install them from "
                           "the Python console (slicer.util.pip_install) and restart Slicer.")
    return True


def pip_install(requirements: list[str], requester: str) -> bool:
    """``slicer.packaging.pip_ensure`` where this Slicer has it (it asks, and shows progress), otherwise
    ask here and call ``slicer.util.pip_install``; requirements installed without their dependencies
    (pyRadPlan) always go the second way. False: the user declined."""
    import slicer.util

    try:
        import slicer.packaging as packaging
    except ImportError:
        packaging = None
    commands = pip_commands(requirements)
    if packaging is not None and hasattr(packaging, "pip_ensure") and commands == [" ".join(requirements)]:
        try:
            packaging.pip_ensure(list(requirements), requester=requester)
        except RuntimeError:  # the user declined
            return False
        return True
    if not slicer.util.confirmOkCancelDisplay(
        f"{requester} needs these Python packages: {', '.join(requirements)}. Install them now?",
        windowTitle=requester,
    ):
        return False
    for command in commands:
        slicer.util.pip_install(command)
    return True


def install_torch(requester: str) -> bool:
    """PyTorch through the PyTorch extension (it picks the CUDA or CPU build) when it is installed,
    otherwise pip's default build (which runs on CPU too). False: the user declined."""
    import slicer.util

    try:
        import PyTorchUtils
    except ImportError:
        PyTorchUtils = None
    if PyTorchUtils is not None:
        torch_logic = PyTorchUtils.PyTorchUtilsLogic()
        if torch_logic.torchInstalled():
            return True
        requirement = TORCH_REQUIREMENT[len("torch"):]
        return torch_logic.installTorch(askConfirmation=True, torchVersionRequirement=requirement) is not None
    if not slicer.util.confirmOkCancelDisplay(
        f"{requester} needs PyTorch. Install the default PyTorch build with pip now? (Several minutes; "
        "the PyTorch extension from the Extensions Manager would choose a build for your GPU instead.)",
        windowTitle=requester,
    ):
        return False
    slicer.util.pip_install(TORCH_REQUIREMENT)
    return True


def in_slicer_application() -> bool:
    """True in the Slicer application; False on slicer-core (MRML without Qt), which has no ``slicer.app``."""
    import slicer

    try:
        return slicer.app is not None
    except (AttributeError, ImportError):
        return False


@contextmanager
def progress_dialog(label: str) -> Iterator[Callable[[str, int], None]]:
    """A progress dialog while the block runs; yields the ``progress(text, percent)`` callback of the
    module logics, which updates the dialog and lets the GUI repaint."""
    import slicer

    dialog = slicer.util.createProgressDialog(labelText=label, maximum=100)

    def report(text: str, percent: int) -> None:
        dialog.labelText = text
        dialog.value = percent
        slicer.app.processEvents()

    try:
        yield report
    finally:
        dialog.close()


def show_dose_and_dvh(ctNode, doseNode, chartNode, tableNode) -> None:
    """The dose over the CT in the slice views (when both are given), the DVH chart and the metrics table
    in the plot and table views of the four-up layout with plot and table."""
    import slicer

    if ctNode is not None and doseNode is not None:
        slicer.util.setSliceViewerLayers(background=ctNode, foreground=doseNode, foregroundOpacity=0.4)
    layoutManager = slicer.app.layoutManager()
    if layoutManager:
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotTableView)
    appLogic = slicer.app.applicationLogic()
    selectionNode = appLogic.GetSelectionNode()
    selectionNode.SetActivePlotChartID(chartNode.GetID())
    selectionNode.SetActiveTableID(tableNode.GetID())
    appLogic.PropagatePlotChartSelection()
    appLogic.PropagateTableSelection()
