"""DICOM-RT input and output: CT series, RTSTRUCT, RTDOSE, RTPLAN and whole planning cases.

Arrays are indexed [z, y, x] on an :class:`ImageGeometry` (LPS, mm) as everywhere in ``doseai``.
DICOM image planes give the first two direction columns (ImageOrientationPatient: row, then column
direction); the slice axis is their cross product, slices are ordered by position along it. A grid
whose slice axis points the other way (left-handed direction) is therefore written as its z-flipped,
right-handed equivalent: same voxels in space, ``array[::-1]``, origin at the former last slice.

Structures are stored as CLOSED_PLANAR contours that run through the edge midpoints between voxel
centres (marching squares at level 0.5), and read back by even-odd filling with voxel-centre
inclusion, so a mask written here comes back voxel for voxel, holes included.

Modules, imported one way (each only from those above it): ``writing`` (SOP classes, study attributes, what
every written object shares), ``reading`` (folder scans, headers, plane geometry), ``ct``, ``rtstruct``,
``rtplan``, ``rtdose`` (writes its RTPLAN), ``cases`` (whole cases).
"""

from doseai.io.dicom.cases import read_dicom_case, write_dicom_case
from doseai.io.dicom.ct import read_ct_series, write_ct_series
from doseai.io.dicom.rtdose import read_rtdose, write_rtdose
from doseai.io.dicom.rtplan import PREDICTION_DESCRIPTION, PlanBeam, PlanDescription, rtplan_path_for, write_rtplan
from doseai.io.dicom.rtstruct import read_rtstruct, write_rtstruct
from doseai.io.dicom.writing import (CT_IMAGE_STORAGE, REFERENCE_KEYS, RT_DOSE_STORAGE, RT_PLAN_STORAGE,
                                     RT_STRUCTURE_SET_STORAGE, UINT32_MAX)

__all__ = [
    "read_ct_series",
    "write_ct_series",
    "read_rtstruct",
    "write_rtstruct",
    "read_rtdose",
    "write_rtdose",
    "read_dicom_case",
    "write_dicom_case",
    "PlanBeam",
    "PlanDescription",
    "PREDICTION_DESCRIPTION",
    "rtplan_path_for",
    "write_rtplan",
    "REFERENCE_KEYS",
    "CT_IMAGE_STORAGE",
    "RT_STRUCTURE_SET_STORAGE",
    "RT_DOSE_STORAGE",
    "RT_PLAN_STORAGE",
    "UINT32_MAX",
]
