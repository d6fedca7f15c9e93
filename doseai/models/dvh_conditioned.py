"""The DVH-conditioned dose network: the preference network's architecture with the desired DVH in place of
the two sliders.

The desired DVH vector (:func:`doseai.dvh.dvh_vector`: each structure's cumulative DVH at a fixed number of
doses, flattened) enters every up-path block and the refinement head through FiLM, exactly where the
sliders enter the preference model. So the anatomy encoder is shared in kind (and initialised from the
shipped preference weights), the frozen dose prior's decoder still draws the dose, and ``DVHDosePredictor``
caches the down path: a DVH edit re-runs only the conditioned half.

FiLM scales whole feature channels, so it says "less dose" well but not "less dose in the larynx": dose_dvh_v2
missed the mean dose the desired DVH asks per structure by 4.4 % Rx on average (12 % in the larynx). With
``mean_offset_sigma_zyx`` set, a last layer (:class:`MeanDoseOffset`) adds, per structure, a learned fraction
of the gap between the mean dose its desired curve implies and the predicted mean, spread over the structure
and smoothed at the scale of a beam penumbra.
"""

from __future__ import annotations

import numpy as np
import torch

from monai.networks.layers import separable_filtering
from monai.networks.layers.convutils import gaussian_1d
from torch import nn

from doseai.models.features import channel_names
from doseai.models.preference import DEFAULT_PREFERENCE_CONFIG, PreferenceDoseNet
from doseai.structures import OPENKBP_OARS

DVH_STRUCTURES = ("PTV_70", "PTV_63", "PTV_56", *OPENKBP_OARS)
DEFAULT_DVH_LAYOUT = {
    "structures": list(DVH_STRUCTURES),
    "n_points": 32,
    "max_relative_dose": 1.2,
}
# mean_offset_sigma_zyx: None (dose_dvh_v2: no MeanDoseOffset) or its smoothing in voxels of the model grid
DEFAULT_DVH_NET_CONFIG = {**DEFAULT_PREFERENCE_CONFIG, "refine_film": True, "mean_offset_sigma_zyx": None}
# ~2-2.5 mm on the 5 x 3.9 x 3.9 mm model grid: about a photon beam's penumbra, so an offset does not end
# in a step at a structure's border, but not so wide that it leaks into a small neighbour
MEAN_OFFSET_SIGMA_ZYX = (0.5, 0.6, 0.6)
CHANNELS = channel_names()


def condition_size(layout: dict) -> int:
    """Length of the flattened DVH vector of ``layout`` (structures x dose points): the network's condition."""
    return len(layout["structures"]) * int(layout["n_points"])


def structure_masks(x: torch.Tensor, structures: list[str], norm_gy: float) -> list[tuple[int, torch.Tensor]]:
    """(index in ``structures``, boolean mask (z, y, x)) of the DVH structures present in the input channels
    ``x`` (1, C, z, y, x): OARs from their occupancy, PTV_<Rx> from the target-dose channel (prescription /
    ``norm_gy``; highest prescription wins, as in the features). Structures under 10 voxels are left out."""
    masks = []
    for index, name in enumerate(structures):
        if name in CHANNELS:
            masks.append((index, x[0, CHANNELS.index(name)] > 0.5))
        elif name.startswith("PTV_"):
            target = x[0, CHANNELS.index("target_dose")]
            masks.append((index, (target - float(name[4:]) / norm_gy).abs() < 0.25 / norm_gy))
    return [(index, mask) for index, mask in masks if int(mask.sum()) >= 10]


