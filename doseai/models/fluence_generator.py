"""The fluence generator (after the FMD model of Poles et al. 2026): a conditional diffusion model of one beam's
fluence map, given what the planner knows before optimizing, projected along that beam's bixels
(:func:`doseai.optimize.beam_maps.bixel_features`: the desired dose, the targets with their prescriptions, the
OARs, each bixel's output, the gantry angle).

* The teacher: MONAI's ``DiffusionModelUNet`` (2D, over the beam's-eye-view canvas; fully convolutional, so any
  field size; self-attention in its middle block, which sees the whole field) on [noisy map, features];
  v-prediction, DDPM training, DDIM sampling in a few tens of steps (the undistilled sampler, kept for comparison).
* The one-step generator: the same network, started from the teacher's weights and distilled to map pure noise
  (at the last timestep) and the features straight to the teacher's DDIM sample from that noise (knowledge
  distillation of the deterministic sampler, Luhman & Luhman 2021: simpler than the paper's distribution-matching
  distillation, which trains a second score network).

Maps are in asinh(w / u) (u: the plan's uniform starting weight), 0 where the beam has no bixel; the loss and the
samples are masked to the bixels that exist.
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_CONFIG = {"channels": [16, 32, 64], "num_res_blocks": 1, "norm_groups": 8, "train_timesteps": 1000,
                  "schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0195,
                  "prediction_type": "v_prediction", "sampler_steps": 20, "map_scale": 1.0}


def config_with_defaults(config: dict | None) -> dict:
    """The card's network settings over the defaults."""
    return {**DEFAULT_CONFIG, **(config or {})}


class FluenceMapNet(nn.Module):
    """MONAI ``DiffusionModelUNet`` (2D) on [map, features]: the teacher's denoiser and, distilled, the one-step
    generator (same layout, so the student starts from the teacher)."""

    def __init__(self, n_features: int, config: dict | None = None):
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet

        self.config = config_with_defaults(config)
        self.n_features = n_features
        channels = tuple(self.config["channels"])
        self.unet = DiffusionModelUNet(
            spatial_dims=2, in_channels=1 + n_features, out_channels=1, channels=channels,
            attention_levels=(False,) * len(channels), num_res_blocks=self.config["num_res_blocks"],
            num_head_channels=(0,) * (len(channels) - 1) + (channels[-1],), norm_num_groups=self.config["norm_groups"])

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``noisy`` (beams, 1, H, W), ``timesteps`` (beams,), ``features`` (beams, F, H, W) -> (beams, 1, H, W)."""
        return self.unet(torch.cat([noisy, features.to(noisy.dtype)], dim=1), timesteps)


def schedulers(config: dict | None = None):
    """(training scheduler DDPM, sampling scheduler DDIM) of MONAI with the card's noise schedule."""
    from doseai.models.diffusion import noise_schedulers

    return noise_schedulers(config_with_defaults(config))


def map_noise(features: torch.Tensor, seed: int) -> torch.Tensor:
    """Standard normal noise (beams, 1, H, W) for ``features`` (beams, F, H, W), drawn with ``seed``."""
    return torch.randn((features.shape[0], 1, *features.shape[2:]), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def ddim_sample(teacher: FluenceMapNet, features: torch.Tensor, noise: torch.Tensor, steps: int | None = None) -> torch.Tensor:
    """The teacher's deterministic DDIM (eta 0) sample from ``noise`` in ``steps`` steps, masked to the bixels."""
    _, sampler = schedulers(teacher.config)
    sampler.set_timesteps(steps or teacher.config["sampler_steps"])
    x, mask = noise, exists_mask(features)
    for t in sampler.timesteps:
        v = teacher(x, torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device), features)
        x, _ = sampler.step(v, int(t), x)
        x = x * mask + noise * (1 - mask)  # off the bixels the map stays noise: nothing there to denoise
    return x * mask * teacher.config["map_scale"]


def one_step(student: FluenceMapNet, features: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The distilled generator: noise and features -> the map, in one evaluation (differentiable)."""
    last = student.config["train_timesteps"] - 1
    out = student(noise, torch.full((noise.shape[0],), last, dtype=torch.long, device=noise.device), features)
    return out * exists_mask(features) * student.config["map_scale"]


def exists_mask(features: torch.Tensor) -> torch.Tensor:
    """(beams, 1, H, W): 1 where a bixel is (the ``exists`` feature)."""
    from doseai.optimize.beam_maps import FEATURES

    index = FEATURES.index("exists")
    return (features[:, index:index + 1] > 0.5).to(features.dtype)
