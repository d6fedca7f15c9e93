"""CT/dose images (NRRD, NIfTI, MHA) and structures as a multi-label labelmap or a Slicer ``.seg.nrrd``,
read and written with SimpleITK.

A ``.seg.nrrd`` carries Slicer's segment metadata (``SegmentN_Name``, ``SegmentN_LabelValue``,
``SegmentN_Layer``, ``SegmentN_Color``); overlapping structures go to separate layers (a vector image).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from doseai.errors import UnreadableInputError, refuse_overwrite
from doseai.geometry import ImageGeometry

IMAGE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
MAX_VOXELS = 1_000_000_000  # 13x a 512 x 512 x 300 CT; 4 GB as float32


def has_image_suffix(path: str | os.PathLike) -> bool:
    """Whether ``path`` ends with an image extension SimpleITK reads and writes here (:data:`IMAGE_SUFFIXES`)."""
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def read_sitk(path: str | os.PathLike) -> sitk.Image:
    """The image at ``path``, its header checked first so that a corrupt size is refused before any allocation."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableInputError(f"{path}: no such file")
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()  # the header first: a corrupt size must not allocate terabytes
        voxels = int(np.prod(reader.GetSize(), dtype=np.float64)) * reader.GetNumberOfComponents()
        if voxels > MAX_VOXELS:
            raise UnreadableInputError(f"{path}: the header declares {' x '.join(map(str, reader.GetSize()))} "
                                       f"voxels, more than {MAX_VOXELS:.0e} (a corrupt header, or not a CT)")
        return reader.Execute()
    except RuntimeError as error:
        raise UnreadableInputError(f"{path}: not a readable image ({_itk_reason(error)})") from None


def _itk_reason(error: RuntimeError) -> str:
    """The informative line of an ITK exception: its deepest cause in words (ITK's text runs from the call site
    down to the cause; bare numbers and the 'Exception thrown in' banner say nothing to a user)."""
    lines = [line.strip() for line in str(error).splitlines()]
    wordy = [re.sub(r"^(itk::ERROR|ITK ERROR): \w+\(0x[0-9a-f]+\):\s*", "", line) for line in lines
             if sum(c.isalpha() for c in line) > 10 and not line.startswith("Exception thrown")]
    return " ".join((wordy[-1] if wordy else "unknown format").split())[:200]


def read_image(path: str | os.PathLike, dtype=np.float32) -> tuple[np.ndarray, ImageGeometry]:
    """A scalar 3D image as ([z, y, x] array, geometry)."""
    image = read_sitk(path)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise UnreadableInputError(f"{path}: expected a scalar 3D image, got {image.GetDimension()}D "
                                   f"with {image.GetNumberOfComponentsPerPixel()} components")
    return sitk.GetArrayFromImage(image).astype(dtype, copy=False), ImageGeometry.from_sitk(image)


