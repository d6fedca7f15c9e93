"""DosePredictor: shipped weights + model card -> a dose on the case's own grid, steerable by sliders.

The model runs on a fixed grid (from its card). ``set_case`` resamples the case onto it and runs the
slider-independent half of the network once; ``predict`` then re-runs only the slider-dependent half
and resamples the dose back, so a slider change costs a fraction of a full prediction.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from doseai.case import PlanningCase
from doseai.errors import DoseAIError, UnreadableInputError
from doseai.paths import REPO_ROOT

DEFAULT_MODEL = REPO_ROOT / "Resources" / "Models" / "dose_preference_v1_1.pt"


def load_card(weights: Path) -> dict:
    card_path = weights.with_suffix(".json")
    if not card_path.is_file():
        raise UnreadableInputError(f"{card_path}: model card missing next to the weights")
    return json.loads(card_path.read_text())


@dataclass
class _Prepared:
    case: PlanningCase
    grid: object
    anatomy: object
    features: list
    body: np.ndarray
    norm_gy: float
    timings: dict = field(default_factory=dict)


class DosePredictor:
    """Keeps the model loaded; ``set_case`` once per case, ``predict`` per slider position."""

    def __init__(self, weights: str | Path | None = None, device: str = "auto", threads: int | None = None):
        import torch

        from doseai.models.features import GridSpec
        from doseai.models.preference import PreferenceDoseNet
        from doseai.train.loop import pick_device

        self.weights = Path(weights) if weights else DEFAULT_MODEL
        if not self.weights.is_file():
            raise UnreadableInputError(f"{self.weights}: model weights not found (train them with `doseai train`)")
        if threads:
            torch.set_num_threads(threads)
        self.card = load_card(self.weights)
        self.spec = GridSpec.from_card(self.card)
        self.device = pick_device(device)
        self.net = PreferenceDoseNet(len(self.card["inputs"]["channels"]), self.card["dose_prior"]["config"],
                                     self.card["network"]["config"])
        state = torch.load(self.weights, map_location="cpu", weights_only=True)
        self.net.load_state_dict({k: v.float() for k, v in state.items()})
        self.net.freeze_prior()
        self.net.eval().to(self.device)
        self._torch = torch
        self._prepared: _Prepared | None = None

    @property
    def slider_range(self) -> tuple[float, float]:
        return tuple(self.card["preference"]["range"])

    def set_case(self, case: PlanningCase) -> None:
        from doseai.models.features import body_mask, case_features

        case.require_target()
        start = time.perf_counter()
        norm_gy = case.max_prescription  # the network sees prescriptions relative to the highest one
        channels, grid = case_features(case, self.spec, norm_gy=norm_gy)
        prepared_at = time.perf_counter()
        with self._torch.no_grad():
            x = self._torch.from_numpy(channels[np.newaxis]).to(self.device)
            features = self.net.encode_anatomy(x)
        self._prepared = _Prepared(case, grid, x, features, body_mask(case), norm_gy,
                                   {"features_s": prepared_at - start, "encoder_s": time.perf_counter() - prepared_at})

    def predict(self, oar_sparing: float = 0.0, homogeneity: float = 0.0) -> np.ndarray:
        """Dose in Gy on the case grid (0 outside the body)."""
        from doseai.resample import resample_to

        if self._prepared is None:
            raise DoseAIError("call set_case(case) before predict()")
        low, high = self.slider_range
        for name, value in (("oar_sparing", oar_sparing), ("homogeneity", homogeneity)):
            if not (np.isfinite(value) and low <= value <= high):
                raise DoseAIError(f"{name} must be within [{low}, {high}], got {value}")
        start = time.perf_counter()
        p = self._prepared
        sliders = self._torch.tensor([[oar_sparing, homogeneity]], dtype=self._torch.float32, device=self.device)
        with self._torch.no_grad():
            dose_model_grid = self.net.decode(self.net.latent(p.features, sliders), p.anatomy, sliders)[0, 0].float().cpu().numpy()
        network_at = time.perf_counter()
        dose = resample_to(dose_model_grid * p.norm_gy, p.grid, p.case.geometry)
        dose = np.clip(dose, 0.0, None) * p.body
        p.timings.update({"slider_network_s": network_at - start, "resample_back_s": time.perf_counter() - network_at})
        return dose.astype(np.float32)

    def predict_case(self, case: PlanningCase, oar_sparing: float = 0.0, homogeneity: float = 0.0) -> np.ndarray:
        self.set_case(case)
        return self.predict(oar_sparing, homogeneity)

    @property
    def timings(self) -> dict:
        return dict(self._prepared.timings) if self._prepared else {}
