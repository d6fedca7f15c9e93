"""RT Plan objects written beside every RTDOSE: kept importable here, the writer is :mod:`doseai.io.dicom.rtplan`."""

from doseai.io.dicom.rtplan import PREDICTION_DESCRIPTION, PlanBeam, PlanDescription, rtplan_path_for, write_rtplan

__all__ = ["PREDICTION_DESCRIPTION", "PlanBeam", "PlanDescription", "rtplan_path_for", "write_rtplan"]
