"""Resampling between grids with SimpleITK (physical space, so orientation and origin are honoured)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from doseai.geometry import ImageGeometry


def resample_to(
    array: np.ndarray,
    source: ImageGeometry,
    target: ImageGeometry,
    interpolation: str = "linear",
    default_value: float = 0.0,
) -> np.ndarray:
    """``array`` on ``source`` resampled onto ``target``; ``interpolation`` is 'linear' or 'nearest'.

    Masks: pass 'nearest' for labels, or 'linear' on a float mask and threshold at 0.5 for smoother
    shapes when downsampling.
    """
    if source.matches(target):
        return np.asarray(array)
    mode = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}[interpolation]
    image = source.to_sitk(np.asarray(array, dtype=np.float32))
    reference = sitk.Image([int(n) for n in target.shape[::-1]], sitk.sitkFloat32)
    target.apply_to(reference)
    resampled = sitk.Resample(image, reference, sitk.Transform(), mode, float(default_value), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled)
