"""DVH curves and metrics as table, plot series and chart nodes (one table + series per structure
in one chart, as SlicerRT's DVH module does), and :func:`show_case_dvh`, the DVH display both modules
use: a dose's curves solid, a reference dose's (clinical plan, desired dose) dashed, and a metrics table;
and the draggable curve of DVH editing (:func:`editable_curve`, :func:`read_curve`, :func:`set_point_dragging`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from doseai.mrml.colors import structure_color

DOSE_COLUMN = "Dose [Gy]"
VOLUME_PCT_COLUMN = "Volume [%]"
VOLUME_CC_COLUMN = "Volume [cc]"
STRUCTURE_ATTRIBUTE = "DoseAI.Structure"  # on DVH series and tables: the structure they show
REFERENCE_ATTRIBUTE = "DoseAI.ReferenceStructure"  # the same, on the dashed curves of a reference dose
CHART_ATTRIBUTE = "DoseAI.DVHChart"  # on DVH charts: the name_prefix they were made with
METRICS_ATTRIBUTE = "DoseAI.MetricsTable"
EDIT_ATTRIBUTE = "DoseAI.EditedStructure"  # on the draggable desired-DVH curve of a chart (table and series)
# on the dotted curves of sampled doses' DVH band (doseai.report.DVHBand): its low and its high edge
BAND_ATTRIBUTES = ("DoseAI.BandLowStructure", "DoseAI.BandHighStructure")


def _double_column(name: str, values) -> vtk.vtkDoubleArray:
    column = numpy_support.numpy_to_vtk(np.ascontiguousarray(values, dtype=np.float64), deep=True)
    column.SetName(name)
    return column


def _fill_dvh_table(table_node, dvh) -> None:
    table = vtk.vtkTable()
    table.AddColumn(_double_column(DOSE_COLUMN, dvh.dose_gy))
    table.AddColumn(_double_column(VOLUME_PCT_COLUMN, dvh.volume_pct))
    table.AddColumn(_double_column(VOLUME_CC_COLUMN, dvh.volume_cc))
    was_modifying = table_node.StartModify()
    table_node.SetAndObserveTable(table)
    table_node.SetColumnUnitLabel(DOSE_COLUMN, "Gy")
    table_node.SetColumnUnitLabel(VOLUME_PCT_COLUMN, "%")
    table_node.SetColumnUnitLabel(VOLUME_CC_COLUMN, "cc")
    table_node.SetColumnDescription(VOLUME_PCT_COLUMN, "fraction of the structure receiving at least the dose")
    table_node.SetUseColumnTitleAsColumnHeader(True)
    table_node.EndModify(was_modifying)


def _find_chart(scene, name_prefix: str):
    charts = scene.GetNodesByClass("vtkMRMLPlotChartNode")
    for index in range(charts.GetNumberOfItems()):
        chart = charts.GetItemAsObject(index)
        if chart.GetAttribute(CHART_ATTRIBUTE) == name_prefix:
            return chart
    return None


def _chart_series(chart_node, attribute: str = STRUCTURE_ATTRIBUTE) -> dict[str, object]:
    """The DVH series of a chart that carry ``attribute`` (plan or reference curves), keyed by structure."""
    series = {}
    for index in range(chart_node.GetNumberOfPlotSeriesNodes()):
        node = chart_node.GetNthPlotSeriesNode(index)
        if node is not None and node.GetAttribute(attribute):
            series[node.GetAttribute(attribute)] = node
    return series


def show_dvh(
    scene,
    dvhs: Mapping[str, object],
    colors: Mapping[str, tuple] | None = None,
    chartNode=None,
    name_prefix: str = "DVH",
    reference: Mapping[str, object] | None = None,
    reference_label: str = "reference",
    bands: Mapping[str, object] | None = None,
):
    """Show cumulative DVHs (``{name: doseai.dvh.DVH}``) in one plot chart; returns the chart node.

    Each structure gets a table node (columns ``Dose [Gy]``, ``Volume [%]``, ``Volume [cc]``) and a
    line series (``colors[name]`` as RGB in [0, 1], else a fixed colour per structure name). Called
    again with the same chart (or, without ``chartNode``, the same ``name_prefix``) it updates the
    existing tables and series, adds missing ones and removes those of structures no longer given.

    ``reference`` (DVHs of a reference dose, e.g. the clinical plan) adds dashed curves in the same
    colours for comparison, named "<structure> (``reference_label``)"; without it, dashed curves shown
    before are removed. ``bands`` (``{name: doseai.report.DVHBand}``, e.g. the 5-95 % range of sampled doses'
    curves) adds each structure's band as two dotted curves (its low and high edge) in the same colour.
    """
    colors = colors or {}
    if chartNode is None:
        chartNode = _find_chart(scene, name_prefix)
    if chartNode is None:
        chartNode = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(f"{name_prefix} chart"))
    was_modifying = chartNode.StartModify()
    chartNode.SetAttribute(CHART_ATTRIBUTE, name_prefix)
    notes = ([f"dashed: {reference_label}"] if reference else []) + (["dotted: 5-95 % of samples"] if bands else [])
    chartNode.SetTitle("Dose-volume histogram" + (f" ({'; '.join(notes)})" if notes else ""))
    chartNode.SetXAxisTitle("Dose [Gy]")
    chartNode.SetYAxisTitle("Volume [%]")
    chartNode.SetLegendVisibility(True)
    _sync_series(scene, chartNode, dvhs, colors, name_prefix, STRUCTURE_ATTRIBUTE, "",
                 slicer.vtkMRMLPlotSeriesNode.LineStyleSolid)
    _sync_series(scene, chartNode, reference or {}, colors, name_prefix, REFERENCE_ATTRIBUTE, f" ({reference_label})",
                 slicer.vtkMRMLPlotSeriesNode.LineStyleDash)
    for edge, (attribute, label) in enumerate(zip(BAND_ATTRIBUTES, (" (samples 5 %)", " (samples 95 %)"))):
        _sync_series(scene, chartNode, _band_edges(bands or {}, dvhs, edge), colors, name_prefix, attribute, label,
                     slicer.vtkMRMLPlotSeriesNode.LineStyleDot)
    _keep_editable_curve_last(chartNode)
    chartNode.EndModify(was_modifying)
    return chartNode


def _band_edges(bands: Mapping[str, object], dvhs: Mapping[str, object], edge: int) -> dict:
    """One edge (0: low, 1: high) of each band as a DVH (for its table's cc column, the structure's volume)."""
    from doseai.dvh import DVH

    edges = {}
    for name, band in bands.items():
        total = dvhs[name].total_cc if name in dvhs else 0.0
        pct = band.low_pct if edge == 0 else band.high_pct
        edges[name] = DVH(name, band.dose_gy, pct * total / 100.0, total)
    return edges


def _sync_series(scene, chartNode, dvhs, colors, name_prefix, attribute, suffix, line_style) -> None:
    """Make the chart's series tagged ``attribute`` show exactly ``dvhs`` (add, update, remove)."""
    existing = _chart_series(chartNode, attribute)
    for name, series in existing.items():
        if name not in dvhs:
            chartNode.RemovePlotSeriesNodeID(series.GetID())
            table = series.GetTableNode()
            scene.RemoveNode(series)
            if table is not None and table.GetAttribute(attribute):
                scene.RemoveNode(table)

    for name, dvh in dvhs.items():
        series = existing.get(name)
        table = series.GetTableNode() if series is not None else None
        if table is None:
            table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name_prefix} {name}{suffix} table")
            table.SetAttribute(attribute, name)
        table.SetName(f"{name_prefix} {name}{suffix} table")  # the label may change (reference -> desired)
        _fill_dvh_table(table, dvh)
        if series is None:
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name_prefix} {name}{suffix}")
            series.SetAttribute(attribute, name)
            chartNode.AddAndObservePlotSeriesNodeID(series.GetID())
        series.SetName(f"{name_prefix} {name}{suffix}")
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName(DOSE_COLUMN)
        series.SetYColumnName(VOLUME_PCT_COLUMN)
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        series.SetLineStyle(line_style)
        series.SetLineWidth(2)
        series.SetColor(*[float(c) for c in tuple(colors.get(name, structure_color(name)))[:3]])