class MeanDoseOffset(nn.Module):
    """dose + smooth(sum over structures s of gain_s x (desired mean_s - predicted mean_s) on s's voxels).

    The desired mean is the area under the structure's desired cumulative DVH (doses relative to the highest
    prescription, like the network's dose). An OAR's offset goes only to its voxels outside the targets (no
    sparing inside a PTV). The gains are learned, start at 0 (the layer then changes nothing) and can stay below
    1: the training targets are projections onto the Pareto set, which follow an edit only as far as a plan can.
    """

    def __init__(self, layout: dict, sigma_zyx=MEAN_OFFSET_SIGMA_ZYX):
        super().__init__()
        self.structures = list(layout["structures"])
        self.dose_step = float(layout["max_relative_dose"]) / (int(layout["n_points"]) - 1)
        self.n_points = int(layout["n_points"])
        self.gain = nn.Parameter(torch.zeros(len(self.structures)))
        for axis, sigma in enumerate(sigma_zyx):  # fixed, not weights: kept out of the state dict
            kernel = gaussian_1d(torch.tensor(float(sigma)), truncated=3.0, approx="erf", normalize=True)
            self.register_buffer(f"kernel_{axis}", kernel, persistent=False)

    def desired_means(self, condition: torch.Tensor) -> torch.Tensor:
        """(structures,) mean doses of the desired curves (trapezoid rule over the dose points)."""
        curves = condition.reshape(len(self.structures), self.n_points)
        return torch.trapezoid(curves, dx=self.dose_step, dim=1)

    def forward(self, dose: torch.Tensor, condition: torch.Tensor,
                masks: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """``dose`` (1, 1, z, y, x) with the smoothed mean-dose offsets of the structures in ``masks`` added
        (see the class docstring); ``condition`` is the flattened desired DVH vector."""
        if not masks:
            return dose
        desired = self.desired_means(condition.float())
        targets = torch.zeros_like(masks[0][1])
        for index, mask in masks:
            if self.structures[index].startswith("PTV"):
                targets = targets | mask
        offset = torch.zeros_like(dose[0, 0])
        for index, mask in masks:
            region = mask if self.structures[index].startswith("PTV") else mask & ~targets
            gap = desired[index] - dose[0, 0][mask].mean()
            offset = offset + region.to(dose.dtype) * (self.gain[index] * gap).to(dose.dtype)
        kernels = [self.kernel_0, self.kernel_1, self.kernel_2]
        return torch.relu(dose + separable_filtering(offset[None, None], kernels))


class DVHDoseNet(PreferenceDoseNet):
    """The preference network with the DVH vector as its condition and, optionally, a :class:`MeanDoseOffset`
    on its output (which needs the case's ``structure_masks``)."""

    def __init__(self, in_channels: int, prior_config: dict | None, config: dict, layout: dict):
        super().__init__(in_channels, prior_config, config)
        sigma = config.get("mean_offset_sigma_zyx")
        self.offset = MeanDoseOffset(layout, sigma) if sigma else None

    def decode_parts(self, latent, anatomy=None, sliders=None, anatomy_term=None, box=None, masks=None):
        """As :meth:`PreferenceDoseNet.decode_parts` (``sliders``: the DVH condition), the final dose through
        the :class:`MeanDoseOffset` when the net has one and ``masks`` (:func:`structure_masks`) are given."""
        coarse, dose = super().decode_parts(latent, anatomy, sliders, anatomy_term, box)
        if self.offset is not None and masks is not None:
            dose = self.offset(dose, sliders, masks)
        return coarse, dose

    def decode(self, latent, anatomy=None, sliders=None, anatomy_term=None, box=None, masks=None):
        """The final dose of :meth:`decode_parts`."""
        return self.decode_parts(latent, anatomy, sliders, anatomy_term, box, masks)[1]


def build_dvh_net(in_channels: int, prior_config: dict | None, layout: dict,
                  config: dict | None = None) -> DVHDoseNet:
    """A ``DVHDoseNet`` whose condition is the flattened DVH vector of ``layout``."""
    config = {**DEFAULT_DVH_NET_CONFIG, **(config or {}), "n_sliders": condition_size(layout)}
    return DVHDoseNet(in_channels, prior_config, config, layout)


def load_matching_weights(net: torch.nn.Module, state: dict) -> list[str]:
    """Start from the preference model ``state`` (or an earlier DVH model's): every tensor whose name and
    shape fit is copied; the FiLM input layers (the DVH vector is wider than two sliders) and the
    ``MeanDoseOffset`` gains get zeros (the FiLM layers keep the preference model's biases), so the new network
    starts as that model at neutral sliders, whatever the DVH, and training teaches it to read the DVH.
    Returns the names of the tensors zeroed."""
    own = net.state_dict()
    fitting = {k: v.float() for k, v in state.items() if k in own and own[k].shape == v.shape}
    zeroed = sorted(set(own) - set(fitting))
    if any(not (name.endswith("mlp.0.weight") or name.startswith("offset.")) for name in zeroed):
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
