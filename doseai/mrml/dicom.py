"""The DICOM study a CT volume came from, for an exported RTDOSE to land in it (study, frame of
reference, patient), read through a lookup such as Slicer's DICOM database."""

from __future__ import annotations

from collections.abc import Callable

# DICOM keyword -> tag as Slicer's DICOM database spells it (ctkDICOMDatabase.instanceValue)
REFERENCE_TAGS: dict[str, str] = {
    "StudyInstanceUID": "0020,000D",
    "FrameOfReferenceUID": "0020,0052",
    "PatientID": "0010,0020",
    "PatientName": "0010,0010",
    "PatientBirthDate": "0010,0030",
    "PatientSex": "0010,0040",
    "StudyDate": "0008,0020",
    "StudyTime": "0008,0030",
    "StudyID": "0020,0010",
    "StudyDescription": "0008,1030",
    "AccessionNumber": "0008,0050",
    "ReferringPhysicianName": "0008,0090",
}
SOP_INSTANCE_UID_TAG = "0008,0018"
INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"  # set by Slicer's scalar volume plugin on loaded volumes

# (instance UID, tag "gggg,eeee") -> value, "" when unknown; e.g. slicer.dicomDatabase.instanceValue
Lookup = Callable[[str, str], str]


def instance_uids(node) -> list[str]:
    """The DICOM SOP instance UIDs a node was loaded from: the node's ``DICOM.instanceUIDs`` attribute, or
    else its subject-hierarchy item's instance UID, where SlicerRT keeps an RTSTRUCT's. None for data that
    did not come from DICOM."""
    if node is None:
        return []
    value = node.GetAttribute(INSTANCE_UIDS_ATTRIBUTE)
    if not value and node.GetScene() is not None:
        import slicer

        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
        item = sh.GetItemByDataNode(node) if sh is not None else 0
        # where Slicer's DICOM plugins and SlicerRT keep a series' SOP instance UIDs; SlicerRT's RTSTRUCT import
        # sets only this (vtkSlicerDicomRtImportExportModuleLogic::InsertSeriesInSubjectHierarchy)
        uid_name = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMInstanceUIDName()
        value = sh.GetItemUID(item, uid_name) if item else ""
    return value.split() if value else []


def dicom_reference(ctNode, lookup: Lookup | None, segNode=None) -> dict[str, str]:
    """Patient, study and frame of reference of the CT's DICOM series, for ``write_rtdose``'s
    ``reference_meta``, so the exported RTDOSE lands in the CT's study on the CT's frame of reference.

    Empty when the CT did not come from DICOM or no lookup is available: the RTDOSE then gets fresh
    UIDs. The first CT instance answers (a series shares study and frame of reference). A
    segmentation loaded from an RTSTRUCT is referenced too.
    """
    uids = instance_uids(ctNode)
    if not uids or lookup is None:
        return {}
    reference = {}
    for keyword, tag in REFERENCE_TAGS.items():
        value = (lookup(uids[0], tag) or "").strip()
        if value:
            reference[keyword] = value
    structure_uids = instance_uids(segNode)
    if structure_uids:
        reference["RTStructSOPInstanceUID"] = structure_uids[0]
    return reference


def database_lookup(database) -> Lookup | None:
    """A :data:`Lookup` over a ``ctkDICOMDatabase`` (``slicer.dicomDatabase`` in the application): the
    cached tag value, else the one in the instance file's header. None when there is no open database."""
    if database is None or not database.isOpen:
        return None

    def lookup(instanceUID: str, tag: str) -> str:
        value = database.instanceValue(instanceUID, tag)
        if not value:  # a tag the database did not cache: read it from the file's header
            path = database.fileForInstance(instanceUID)
            value = database.fileValue(path, tag) if path else ""
        return value

    return lookup