def _edit_series(chartNode):
    for index in range(chartNode.GetNumberOfPlotSeriesNodes()):
        node = chartNode.GetNthPlotSeriesNode(index)
        if node is not None and node.GetAttribute(EDIT_ATTRIBUTE) is not None:
            return node
    return None


def _keep_editable_curve_last(chartNode) -> None:
    """Put the draggable curve at the end of the chart's series. VTK's chart grabs the point of the last plot
    under the mouse, and the dashed desired curve of the edited structure lies exactly under the draggable
    one: were it later in the chart, a drag would move the dashed curve's points and the edit would be lost."""
    series = _edit_series(chartNode)
    count = chartNode.GetNumberOfPlotSeriesNodes()
    if series is not None and chartNode.GetNthPlotSeriesNode(count - 1) is not series:
        chartNode.RemovePlotSeriesNodeID(series.GetID())
        chartNode.AddAndObservePlotSeriesNodeID(series.GetID())


def editable_curve(scene, chartNode, structure: str, dose_gy, volume_pct, color=None,
                   label: str = "drag to edit"):
    """A curve of ``chartNode`` whose points a plot view in move-points mode can drag: a table node (columns
    ``Dose [Gy]``, ``Volume [%]``) and a dashed series with markers, both tagged ``EDIT_ATTRIBUTE`` =
    ``structure``. A chart has one: called again it shows the new curve in the same nodes (values written in
    place when the number of points is unchanged, so a drag in progress keeps its table); without ``color`` it
    keeps its colour (a new one gets the structure's fixed colour). Returns the table."""
    series = _edit_series(chartNode)
    table = series.GetTableNode() if series is not None else None
    prefix = chartNode.GetAttribute(CHART_ATTRIBUTE) or "DVH"
    name = f"{prefix} {structure} ({label})"
    dose = np.ascontiguousarray(dose_gy, dtype=np.float64)
    volume = np.ascontiguousarray(volume_pct, dtype=np.float64)
    if table is None:
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} table")
    was_modifying = table.StartModify()
    table.SetName(f"{name} table")
    table.SetAttribute(EDIT_ATTRIBUTE, structure)
    data = table.GetTable()
    columns = [data.GetColumnByName(c) for c in (DOSE_COLUMN, VOLUME_PCT_COLUMN)] if data is not None else []
    if len(columns) == 2 and all(isinstance(c, vtk.vtkDataArray) and c.GetNumberOfTuples() == dose.size
                                 for c in columns):
        for column, values in zip(columns, (dose, volume)):
            numpy_support.vtk_to_numpy(column)[:] = values
            column.Modified()
        data.Modified()
    else:
        new_table = vtk.vtkTable()
        new_table.AddColumn(_double_column(DOSE_COLUMN, dose))
        new_table.AddColumn(_double_column(VOLUME_PCT_COLUMN, volume))
        table.SetAndObserveTable(new_table)
        table.SetColumnUnitLabel(DOSE_COLUMN, "Gy")
        table.SetColumnUnitLabel(VOLUME_PCT_COLUMN, "%")
        table.SetUseColumnTitleAsColumnHeader(True)
    table.Modified()
    table.EndModify(was_modifying)
    if series is None:
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
        chartNode.AddAndObservePlotSeriesNodeID(series.GetID())
        color = structure_color(structure) if color is None else color
    _keep_editable_curve_last(chartNode)
    series.SetName(name)
    series.SetAttribute(EDIT_ATTRIBUTE, structure)
    series.SetAndObserveTableNodeID(table.GetID())
    series.SetXColumnName(DOSE_COLUMN)
    series.SetYColumnName(VOLUME_PCT_COLUMN)
    series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
    series.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleDash)
    series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
    series.SetMarkerSize(9)
    series.SetLineWidth(2)
    if color is not None:  # else the colour it has
        series.SetColor(*[float(c) for c in tuple(color)[:3]])
    return table


