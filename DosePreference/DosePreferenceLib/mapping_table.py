"""The structure-mapping table of the module panel (a QTableWidget): one row per segment with its canonical
name, role and prescription; filled from and read back into :class:`~DosePreferenceLib.mapping.StructureRow`.
Qt is imported inside the functions, so the module loads on slicer-core."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .mapping import ROLES, TARGET, MappingCheck, StructureRow

COLUMNS = ("Segment", "Structure", "Role", "Rx [Gy]")


def set_up_mapping_table(table) -> None:
    """Columns and headers of an empty table."""
    import qt

    table.setColumnCount(len(COLUMNS))
    table.setHorizontalHeaderLabels(list(COLUMNS))
    table.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
    table.verticalHeader().visible = False


def fill_mapping_table(table, rows: Sequence[StructureRow], onRoleChanged: Callable[[int], None]) -> None:
    """``rows`` in ``table`` (its signals blocked meanwhile); the segment column is read-only, a role is a combo
    box (``onRoleChanged`` on change), an OAR's prescription cell is disabled."""
    import qt

    wasBlocked = table.blockSignals(True)
    table.setRowCount(len(rows))
    for index, row in enumerate(rows):
        segmentItem = qt.QTableWidgetItem(row.segment)
        segmentItem.setFlags(segmentItem.flags() & ~qt.Qt.ItemIsEditable)
        table.setItem(index, 0, segmentItem)
        table.setItem(index, 1, qt.QTableWidgetItem(row.canonical))
        roleBox = qt.QComboBox()
        roleBox.addItems(list(ROLES))
        roleBox.setCurrentIndex(ROLES.index(row.role) if row.role in ROLES else 0)
        roleBox.connect("currentIndexChanged(int)", onRoleChanged)
        table.setCellWidget(index, 2, roleBox)
        rxItem = qt.QTableWidgetItem(f"{row.prescriptionGy:g}" if row.prescriptionGy else "")
        if row.role != TARGET:
            rxItem.setFlags(rxItem.flags() & ~qt.Qt.ItemIsEditable & ~qt.Qt.ItemIsEnabled)
        table.setItem(index, 3, rxItem)
    table.blockSignals(wasBlocked)


def rows_from_table(table) -> list[StructureRow]:
    """The rows as the user edited them (a decimal comma is read as a point; an unreadable prescription is
    None, which the mapping check then asks for)."""
    rows = []
    for index in range(table.rowCount):
        text = table.item(index, 3).text().strip().replace(",", ".") if table.item(index, 3) else ""
        try:
            prescription = float(text) if text else None
        except ValueError:
            prescription = None
        rows.append(StructureRow(table.item(index, 0).text(), table.item(index, 1).text(),
                                 table.cellWidget(index, 2).currentText, prescription))
    return rows


def mapping_html(check: MappingCheck) -> str:
    """The mapping check's errors (red, bold) and notes (grey) as HTML for the status label."""
    errors = "".join(f'<p style="color:#c00000"><b>&#9888; {text}</b></p>' for text in check.errors)
    notes = "".join(f'<p style="color:#606060">{text}</p>' for text in check.notes)
    return errors + notes
