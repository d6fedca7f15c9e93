"""The DVH-conditioned dose network: the preference network's architecture with the desired DVH in place of
the two sliders.

The desired DVH vector (:func:`doseai.dvh.dvh_vector`: each structure's cumulative DVH at a fixed number of
doses, flattened) enters every up-path block and the refinement head through FiLM, exactly where the
sliders enter the preference model. So the anatomy encoder is shared in kind (and initialised from the
shipped preference weights), the frozen dose prior's decoder still draws the dose, and ``DVHDosePredictor``
caches the down path: a DVH edit re-runs only the conditioned half.
"""

from __future__ import annotations

import numpy as np
import torch

from doseai.models.preference import DEFAULT_PREFERENCE_CONFIG, PreferenceDoseNet
from doseai.structures import OPENKBP_OARS

DVH_STRUCTURES = ("PTV_70", "PTV_63", "PTV_56", *OPENKBP_OARS)
DEFAULT_DVH_LAYOUT = {
    "structures": list(DVH_STRUCTURES),
    "n_points": 32,
    "max_relative_dose": 1.2,
}
DEFAULT_DVH_NET_CONFIG = {**DEFAULT_PREFERENCE_CONFIG, "refine_film": True}


def condition_size(layout: dict) -> int:
    return len(layout["structures"]) * int(layout["n_points"])


def build_dvh_net(in_channels: int, prior_config: dict | None, layout: dict,
                  config: dict | None = None) -> PreferenceDoseNet:
    """A ``PreferenceDoseNet`` whose condition is the flattened DVH vector of ``layout``."""
    config = {**DEFAULT_DVH_NET_CONFIG, **(config or {}), "n_sliders": condition_size(layout)}
    return PreferenceDoseNet(in_channels, prior_config, config)


def load_matching_weights(net: torch.nn.Module, state: dict) -> list[str]:
    """Start from the preference model ``state``: every tensor whose name and shape fit is copied; the FiLM
    input layers (the DVH vector is wider than two sliders) get zero weights and keep the preference
    model's biases, so the new network starts as that model at neutral sliders, whatever the DVH, and
    training teaches it to read the DVH. Returns the names of the tensors zeroed."""
    own = net.state_dict()
    fitting = {k: v.float() for k, v in state.items() if k in own and own[k].shape == v.shape}
    zeroed = sorted(set(own) - set(fitting))
    if any(not name.endswith("mlp.0.weight") for name in zeroed):
        raise ValueError(f"the preference weights do not fit the DVH network: {zeroed}")
    net.load_state_dict({**fitting, **{name: torch.zeros_like(own[name]) for name in zeroed}})
    return zeroed


def as_condition(dvh: np.ndarray, layout: dict) -> torch.Tensor:
    """(structures, points) DVH vector -> the (1, structures x points) condition tensor, checked."""
    dvh = np.asarray(dvh, np.float32)
    expected = (len(layout["structures"]), int(layout["n_points"]))
    if dvh.shape != expected:
        raise ValueError(f"the desired DVH must have shape {expected} (structures x dose points), got {dvh.shape}")
    if not np.all(np.isfinite(dvh)) or dvh.min() < 0 or dvh.max() > 1:
        raise ValueError("the desired DVH must hold volume fractions in [0, 1]")
    return torch.from_numpy(dvh.reshape(1, -1))