def editable_curve_table(chartNode):
    """The table of the chart's draggable curve (see :func:`editable_curve`), or None."""
    series = _edit_series(chartNode) if chartNode is not None else None
    return series.GetTableNode() if series is not None else None


def editable_curve_chart(tableNode):
    """The DVH chart whose draggable curve is ``tableNode`` (see :func:`editable_curve`), or None."""
    charts = tableNode.GetScene().GetNodesByClass("vtkMRMLPlotChartNode")
    for index in range(charts.GetNumberOfItems()):
        if editable_curve_table(charts.GetItemAsObject(index)) is tableNode:
            return charts.GetItemAsObject(index)
    return None


def remove_editable_curve(chartNode) -> None:
    """Take the draggable curve (series and table) out of the chart and the scene."""
    series = _edit_series(chartNode) if chartNode is not None else None
    if series is None:
        return
    scene, table = chartNode.GetScene(), series.GetTableNode()
    chartNode.RemovePlotSeriesNodeID(series.GetID())
    scene.RemoveNode(series)
    if table is not None and table.GetAttribute(EDIT_ATTRIBUTE) is not None:
        scene.RemoveNode(table)


def read_curve(tableNode) -> tuple[np.ndarray, np.ndarray]:
    """The ``Dose [Gy]`` and ``Volume [%]`` columns of a DVH table node (e.g. after points were dragged)."""
    table = tableNode.GetTable() if tableNode is not None else None
    columns = [table.GetColumnByName(c) for c in (DOSE_COLUMN, VOLUME_PCT_COLUMN)] if table is not None else [None]
    if any(column is None for column in columns):
        from doseai.errors import DoseAIError

        raise DoseAIError(f"table '{tableNode.GetName() if tableNode else None}' has no '{DOSE_COLUMN}' and "
                          f"'{VOLUME_PCT_COLUMN}' columns")
    return tuple(np.array(numpy_support.vtk_to_numpy(column), dtype=np.float64) if isinstance(column, vtk.vtkDataArray)
                 else np.array([column.GetVariantValue(i).ToDouble() for i in range(column.GetNumberOfTuples())])
                 for column in columns)


