"""PlanningCase: CT, named structure masks, prescriptions and an optional dose on one grid."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from doseai.errors import GeometryMismatchError, InvalidDoseError, InvalidImageError, MissingStructureError
from doseai.geometry import ImageGeometry
from doseai.structures import is_target, match_structures, prescription_from_name


def validate_dose(dose: np.ndarray, what: str = "dose") -> np.ndarray:
    """Return ``dose`` as float32 Gy, refusing NaN/inf and negative values."""
    dose = np.asarray(dose, dtype=np.float32)
    if not np.isfinite(dose).all():
        raise InvalidDoseError(f"{what} contains NaN or infinite values ({int((~np.isfinite(dose)).sum())} voxels)")
    if dose.min(initial=0.0) < -1e-3:
        raise InvalidDoseError(f"{what} has negative values (min {dose.min():.3g} Gy)")
    return dose


def validate_ct(ct: np.ndarray, what: str = "CT") -> np.ndarray:
    """Return ``ct`` as float32 HU, refusing NaN and infinite voxels (no model or dose engine can use them)."""
    ct = np.asarray(ct, dtype=np.float32)
    bad = ~np.isfinite(ct)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InvalidImageError(
            f"{what} has {int(bad.sum())} NaN or infinite voxel(s) of {ct.size} (first at index z, y, x = {first}): "
            "repair the image (e.g. replace them with -1000 HU) before using it")
    return ct


@dataclass
class PlanningCase:
    """One patient on one grid. Arrays are indexed [z, y, x]; masks are bool; CT in HU; dose in Gy.

    ``structures`` is keyed by canonical name (see :mod:`doseai.structures`); ``prescriptions`` maps
    target names to Gy. ``possible_dose_mask`` is where dose may be non-zero (OpenKBP scoring);
    ``metadata`` keeps provenance such as DICOM StudyInstanceUID and FrameOfReferenceUID.
    ``partial_volumes`` holds, for a case on a grid coarser than its structures (a dose grid, see
    :mod:`doseai.dose_grid`), each structure's :class:`~doseai.dvh.PartialVolume`: DVHs and metrics weigh the
    boundary voxels by it, while ``structures`` (the masks the model reads) hold the voxels at least half inside.
    """

    geometry: ImageGeometry
    ct: np.ndarray | None = None
    structures: dict[str, np.ndarray] = field(default_factory=dict)
    prescriptions: dict[str, float] = field(default_factory=dict)
    dose: np.ndarray | None = None
    possible_dose_mask: np.ndarray | None = None
    patient_id: str = "anonymous"
    metadata: dict[str, str] = field(default_factory=dict)
    partial_volumes: dict[str, object] = field(default_factory=dict)  # name -> doseai.dvh.PartialVolume

    def __post_init__(self) -> None:
        if self.ct is not None:
            self.ct = validate_ct(self._on_grid(self.ct, "CT"))
        self.structures = {name: self._on_grid(mask, f"structure '{name}'").astype(bool, copy=False)
                           for name, mask in self.structures.items()}
        if self.dose is not None:
            self.dose = validate_dose(self._on_grid(self.dose, "dose"))
        if self.possible_dose_mask is not None:
            self.possible_dose_mask = self._on_grid(self.possible_dose_mask, "possible-dose mask").astype(bool)
        for name, partial in self.partial_volumes.items():
            if tuple(partial.shape) != self.geometry.shape:
                raise GeometryMismatchError(f"partial volumes of '{name}' are on a {partial.shape} grid, "
                                            f"the case on {self.geometry.shape}")
        for name, gy in self.prescriptions.items():
            if not np.isfinite(gy) or gy <= 0:
                raise MissingStructureError(f"prescription of '{name}' must be a positive dose in Gy, got {gy}")

    def _on_grid(self, array: np.ndarray, what: str) -> np.ndarray:
        array = np.asarray(array)
        if array.shape != self.geometry.shape:
            raise GeometryMismatchError(
                f"{what} has shape {array.shape} but the case grid is {self.geometry.shape}; resample it first"
            )
        return array

    @classmethod
    def from_named_masks(
        cls,
        geometry: ImageGeometry,
        masks: Mapping[str, np.ndarray],
        ct: np.ndarray | None = None,
        dose: np.ndarray | None = None,
        overrides: Mapping[str, str | None] | None = None,
        prescriptions: Mapping[str, float] | None = None,
        **kwargs,
    ) -> "PlanningCase":
        """Build a case from raw structure names: names are matched to canonical ones and target
        prescriptions read from names (``PTV70``) unless given in ``prescriptions`` (canonical names)."""
        mapping = match_structures(masks.keys(), overrides)
        structures = {mapping[raw]: mask for raw, mask in masks.items() if raw in mapping}
        found = {name: prescription_from_name(name) for name in structures if is_target(name)}
        rx = {name: gy for name, gy in found.items() if gy is not None}
        rx.update(prescriptions or {})
        return cls(geometry=geometry, ct=ct, structures=structures, prescriptions=rx, dose=dose, **kwargs)

    # --- queries -------------------------------------------------------------------------------
    @property
    def targets(self) -> list[str]:
        """Target structures that have a prescription, highest dose first."""
        return sorted(self.prescriptions, key=lambda name: -self.prescriptions[name])

    @property
    def oars(self) -> list[str]:
        return [name for name in self.structures if not is_target(name) and name != "External"]

    def mask(self, name: str) -> np.ndarray:
        """The mask of ``name``; a missing structure is an empty mask (stated by :meth:`missing`)."""
        if name in self.structures:
            return self.structures[name]
        return np.zeros(self.geometry.shape, dtype=bool)

    def missing(self, names) -> list[str]:
        return [n for n in names if n not in self.structures or not self.structures[n].any()]

    def require_target(self) -> None:
        if not self.prescriptions:
            raise MissingStructureError(f"no target with a prescription. {self._naming_help()}")
        for name in self.prescriptions:
            if name not in self.structures or not self.structures[name].any():
                raise MissingStructureError(f"target '{name}' has a prescription but its mask is missing or empty")

    def _naming_help(self) -> str:
        """What the case holds and how to name a target, for the error when it has none."""
        from doseai.structures import canonical_name

        targets = [name for name in self.structures if is_target(name)]
        unknown = [name for name in self.structures if canonical_name(name) is None]
        parts = [f"Structures: {', '.join(self.structures) or 'none'}."]
        if targets:
            parts.append(f"Target(s) without a dose in the name: {', '.join(targets)}; give it with "
                         f"--prescription {targets[0]}=70 (Slicer: the structure table's prescription).")
        if unknown:
            parts.append(f"Names not recognised: {', '.join(unknown)}; map one to a target with "
                         f"--map '{unknown[0]}=PTV_70' (Slicer: the structure table).")
        if not targets and not unknown:
            parts.append("None is a target: a PTV named with its dose (e.g. 'PTV_70', 'PTV7000') is needed.")
        return " ".join(parts)

    @property
    def max_prescription(self) -> float:
        self.require_target()
        return max(self.prescriptions.values())

    def with_dose(self, dose: np.ndarray) -> "PlanningCase":
        """A copy sharing CT and masks, holding ``dose`` (validated and on this grid)."""
        return PlanningCase(
            geometry=self.geometry, ct=self.ct, structures=self.structures, prescriptions=self.prescriptions,
            dose=dose, possible_dose_mask=self.possible_dose_mask, patient_id=self.patient_id,
            metadata=dict(self.metadata), partial_volumes=self.partial_volumes,
        )
