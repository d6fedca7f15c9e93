"""DiffusionDosePredictor: several plausible doses for a case, their mean and where they disagree.

The residual diffusion model (doseai/models/diffusion.py) varies the dose of its base preference model (named in
its card): ``set_case`` prepares the base as :class:`~doseai.predict.DosePredictor` does and pools the case's
condition once; ``sample(n, seed)`` draws ``n`` coarse residuals (DDIM), adds each to the base's model-grid dose,
and takes every sample to the case grid and through the base's calibration, as one base dose would go.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from doseai.case import PlanningCase
from doseai.errors import DoseAIError, UnreadableInputError
from doseai.predict import DEFAULT_DIFFUSION_MODEL, DEFAULT_MODEL, DosePredictor, load_card

BAND_PERCENTILES = (5.0, 95.0)


def base_model_of(weights: Path, card: dict | None = None) -> Path:
    """The base preference model a diffusion card names: beside its weights, else among the shipped models."""
    card = load_card(Path(weights)) if card is None else card
    name = card.get("base_model")
    if not name:
        raise UnreadableInputError(f"{Path(weights).with_suffix('.json')}: not a diffusion model card (no base_model)")
    for folder in (Path(weights).parent, DEFAULT_MODEL.parent):
        if (folder / name).is_file():
            return folder / name
    raise UnreadableInputError(f"{Path(weights).with_suffix('.json')}: its base model {name} is neither beside it "
                               f"nor in {DEFAULT_MODEL.parent}")


def _normal_band(mean, sd, percentiles):
    """The (low, high) percentiles of a normal distribution around ``mean`` (arrays or numbers), clipped at 0."""
    from statistics import NormalDist

    return tuple(np.clip(mean + NormalDist().inv_cdf(p / 100.0) * sd, 0.0, None) for p in percentiles)


@dataclass
class DoseSamples:
    """Sampled doses of one case on its grid (Gy, 0 outside the body), with their voxel-wise summary.
    ``fine_sigma`` (Gy, case grid): the RMS of the error finer than the samples' residual grid (the card's
    ``fine_scale`` table), None when the card has none."""

    doses: list[np.ndarray]
    seed: int
    timings: dict
    fine_sigma: np.ndarray | None = None
    metric_rms_gy: dict[str, float] | None = None  # the same for DVH metrics, by kind ("target D_99", "OAR mean")
    metric_band_factor: dict[str, float] | None = None  # how much wider a metric's band is made, by kind

    @property
    def mean(self) -> np.ndarray:
        return np.mean(self.doses, axis=0).astype(np.float32)

    def band(self, percentiles=BAND_PERCENTILES, fine_scale: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The voxel-wise (low, high) band. With the fine scale (when the card has it): a normal band around the
        mean whose variance is the samples' variance plus ``fine_sigma``^2 (the samples vary the dose on a ~2 cm
        grid; the error below that scale adds to it), clipped at 0. Without: the samples' own percentiles (with
        few samples, nearly their min and max)."""
        if fine_scale and self.fine_sigma is not None:
            stack = np.stack(self.doses)
            variance = stack.var(axis=0, ddof=1) if len(self.doses) > 1 else np.zeros_like(stack[0])
            sd = np.sqrt(variance + self.fine_sigma.astype(np.float32) ** 2)
            low, high = _normal_band(stack.mean(axis=0), sd, percentiles)
            return low.astype(np.float32), high.astype(np.float32)
        low, high = np.percentile(np.stack(self.doses), percentiles, axis=0)
        return low.astype(np.float32), high.astype(np.float32)

    @property
    def spread(self) -> np.ndarray:
        """The width of the 5-95 % band per voxel (Gy): where the samples disagree, the prediction is unsure."""
        low, high = self.band()
        return high - low

    def metric_bands(self, case: PlanningCase, percentiles=BAND_PERCENTILES) -> dict[tuple[str, str], tuple]:
        """Each OpenKBP DVH metric's (low, high) band (Gy): a normal band around the samples' mean whose variance
        is their variance plus the card's fine-scale RMS of that kind of metric, widened by the card's band factor
        (fitted so that the 5-95 % band holds 90 % of training patients' metrics); without them, the samples' own
        percentiles."""
        from doseai.scoring import metric_kind, openkbp_dvh_metrics

        per_sample = [openkbp_dvh_metrics(dose, case) for dose in self.doses]
        bands = {}
        for key in per_sample[0]:
            values = np.array([m[key] for m in per_sample])
            if self.metric_rms_gy is None:
                bands[key] = tuple(float(v) for v in np.percentile(values, percentiles))
                continue
            kind = metric_kind(key)
            variance = values.var(ddof=1) if len(values) > 1 else 0.0
            sd = float(np.sqrt(variance + self.metric_rms_gy.get(kind, 0.0) ** 2))
            sd *= (self.metric_band_factor or {}).get(kind, 1.0)
            bands[key] = tuple(float(v) for v in _normal_band(float(values.mean()), sd, percentiles))
        return bands

    def structure_bands(self, case: PlanningCase, percentiles=BAND_PERCENTILES) -> dict:
        """Each structure's DVH band across the samples (:func:`doseai.report.dvh_bands`)."""
        from doseai.report import dvh_bands

        return dvh_bands(case, self.doses, percentiles)