def set_point_dragging(chartNode, enabled: bool) -> int:
    """Plot views showing ``chartNode`` drag points of its curves vertically (``enabled``; doses stay where
    they are) or pan (not ``enabled``, the default mode). Returns how many plot views were switched."""
    was_modifying = chartNode.StartModify()
    chartNode.SetEnablePointMoveAlongX(not enabled)
    chartNode.SetEnablePointMoveAlongY(True)
    chartNode.EndModify(was_modifying)
    views = chartNode.GetScene().GetNodesByClass("vtkMRMLPlotViewNode")
    switched = 0
    for index in range(views.GetNumberOfItems()):
        view = views.GetItemAsObject(index)
        if view.GetPlotChartNodeID() != chartNode.GetID():
            continue
        was_modifying = view.StartModify()
        view.SetEnablePointMoveAlongX(not enabled)
        view.SetEnablePointMoveAlongY(True)
        view.SetInteractionMode(slicer.vtkMRMLPlotViewNode.InteractionModeMovePoints if enabled
                                else slicer.vtkMRMLPlotViewNode.InteractionModePanView)
        view.EndModify(was_modifying)
        switched += 1
    return switched


def _unit(metric: str) -> str:
    if metric.startswith("D") or metric == "prescription":
        return "Gy"
    if metric.startswith("V") and (metric.endswith("%") or metric.endswith("Gy")):
        return "%"
    if metric.endswith("_cc"):
        return "cc"
    return ""


