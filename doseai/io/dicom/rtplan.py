"""RT Plan objects written beside every RTDOSE, so that a TPS and Slicer file the dose with its plan.

The RT Dose IOD requires a Referenced RT Plan when the dose is a plan's (DoseSummationType PLAN). A predicted dose
has no plan, so the RTPLAN written for it is a minimal one that says so: research intent, unapproved, the targets
and their prescriptions as dose references, no beams. An optimized plan's RTPLAN holds its beams (gantry and couch
angles, isocentre, energy, jaws around the optimized fluence) with one fraction group; its fluence maps cannot be
held by DICOM without a leaf sequence (not made here) and are written beside it (``fluence.npz``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from doseai.errors import refuse_overwrite
from doseai.io.dicom.writing import (RT_PLAN_STORAGE, RT_STRUCTURE_SET_STORAGE, new_instance, now, save_dataset,
                                     study_info)

PREDICTION_DESCRIPTION = ("Dose predicted by a DoseAI model: a research estimate with no beams, not a deliverable "
                          "plan")


@dataclass(frozen=True)
class PlanBeam:
    """One static photon beam of an optimized plan (IEC 61217 angles; jaws in mm at the isocentre plane)."""

    gantry_deg: float
    isocenter_lps_mm: tuple[float, float, float]
    energy_mv: float = 6.0
    couch_deg: float = 0.0
    jaws_mm: tuple[float, float, float, float] = (-50.0, 50.0, -50.0, 50.0)  # X1, X2, Y1, Y2
    source_axis_distance_mm: float = 1000.0


@dataclass(frozen=True)
class PlanDescription:
    """What an RTPLAN says: ``beams`` empty for a predicted dose."""

    label: str = "DoseAI prediction"
    description: str = PREDICTION_DESCRIPTION
    prescriptions: Mapping[str, float] = field(default_factory=dict)
    beams: Sequence[PlanBeam] = ()
    fractions: int = 35
    machine: str = "DoseAI_PB"  # SH: at most 16 characters


def rtplan_path_for(rtdose_path: str | Path) -> Path:
    """The RTPLAN file beside an RTDOSE: RD.dcm -> RP.dcm, RD_plan.dcm -> RP_plan.dcm, x_RTDOSE.dcm ->
    x_RTPLAN.dcm, anything else -> <name>_RTPLAN.dcm."""
    path = Path(rtdose_path)
    name = path.name
    if name.upper().startswith("RD") and not name[2:3].isalnum():
        return path.with_name("RP" + name[2:])
    if "_RTDOSE" in name:
        return path.with_name(name.replace("_RTDOSE", "_RTPLAN"))
    return path.with_name(f"{path.stem}_RTPLAN.dcm")


def write_rtplan(path: str | Path, reference: Mapping[str, Any], plan: PlanDescription, force: bool = False) -> str:
    """Write ``plan`` as an RT Plan of the patient, study and frame of reference of ``reference`` (what
    :func:`doseai.io.dicom.write_rtdose` is given); returns its SOPInstanceUID."""
    path = Path(path)
    refuse_overwrite(path, force)
    ds = new_instance(RT_PLAN_STORAGE, study_info(reference), "RTPLAN", "4", plan.label[:64])
    ds.RTPlanLabel = plan.label[:16]
    ds.RTPlanName = plan.label[:64]
    ds.RTPlanDescription = plan.description[:1024]
    ds.RTPlanDate, ds.RTPlanTime = now()
    ds.PlanIntent = "RESEARCH"
    ds.ApprovalStatus = "UNAPPROVED"
    structure_set = str(reference.get("RTStructSOPInstanceUID") or "")
    ds.RTPlanGeometry = "PATIENT" if structure_set else "TREATMENT_DEVICE"
    if structure_set:
        item = Dataset()
        item.ReferencedSOPClassUID = RT_STRUCTURE_SET_STORAGE
        item.ReferencedSOPInstanceUID = structure_set
        ds.ReferencedStructureSetSequence = DicomSequence([item])
    if plan.prescriptions:
        ds.DoseReferenceSequence = DicomSequence(
            [_dose_reference(number, name, gy) for number, (name, gy) in enumerate(plan.prescriptions.items(), 1)])
    if plan.beams:
        ds.FractionGroupSequence = DicomSequence([_fraction_group(plan)])
        ds.BeamSequence = DicomSequence([_beam(number, beam, plan.machine)
                                         for number, beam in enumerate(plan.beams, 1)])
    save_dataset(ds, path)
    return str(ds.SOPInstanceUID)


def _dose_reference(number: int, name: str, prescription_gy: float) -> Dataset:
    item = Dataset()
    item.DoseReferenceNumber = str(number)
    item.DoseReferenceUID = generate_uid()
    item.DoseReferenceStructureType = "SITE"  # named by the description: ROI numbers differ between RTSTRUCTs
    item.DoseReferenceDescription = name[:64]
    item.DoseReferenceType = "TARGET"
    item.TargetPrescriptionDose = f"{prescription_gy:g}"
    return item


def _fraction_group(plan: PlanDescription) -> Dataset:
    group = Dataset()
    group.FractionGroupNumber = "1"
    group.NumberOfFractionsPlanned = str(plan.fractions)
    group.NumberOfBeams = str(len(plan.beams))
    group.NumberOfBrachyApplicationSetups = "0"
    references = []
    for number in range(1, len(plan.beams) + 1):
        reference = Dataset()
        reference.ReferencedBeamNumber = str(number)
        references.append(reference)
    group.ReferencedBeamSequence = DicomSequence(references)
    return group


def _beam(number: int, beam: PlanBeam, machine: str) -> Dataset:
    item = Dataset()
    item.BeamNumber = str(number)
    item.BeamName = f"G{beam.gantry_deg:g}"[:64]
    item.BeamDescription = "optimized fluence in fluence.npz; no leaf sequence (jaws only)"
    item.BeamType = "STATIC"
    item.RadiationType = "PHOTON"
    item.TreatmentMachineName = machine[:16]
    item.PrimaryDosimeterUnit = "MU"
    item.SourceAxisDistance = f"{beam.source_axis_distance_mm:g}"
    item.TreatmentDeliveryType = "TREATMENT"
    item.BeamLimitingDeviceSequence = DicomSequence([_device("ASYMX"), _device("ASYMY")])
    item.NumberOfWedges = item.NumberOfCompensators = item.NumberOfBoli = item.NumberOfBlocks = "0"
    item.FinalCumulativeMetersetWeight = "1"
    item.NumberOfControlPoints = "2"
    item.ControlPointSequence = DicomSequence([_first_control_point(beam), _last_control_point()])
    return item


def _device(kind: str) -> Dataset:
    device = Dataset()
    device.RTBeamLimitingDeviceType = kind
    device.NumberOfLeafJawPairs = "1"
    return device


def _first_control_point(beam: PlanBeam) -> Dataset:
    point = Dataset()
    point.ControlPointIndex = "0"
    point.CumulativeMetersetWeight = "0"
    point.NominalBeamEnergy = f"{beam.energy_mv:g}"
    point.GantryAngle = f"{beam.gantry_deg % 360:g}"
    point.GantryRotationDirection = "NONE"
    point.BeamLimitingDeviceAngle = "0"
    point.BeamLimitingDeviceRotationDirection = "NONE"
    point.PatientSupportAngle = f"{beam.couch_deg % 360:g}"
    point.PatientSupportRotationDirection = "NONE"
    point.TableTopEccentricAngle = "0"
    point.TableTopEccentricRotationDirection = "NONE"
    point.TableTopVerticalPosition = point.TableTopLongitudinalPosition = point.TableTopLateralPosition = ""
    point.IsocenterPosition = [f"{value:.2f}" for value in beam.isocenter_lps_mm]
    x1, x2, y1, y2 = beam.jaws_mm
    positions = []
    for kind, pair in (("ASYMX", (x1, x2)), ("ASYMY", (y1, y2))):
        position = Dataset()
        position.RTBeamLimitingDeviceType = kind
        position.LeafJawPositions = [f"{value:.1f}" for value in pair]
        positions.append(position)
    point.BeamLimitingDevicePositionSequence = DicomSequence(positions)
    return point


def _last_control_point() -> Dataset:
    point = Dataset()
    point.ControlPointIndex = "1"
    point.CumulativeMetersetWeight = "1"
    return point
