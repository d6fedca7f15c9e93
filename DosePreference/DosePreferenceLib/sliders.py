"""The module's preference sliders, one per condition of the model card (doseai.conditions): built at run time,
so that a model with other sliders needs no change here or in the .ui.

The values live in the module's parameter node (saved with the scene) as ``DoseAI.Slider.<name>`` parameters:
the typed parameter node wrapper declares its fields in code, and these fields come from the card.
Qt is imported only by :meth:`PreferenceSliders.build`, so the rest loads on slicer-core.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

PARAMETER_PREFIX = "DoseAI.Slider."
SLIDER_UPDATE_DELAY_MS = 150  # a slider update waits until the slider rested this long (debounce)
POLL_INTERVAL_MS = 20  # how often the GUI looks whether the worker thread has finished a dose


def stored_values(parameterNode, conditions) -> dict[str, float]:
    """The slider values kept in ``parameterNode`` (a vtkMRMLScriptedModuleNode), neutral where none is kept or
    the kept one is out of the slider's range (e.g. a scene saved with another model)."""
    values = {}
    for condition in conditions:
        text = parameterNode.GetParameter(PARAMETER_PREFIX + condition.name) if parameterNode else ""
        try:
            value = float(text) if text else condition.neutral
        except ValueError:
            value = condition.neutral
        values[condition.name] = value if condition.low <= value <= condition.high else condition.neutral
    return values


def store_values(parameterNode, values: Mapping[str, float]) -> None:
    """Keep ``values`` (by slider name) in ``parameterNode``: one Modified event for all of them."""
    wasModifying = parameterNode.StartModify()
    for name, value in values.items():
        parameterNode.SetParameter(PARAMETER_PREFIX + name, f"{float(value):g}")
    parameterNode.EndModify(wasModifying)


class PreferenceSliders:
    """One ctkSliderWidget per condition in ``container`` (a QWidget of the .ui), labelled and explained by the
    card; a user's move calls ``onMoved(name, value)``."""

    def __init__(self, container, onMoved: Callable[[str, float], None]) -> None:
        self._container, self._onMoved = container, onMoved
        self._layout = None
        self.conditions = None
        self.widgets: dict = {}  # slider name -> ctkSliderWidget
        self._showing = False  # True while the values are put into the widgets (not a user's move)

    def build(self, conditions) -> None:
        """Sliders for ``conditions`` (a ConditionSpace, or None: no model card, no sliders); built again only when
        the conditions changed."""
        if conditions == self.conditions:
            return
        import ctk
        import qt

        if self._layout is None:
            self._layout = qt.QFormLayout(self._container)
        while self._layout.rowCount() > 0:
            self._layout.removeRow(0)
        self.conditions, self.widgets = conditions, {}
        for condition in conditions or ():
            slider = ctk.ctkSliderWidget()
            slider.decimals, slider.singleStep, slider.pageStep = 2, 0.05, 0.25
            slider.minimum, slider.maximum, slider.value = condition.low, condition.high, condition.neutral
            slider.toolTip = condition.tooltip
            slider.connect("valueChanged(double)", lambda value, name=condition.name: self._moved(name, value))
            self._layout.addRow(f"{condition.label}:", slider)
            self.widgets[condition.name] = slider
        if not self.widgets:
            self._layout.addRow(qt.QLabel("Model card not found: the model's sliders are unknown."))

    def _moved(self, name: str, value: float) -> None:
        if not self._showing:
            self._onMoved(name, float(value))

    def show(self, values: Mapping[str, float]) -> None:
        """Put ``values`` into the sliders without calling ``onMoved``."""
        self._showing = True
        try:
            for name, value in values.items():
                if name in self.widgets and self.widgets[name].value != value:
                    self.widgets[name].value = value
        finally:
            self._showing = False
