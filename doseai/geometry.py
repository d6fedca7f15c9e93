"""Image grid geometry in SimpleITK conventions (LPS, mm, arrays indexed [z, y, x])."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from doseai.errors import GeometryMismatchError

IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class ImageGeometry:
    """A 3D grid: ``shape`` is the numpy array shape (nz, ny, nx); spacing/origin are (x, y, z)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = IDENTITY_DIRECTION

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))
        object.__setattr__(self, "direction", tuple(float(d) for d in self.direction))
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise GeometryMismatchError(f"a 3D grid needs three positive sizes, got shape {self.shape}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise GeometryMismatchError(f"voxel spacing must be three positive numbers, got {self.spacing}")
        if len(self.direction) != 9:
            raise GeometryMismatchError("direction must hold 9 numbers (a row-major 3x3 matrix)")
        if not np.isfinite(self.spacing + self.origin + self.direction).all():
            raise GeometryMismatchError(f"the grid has a NaN or infinite spacing, origin or direction "
                                        f"(spacing {self.spacing}, origin {self.origin})")
        d = np.array(self.direction).reshape(3, 3)
        if np.abs(d.T @ d - np.eye(3)).max() > 1e-3:
            raise GeometryMismatchError(f"the grid's direction cosines {self.direction} are not orthonormal: the "
                                        "image header is corrupt")

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def obliquity_deg(self) -> float:
        """How far the grid's axes turn from the nearest patient axes (0 for an axial, sagittal or coronal
        grid; an oblique acquisition or a tilted gantry gives more)."""
        d = np.abs(self.direction_matrix)
        return float(np.degrees(np.arccos(np.clip(d.max(axis=0), -1.0, 1.0))).max())

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "ImageGeometry":
        size = image.GetSize()
        return cls(
            shape=(size[2], size[1], size[0]),
            spacing=image.GetSpacing(),
            origin=image.GetOrigin(),
            direction=image.GetDirection(),
        )

    def to_sitk(self, array: np.ndarray) -> sitk.Image:
        """Wrap ``array`` (shape == self.shape) as a SimpleITK image on this grid."""
        if tuple(array.shape) != self.shape:
            raise GeometryMismatchError(f"array shape {array.shape} does not match grid shape {self.shape}")
        if array.dtype == bool:
            array = array.astype(np.uint8)
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        self.apply_to(image)
        return image

    def apply_to(self, image: sitk.Image) -> None:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)

    def index_to_physical(self, index_zyx: np.ndarray) -> np.ndarray:
        """Physical LPS points (N, 3 as x, y, z) of voxel indices given as (N, 3) in (k, j, i) order."""
        ijk = np.asarray(index_zyx, dtype=float)[:, ::-1]
        return np.asarray(self.origin) + (ijk * np.asarray(self.spacing)) @ self.direction_matrix.T

    def physical_to_index(self, points_xyz: np.ndarray) -> np.ndarray:
        """Continuous voxel indices (N, 3 in k, j, i order) of physical LPS points (N, 3 as x, y, z)."""
        rel = np.asarray(points_xyz, dtype=float) - np.asarray(self.origin)
        ijk = (rel @ self.direction_matrix) / np.asarray(self.spacing)
        return ijk[:, ::-1]

    def matches(self, other: "ImageGeometry", tolerance_mm: float = 1e-3) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=tolerance_mm)
            and np.allclose(self.origin, other.origin, atol=tolerance_mm)
            and np.allclose(self.direction, other.direction, atol=1e-5)
        )

    def require_match(self, other: "ImageGeometry", what: str) -> None:
        if not self.matches(other):
            raise GeometryMismatchError(
                f"{what} is on a different grid than the CT (shape {other.shape} vs {self.shape}, "
                f"spacing {other.spacing} vs {self.spacing}, origin {other.origin} vs {self.origin}); "
                "resample it onto the CT grid first"
            )