def write_image(array: np.ndarray, geometry: ImageGeometry, path: str | os.PathLike, force: bool = False) -> Path:
    """Write ``array`` ([z, y, x] on ``geometry``) compressed, in the format of the path's extension; refuses to
    overwrite unless ``force``."""
    path = Path(path)
    if not has_image_suffix(path):
        raise UnreadableInputError(f"{path}: unknown image format; use one of {', '.join(IMAGE_SUFFIXES)}")
    refuse_overwrite(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(geometry.to_sitk(array), str(path), useCompression=True)
    return path


# --- structures -------------------------------------------------------------------------------
def _is_seg_nrrd(image: sitk.Image) -> bool:
    return image.HasMetaDataKey("Segment0_Name")


def read_labelmap(
    path: str | os.PathLike, label_names: Mapping[int, str] | None = None
) -> tuple[dict[str, np.ndarray], ImageGeometry]:
    """Structure masks from a Slicer ``.seg.nrrd`` (names from its metadata) or a multi-label labelmap
    (names from ``label_names``; otherwise ``Label_<value>``)."""
    image = read_sitk(path)
    geometry = ImageGeometry.from_sitk(image)
    array = sitk.GetArrayFromImage(image)
    if _is_seg_nrrd(image):
        return _segments_from_seg_nrrd(image, array), geometry
    if array.ndim != 3:
        raise UnreadableInputError(f"{path}: a labelmap must be a scalar 3D image")
    array = np.round(array).astype(np.int64)
    values = [int(v) for v in np.unique(array) if v != 0]
    names = dict(label_names or {})
    return {names.get(v, f"Label_{v}"): array == v for v in values if names.get(v, "") is not None}, geometry


def _segments_from_seg_nrrd(image: sitk.Image, array: np.ndarray) -> dict[str, np.ndarray]:
    masks: dict[str, np.ndarray] = {}
    if array.ndim == 3:
        array = array[..., np.newaxis]
    index = 0
    while image.HasMetaDataKey(f"Segment{index}_Name"):
        name = image.GetMetaData(f"Segment{index}_Name")
        label = int(image.GetMetaData(f"Segment{index}_LabelValue")) if image.HasMetaDataKey(
            f"Segment{index}_LabelValue") else 1
        layer = int(image.GetMetaData(f"Segment{index}_Layer")) if image.HasMetaDataKey(
            f"Segment{index}_Layer") else 0
        masks[name] = array[..., layer] == label
        index += 1
    return masks


def _assign_layers(masks: Mapping[str, np.ndarray]) -> list[list[str]]:
    """Greedy layering: a structure goes to the first layer it does not overlap."""
    layers: list[tuple[np.ndarray, list[str]]] = []
    for name, mask in masks.items():
        for occupied, names in layers:
            if not np.any(occupied & mask):
                occupied |= mask
                names.append(name)
                break
        else:
            layers.append((mask.copy(), [name]))
    return [names for _, names in layers]


def write_seg_nrrd(
    masks: Mapping[str, np.ndarray],
    geometry: ImageGeometry,
    path: str | os.PathLike,
    colors: Mapping[str, tuple[float, float, float]] | None = None,
    force: bool = False,
) -> Path:
    """A Slicer segmentation file; overlapping structures are put on separate layers."""
    path = Path(path)
    refuse_overwrite(path, force)
    masks = {name: np.asarray(mask, dtype=bool) for name, mask in masks.items()}
    layers = _assign_layers(masks) or [[]]
    stacked = np.zeros(geometry.shape + (len(layers),), dtype=np.uint8)
    placement = {name: (layer_index, label) for layer_index, names in enumerate(layers)
                 for label, name in enumerate(names, start=1)}
    nz, ny, nx = geometry.shape
    full_extent = f"0 {nx - 1} 0 {ny - 1} 0 {nz - 1}"
    meta: dict[str, str] = {"Segmentation_ReferenceImageExtentOffset": "0 0 0"}
    for segment, (name, mask) in enumerate(masks.items()):  # segment order = input order
        layer_index, label = placement[name]
        stacked[..., layer_index][mask] = label
        color = (colors or {}).get(name) or default_color(segment)
        meta.update({
            f"Segment{segment}_ID": name, f"Segment{segment}_Name": name,
            f"Segment{segment}_LabelValue": str(label), f"Segment{segment}_Layer": str(layer_index),
            f"Segment{segment}_Color": " ".join(f"{c:.4f}" for c in color),
            f"Segment{segment}_NameAutoGenerated": "0", f"Segment{segment}_ColorAutoGenerated": "0",
            f"Segment{segment}_Extent": full_extent,
        })
    meta["Segmentation_MasterRepresentation"] = "Binary labelmap"
    meta["Segmentation_ContainedRepresentationNames"] = "Binary labelmap|"
    array = stacked[..., 0] if len(layers) == 1 else stacked
    image = sitk.GetImageFromArray(array, isVector=len(layers) > 1)
    geometry.apply_to(image)
    for key, value in meta.items():
        image.SetMetaData(key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def write_labelmap(masks: Mapping[str, np.ndarray], geometry: ImageGeometry, path: str | os.PathLike,
                   force: bool = False) -> dict[int, str]:
    """A multi-label labelmap (later structures win where they overlap); returns label value -> name."""
    labels = np.zeros(geometry.shape, dtype=np.uint16)
    names = {}
    for value, (name, mask) in enumerate(masks.items(), start=1):
        labels[np.asarray(mask, dtype=bool)] = value
        names[value] = name
    write_image(labels, geometry, path, force=force)
    return names


_PALETTE = [(0.90, 0.10, 0.10), (0.10, 0.60, 0.90), (0.20, 0.75, 0.25), (0.95, 0.60, 0.10),
            (0.60, 0.30, 0.80), (0.95, 0.85, 0.15), (0.10, 0.80, 0.75), (0.85, 0.35, 0.60),
            (0.55, 0.55, 0.55), (0.50, 0.30, 0.10), (0.30, 0.30, 0.85), (0.65, 0.85, 0.30)]


def default_color(index: int) -> tuple[float, float, float]:
    """The RGB (0-1) of the ``index``-th structure without a colour of its own; the palette repeats."""
    return _PALETTE[index % len(_PALETTE)]