def metrics_table(scene, metrics: Mapping[str, Mapping[str, float]], tableNode=None, name: str = "DVH metrics"):
    """A table node with one row per structure and one column per metric (union over structures,
    in order of first appearance; a metric a structure lacks is NaN).

    Updates ``tableNode`` when given, else the table made before under the same ``name``, else adds one.
    """
    columns: list[str] = []
    for values in metrics.values():
        for key in values:
            if key not in columns:
                columns.append(key)
    table = vtk.vtkTable()
    names = vtk.vtkStringArray()
    names.SetName("Structure")
    for structure in metrics:
        names.InsertNextValue(structure)
    table.AddColumn(names)
    for key in columns:
        values = [float(metrics[structure].get(key, math.nan)) for structure in metrics]
        table.AddColumn(_double_column(key, values))
    if tableNode is None:
        tables = scene.GetNodesByClass("vtkMRMLTableNode")
        for index in range(tables.GetNumberOfItems()):
            if tables.GetItemAsObject(index).GetAttribute(METRICS_ATTRIBUTE) == name:
                tableNode = tables.GetItemAsObject(index)
                break
    if tableNode is None:
        tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    was_modifying = tableNode.StartModify()
    tableNode.SetAttribute(METRICS_ATTRIBUTE, name)
    tableNode.SetAndObserveTable(table)
    for key in columns:
        unit = _unit(key)
        if unit:
            tableNode.SetColumnUnitLabel(key, unit)
    tableNode.EndModify(was_modifying)
    return tableNode


@dataclass
class DVHResult:
    """What :func:`show_case_dvh` made: the case on the CT grid, the DVHs and metrics per structure, the
    chart and table nodes that show them, the structures left out (empty on the grid) and the dashed
    reference DVHs (None without a reference) with what they are (``referenceLabel``)."""

    case: object
    dvhs: dict
    metrics: dict[str, dict[str, float]]
    chartNode: object
    metricsTableNode: object
    emptyStructures: list[str] = field(default_factory=list)
    referenceDVHs: dict | None = None
    referenceLabel: str = "reference"

    def summary(self) -> str:
        """One line for the status label: how many DVHs, the dashed reference, structures left out as empty."""
        text = f"DVH of {len(self.dvhs)} structures"
        if self.referenceDVHs:
            text += f" (dashed: {self.referenceLabel} dose)"
        if self.emptyStructures:
            text += f"; empty on the CT grid, left out: {', '.join(self.emptyStructures)}"
        return text


def show_case_dvh(case, dose, segNode, name: str, overrides: Mapping[str, str | None] | None = None,
                  chartNode=None, metricsTableNode=None, reference: Mapping[str, object] | None = None,
                  reference_label: str = "reference", bin_width_gy: float = 0.1,
                  bands: Mapping[str, object] | None = None) -> DVHResult:
    """DVH curves of ``dose`` (on the grid of ``case``) for every structure of the case, in segment
    colours, in one chart, and their metrics in a table, both named after ``name`` (and updated in place
    when given); ``reference`` DVHs (e.g. ``case_dvhs(case, other_dose)``) are added dashed, ``bands``
    (doseai.report.dvh_bands of sampled doses) dotted."""
    from doseai.mrml.nodes import segment_colors
    from doseai.report import case_dvhs, case_metrics

    scene = segNode.GetScene()
    dvhs = case_dvhs(case, dose, bin_width_gy=bin_width_gy)
    metrics = case_metrics(case, dose)
    chartNode = show_dvh(scene, dvhs, colors=segment_colors(segNode, overrides), chartNode=chartNode,
                         name_prefix=f"{name} DVH", reference=reference, reference_label=reference_label,
                         bands=bands)
    metricsTableNode = metrics_table(scene, metrics, tableNode=metricsTableNode, name=f"{name} DVH metrics")
    empty = [structure for structure in case.structures if structure not in dvhs]
    return DVHResult(case, dvhs, metrics, chartNode, metricsTableNode, empty, reference, reference_label)
