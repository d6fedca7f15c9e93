"""DVH editing without Qt or MRML: the desired DVH the user shapes curve by curve, with undo and reset.

A desired DVH is laid out as the DVH-conditioned model reads it (see :class:`doseai.predict.DVHDosePredictor`):
one row per model structure, cumulative volume *fractions* (0..1) at fixed dose levels (Gy). Curves go in
and out in the units of a DVH chart: dose in Gy, volume in percent.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from doseai.errors import DoseAIError

MAX_UNDO = 200  # undo steps kept (a step is a (structures x points) float array: small)


class DesiredDVHError(DoseAIError, ValueError):
    """A desired DVH or an edited curve the DVH model cannot take (wrong shape, NaN, unknown structure)."""


def check_desired_vector(vector, structures: Sequence[str], n_points: int) -> np.ndarray:
    """``vector`` as a float32 (structures, points) array of volume fractions, or DesiredDVHError saying
    what is wrong with it."""
    try:
        array = np.array(vector, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise DesiredDVHError(f"the desired DVH is not an array of numbers: {error}") from error
    expected = (len(structures), int(n_points))
    if array.shape != expected:
        raise DesiredDVHError(
            f"the desired DVH has shape {array.shape}; the DVH model expects {expected}: one row per structure "
            f"({', '.join(structures)}), volume fractions at {n_points} dose levels")
    bad = [name for name, row in zip(structures, array) if not np.all(np.isfinite(row))]
    if bad:
        raise DesiredDVHError(f"the desired DVH holds NaN or infinite values (rows: {', '.join(bad)})")
    if array.min() < 0.0 or array.max() > 1.0:
        hint = " (percent instead of fractions?)" if array.max() <= 100.0 and array.min() >= 0.0 else ""
        raise DesiredDVHError(f"the desired DVH must hold volume fractions in [0, 1], got values from "
                              f"{array.min():g} to {array.max():g}{hint}")
    return array


def check_curve(structure: str, dose_gy, volume_pct) -> tuple[np.ndarray, np.ndarray]:
    """A (dose in Gy, volume in %) curve as float64 arrays sorted by dose, or DesiredDVHError."""
    dose, volume = np.asarray(dose_gy, dtype=np.float64).ravel(), np.asarray(volume_pct, dtype=np.float64).ravel()
    if dose.size == 0 or dose.size != volume.size:
        raise DesiredDVHError(f"the curve of {structure} needs as many doses as volumes (at least one), "
                              f"got {dose.size} doses and {volume.size} volumes")
    if not (np.all(np.isfinite(dose)) and np.all(np.isfinite(volume))):
        raise DesiredDVHError(f"the curve of {structure} holds NaN or infinite values")
    order = np.argsort(dose, kind="stable")
    dose, volume = dose[order], volume[order]
    if np.any(np.diff(dose) == 0):
        raise DesiredDVHError(f"the curve of {structure} has two points at the same dose")
    return dose, volume


def curve_on_levels(structure: str, dose_gy, volume_pct, levels_gy) -> np.ndarray:
    """A curve's volumes (%) at ``levels_gy``: linear between its points, its first volume below its first
    dose and 0 % beyond its last (as :func:`doseai.dvh.dvh_vector_from_curves`)."""
    dose, volume = check_curve(structure, dose_gy, volume_pct)
    return np.interp(np.asarray(levels_gy, np.float64), dose, volume, left=volume[0], right=0.0)


class DVHEditSession:
    """The desired DVH while the user edits it: starts as ``base_vector`` (the DVH of the dose being edited),
    changes one structure's curve at a time (:meth:`setCurve`), with :meth:`undo` and :meth:`reset`.

    ``structures`` is the model's row order; ``editable`` (default: all) the structures the user may edit
    (those present in the segmentation). Curves are made physical when set: volumes clamped to
    [0, 100] %, 100 % at 0 Gy (every voxel gets at least 0 Gy) and non-increasing with dose.
    """

    def __init__(self, structures: Sequence[str], dose_levels_gy, base_vector, editable: Iterable[str] | None = None,
                 start_dose=None):
        self.structures: list[str] = list(structures)
        self.startDose = start_dose  # the dose (case grid) whose DVH base_vector is: what every edit changes
        self.doseLevelsGy: np.ndarray = np.array(dose_levels_gy, dtype=np.float64)
        self.doseLevelsGy.flags.writeable = False
        if self.doseLevelsGy.ndim != 1 or np.any(np.diff(self.doseLevelsGy) <= 0):
            raise DesiredDVHError("the dose levels must increase")
        self._base = check_desired_vector(base_vector, self.structures, self.doseLevelsGy.size)
        self._vector = self._base.copy()
        self._edited: set[str] = set()
        self._undo: list[tuple[np.ndarray, set[str]]] = []
        editable = self.structures if editable is None else list(editable)
        for name in editable:
            self._row(name)  # unknown names are refused
        self.editable: list[str] = [name for name in self.structures if name in set(editable)]

    # --- reading ---------------------------------------------------------------------------------
    @property
    def edited(self) -> set[str]:
        """The structures whose curve the user set (and did not undo or reset)."""
        return set(self._edited)

    @property
    def canUndo(self) -> bool:
        return bool(self._undo)

    def desiredVector(self) -> np.ndarray:
        """The desired DVH now (a copy), in the model's layout."""
        return self._vector.copy()

    def baseVector(self) -> np.ndarray:
        return self._base.copy()

    def curve(self, structure: str) -> tuple[np.ndarray, np.ndarray]:
        """The desired curve of ``structure``: (dose in Gy, volume in %) at the model's dose levels."""
        return self.doseLevelsGy.copy(), self._vector[self._row(structure)].astype(np.float64) * 100.0

    # --- editing ---------------------------------------------------------------------------------
    def setCurve(self, structure: str, volume_pct) -> bool:
        """Set the desired curve of ``structure`` from its volumes (%) at the model's dose levels; True when
        the desired DVH changed (one undo step), False when it is the same. Raises DesiredDVHError (a
        ValueError) for an unknown or non-editable structure, a wrong length or NaN."""
        row = self._row(structure)
        if structure not in self.editable:
            raise DesiredDVHError(f"{structure} is not in the segmentation: its DVH cannot be edited")
        volume = np.asarray(volume_pct, dtype=np.float64).ravel()
        if volume.size != self.doseLevelsGy.size:
            raise DesiredDVHError(f"the curve of {structure} needs {self.doseLevelsGy.size} volumes (one per dose "
                                  f"level), got {volume.size}")
        if not np.all(np.isfinite(volume)):
            raise DesiredDVHError(f"the curve of {structure} holds NaN or infinite values")
        fraction = np.clip(volume, 0.0, 100.0) / 100.0
        fraction[self.doseLevelsGy <= 0.0] = 1.0
        fraction = np.minimum.accumulate(fraction).astype(np.float32)
        if np.allclose(fraction, self._vector[row], rtol=0.0, atol=1e-6):
            return False
        self._push()
        self._vector[row] = fraction
        self._edited.add(structure)
        return True

    def setCurvePoints(self, structure: str, dose_gy, volume_pct) -> bool:
        """:meth:`setCurve` from a curve at any doses (e.g. a table whose points were moved along the dose
        axis too), resampled linearly onto the model's dose levels."""
        self._row(structure)
        return self.setCurve(structure, curve_on_levels(structure, dose_gy, volume_pct, self.doseLevelsGy))

    def undo(self) -> bool:
        """Back to the desired DVH before the last change (an edit or a reset); False when there is none."""
        if not self._undo:
            return False
        self._vector, self._edited = self._undo.pop()
        return True

    def reset(self) -> bool:
        """Back to the base DVH, every edit dropped (undoable); False when nothing was edited."""
        if not self._edited and np.array_equal(self._vector, self._base):
            return False
        self._push()
        self._vector, self._edited = self._base.copy(), set()
        return True

    # --- internals -------------------------------------------------------------------------------
    def _row(self, structure: str) -> int:
        try:
            return self.structures.index(structure)
        except ValueError:
            raise DesiredDVHError(f"the DVH model does not know the structure '{structure}' (it reads: "
                                  f"{', '.join(self.structures)})") from None

    def _push(self) -> None:
        self._undo.append((self._vector.copy(), set(self._edited)))
        del self._undo[:-MAX_UNDO]