class DiffusionDosePredictor:
    """Keeps the diffusion model and its base loaded; ``set_case`` once per case, ``sample`` per draw."""

    default_weights = DEFAULT_DIFFUSION_MODEL
    samples = 4  # what ``predict`` averages
    steps = 10  # DDIM steps per sample

    def __init__(self, weights: str | Path | None = None, device: str = "auto", threads: int | None = None,
                 base_weights: str | Path | None = None):
        import torch

        from doseai.models.diffusion import ResidualDiffusionNet
        from doseai.safe_load import load_into, load_state_dict_file

        self.weights = Path(weights) if weights else self.default_weights
        if not self.weights.is_file():
            raise UnreadableInputError(f"{self.weights}: diffusion model weights not found (train them with "
                                       "`doseai train diffusion`)")
        self.card = load_card(self.weights)
        base = Path(base_weights) if base_weights else base_model_of(self.weights, self.card)
        self.base = DosePredictor(base, device=device, threads=threads)
        self.device = self.base.device
        try:
            self.net = ResidualDiffusionNet(self.card["inputs"]["condition_channels"], self.card["network"]["config"])
        except (KeyError, TypeError, ValueError) as error:
            raise UnreadableInputError(f"{self.weights.with_suffix('.json')}: cannot build its network "
                                       f"({error!r})") from None
        load_into(self.net, load_state_dict_file(self.weights), self.weights, self.card.get("name", "?"))
        self.net.eval().to(self.device)
        self._torch = torch
        self._condition = None
        self._case = None

    @property
    def conditions(self):
        """The base model's sliders (a sample at other sliders varies the base's dose there)."""
        return self.base.conditions

    @property
    def case_warnings(self) -> list[str]:
        return self.base.case_warnings

    def set_case(self, case: PlanningCase) -> None:
        """Prepare ``case`` (the base's down path and neutral dose, the pooled condition and tokens)."""
        from doseai.models.diffusion import condition_inputs

        start = time.perf_counter()
        self.base.set_case(case)
        p = self.base._require_case()
        neutral = self.base._neutral_condition().to(self.device)
        with self._torch.no_grad():
            base_dose = self._torch.from_numpy(np.ascontiguousarray(self.base._model_grid_dose(p, neutral)))
            base_dose = base_dose[None, None].to(self.device)
            self._condition = condition_inputs(p.anatomy.float(), base_dose, self.net.config["pool_zyx"])
        self._case = case
        self._set_case_s = time.perf_counter() - start

    def sample(self, n: int | None = None, seed: int = 0, sliders: Mapping[str, float] | None = None,
               steps: int | None = None) -> DoseSamples:
        """``n`` doses (Gy, case grid) drawn with ``seed`` (the same seed, the same doses), at the base's
        ``sliders`` (neutral when omitted)."""
        from doseai.models.diffusion import fine, sample_residuals
        from doseai.resample import resample_to

        if self._condition is None:
            raise DoseAIError("call set_case(case) before sample()")
        n = self.samples if n is None else int(n)
        if n < 1:
            raise DoseAIError(f"the number of samples must be at least 1, got {n}")
        steps = self.steps if steps is None else int(steps)
        start = time.perf_counter()
        condition, tokens = self._condition
        generator = self._torch.Generator().manual_seed(int(seed))
        residuals = sample_residuals(self.net, condition, tokens, 0, n, steps, generator)
        tau = float(self.card.get("sampling", {}).get("calibration", {}).get("spread_scale", 1.0))
        if tau != 1.0 and n > 1:  # the deviations about the mean widened as fitted on training patients
            mean = residuals.mean(dim=0, keepdim=True)
            residuals = mean + tau * (residuals - mean)
        sampled_at = time.perf_counter()
        base = self.base
        p = base._require_case()
        space = base.conditions
        vector = self._torch.from_numpy(space.vector(space.values(sliders))).to(self.device)
        base_dose = base._model_grid_dose(p, vector)
        doses = []
        with self._torch.no_grad():
            upsampled = fine(residuals, base_dose.shape).cpu().numpy()[:, 0]
        for residual in upsampled:
            dose = resample_to(np.clip(base_dose + residual, 0.0, None) * p.norm_gy, p.grid, p.case.geometry)
            dose = (np.clip(dose, 0.0, None) * p.body).astype(np.float32)
            doses.append(base.calibrate(dose) if base.calibrated else dose)
        timings = {"set_case_s": self._set_case_s, "diffusion_s": sampled_at - start,
                   "doses_s": time.perf_counter() - sampled_at, "per_sample_s": (time.perf_counter() - start) / n}
        fine_scale = self.card.get("fine_scale") or {}
        metric_rms = fine_scale.get("metric_rms")
        return DoseSamples(doses, int(seed), timings, self._fine_sigma(base_dose, p),
                           {k: v * p.norm_gy for k, v in metric_rms.items()} if metric_rms else None,
                           fine_scale.get("metric_band_factor"))

    def _fine_sigma(self, base_dose: np.ndarray, p) -> np.ndarray | None:
        """The card's fine-scale error RMS for this base dose, on the case grid (Gy), or None without a table."""
        from doseai.models.diffusion import fine_sigma
        from doseai.resample import resample_to

        table = self.card.get("fine_scale")
        if not table:
            return None
        spacing_zyx = tuple(reversed(self.base.spec.spacing))
        sigma = fine_sigma(base_dose, spacing_zyx, table)
        return (np.clip(resample_to(sigma * p.norm_gy, p.grid, p.case.geometry), 0.0, None) * p.body).astype(np.float32)

    def predict(self, *values: float, sliders: Mapping[str, float] | None = None, **named: float) -> np.ndarray:
        """The mean of ``samples`` doses (seed 0) at the given sliders (as DosePredictor.predict takes them)."""
        space = self.base.conditions
        chosen = space.values(sliders if sliders is not None else (values or None), **named)
        return self.sample(self.samples, 0, sliders=chosen).mean

    def predict_case(self, case: PlanningCase, *values: float, sliders: Mapping[str, float] | None = None,
                     **named: float) -> np.ndarray:
        """:meth:`set_case` then :meth:`predict`."""
        self.set_case(case)
        return self.predict(*values, sliders=sliders, **named)
