"""What the module Widgets share that needs the Slicer application (not slicer-core): installing
missing Python packages (asks the user, then runs pip; called when the user first clicks a button that
needs a package, never at import; what is needed and in what order comes from :mod:`doseai.packages`),
a progress dialog, and showing a dose with its DVH chart and metrics table in the views.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

from doseai.packages import TORCH_REQUIREMENT, describe_requirements, install_plan, pip_commands, stale_modules


def ensure_packages(missing: Callable[[], list[str]], requester: str,
                    required: Mapping[str, str] | None = None) -> bool:
    """Install what ``missing()`` lists (pip requirements, checked by version, see
    :func:`doseai.packages.missing_packages`) after one confirmation that lists all of it (with the version
    installed now where it is an upgrade; ``required``: import name -> requirement, for those versions):
    torch first (see :func:`install_torch`), then the rest with pip. ``requester`` (the module's title) is
    named in the question. True when nothing is missing afterwards; False when the user declined; raises
    when packages are still missing."""
    needed = missing()
    if not needed:
        return True
    if not confirm_install(describe_requirements(required or {}, needed), requester):
        return False
    needs_torch, others = install_plan(needed)
    if needs_torch:
        install_torch()
    for command in pip_commands(others):
        _pip_install(command)
    importlib.invalidate_caches()
    still = missing()
    if still:
        raise RuntimeError(f"These Python packages are still missing or too old: {', '.join(still)}. Install them "
                           "from the Python console (slicer.util.pip_install) and restart Slicer.")
    stale = stale_modules(required or {})
    if stale:  # e.g. an older torch this session had imported: it keeps running until Slicer restarts
        raise RuntimeError(f"Upgraded {', '.join(stale)}. This Slicer session still runs the old version: restart "
                           "Slicer, then try again.")
    return True


def confirm_install(lines: Sequence[str], requester: str) -> bool:
    """The one question before anything is installed: every package that will be, a line each."""
    import slicer.util

    listed = "\n".join(f"  \u2022 {line}" for line in lines)
    return bool(slicer.util.confirmOkCancelDisplay(
        f"{requester} needs these Python packages, which will be installed now with pip (PyTorch through the "
        f"PyTorch extension when it is installed; this can take several minutes):\n{listed}",
        windowTitle=requester))


def _pip_install(command: str) -> None:
    import slicer.util

    slicer.util.pip_install(command)


def install_torch() -> None:
    """PyTorch (at :data:`TORCH_REQUIREMENT`) through the PyTorch extension, which picks the CUDA or CPU
    build, when it is installed; otherwise pip's default build (which runs on CPU too). The user has
    already agreed (:func:`confirm_install`), so neither asks again."""
    try:
        import PyTorchUtils
    except ImportError:
        PyTorchUtils = None
    if PyTorchUtils is not None:
        requirement = TORCH_REQUIREMENT[len("torch"):]
        PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=requirement)
        return
    _pip_install(TORCH_REQUIREMENT)


def in_slicer_application() -> bool:
    """True in the Slicer application; False on slicer-core (MRML without Qt), which has no ``slicer.app``."""
    import slicer

    try:
        return slicer.app is not None
    except (AttributeError, ImportError):
        return False


def packages_ready(missing: Callable[[], list[str]], requester: str,
                   required: Mapping[str, str] | None = None) -> bool:
    """:func:`ensure_packages` with its errors shown. Call it before a busy block, not inside one: the
    question must not appear under a wait cursor."""
    import slicer.util

    ready = False
    with slicer.util.tryWithErrorDisplay(f"{requester} could not install the Python packages it needs."):
        ready = ensure_packages(missing, requester, required)
    return ready


def export_asking_to_overwrite(export: Callable[[bool], object], failure: str, title: str = "Export"):
    """``export(force)`` with errors shown and a wait cursor; when it refuses because files exist
    (:class:`~doseai.errors.OutputExistsError`), the user is asked, with the normal cursor, and it runs
    again with ``force=True``. Its result, or None when it failed or the user declined."""
    import slicer.util

    from doseai.errors import OutputExistsError

    result, existing = None, None
    with slicer.util.tryWithErrorDisplay(failure, waitCursor=True):
        try:
            result = export(False)
        except OutputExistsError as error:
            existing = error
    if existing is None or not slicer.util.confirmYesNoDisplay(f"{existing}.\n\nOverwrite them?", windowTitle=title):
        return result
    with slicer.util.tryWithErrorDisplay(failure, waitCursor=True):
        result = export(True)
    return result


@contextmanager
def progress_dialog(label: str) -> Iterator[Callable[[str, int], None]]:
    """A progress dialog while the block runs; yields the ``progress(text, percent)`` callback of the
    module logics, which updates the dialog, lets the GUI repaint, and raises
    :class:`~doseai.errors.CancelledError` once the user pressed Cancel (the logics call it between steps,
    so the computation stops there)."""
    import slicer

    from doseai.errors import CancelledError

    dialog = slicer.util.createProgressDialog(labelText=label, maximum=100)

    def report(text: str, percent: int) -> None:
        dialog.labelText = text
        dialog.value = percent
        slicer.app.processEvents()
        if getattr(dialog, "wasCanceled", False):
            raise CancelledError(f"{label}: cancelled")

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
