"""Stage II: anatomy encoder into the frozen dose prior's latent space, steered by preference sliders.

Down path (anatomy only) -> bottleneck -> up path to the prior's latent resolution -> latent head ->
frozen VQ-VAE decoder -> dose. The two slider values enter every up-path block through FiLM
(feature-wise affine modulation after instance normalisation, i.e. AdaIN with learned style). The
down path does not see the sliders, so ``DosePredictor`` caches it and a slider change re-runs only
the up path and the decoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from monai.networks.blocks import Convolution
from torch import nn

from doseai.models.dose_prior import build_dose_prior, latent_downsampling
from doseai.models.onednn import conv3d

DEFAULT_PREFERENCE_CONFIG = {"down_channels": [24, 48, 96, 128], "n_sliders": 2, "film_hidden": 32,
                             "refine_channels": 16, "refine_film": False}


class SliderModulation(nn.Module):
    """x -> x * (1 + gamma(s)) + beta(s), without normalisation: zero at initialisation, so it can be
    added to a trained head without changing what it does until training moves it."""

    def __init__(self, channels: int, n_conditions: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(n_conditions, hidden), nn.SiLU(), nn.Linear(hidden, 2 * channels))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def scale_shift(self, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 + gamma, beta), each (batch, channels)."""
        gamma, beta = self.mlp(condition).chunk(2, dim=1)
        return 1 + gamma, beta

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """``x`` (batch, channels, z, y, x) scaled and shifted per channel by the ``condition`` (batch, n)."""
        scale, shift = self.scale_shift(condition)
        shape = (x.shape[0], x.shape[1], 1, 1, 1)
        return x * scale.view(shape).to(x.dtype) + shift.view(shape).to(x.dtype)


class FiLM(SliderModulation):
    """x -> InstanceNorm(x) * (1 + gamma(s)) + beta(s): AdaIN with a learned style; identity-like at start."""

    def __init__(self, channels: int, n_conditions: int, hidden: int):
        super().__init__(channels, n_conditions, hidden)
        self.norm = nn.InstanceNorm3d(channels, affine=False)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """``x`` instance-normalised, then modulated by ``condition`` as in :class:`SliderModulation`."""
        return super().forward(self.norm(x), condition)


def _conv(in_channels: int, out_channels: int, strides: int = 1, norm=("instance", {"affine": True})) -> Convolution:
    return Convolution(3, in_channels, out_channels, strides=strides, kernel_size=3, norm=norm, act="PRELU")


class UpBlock(nn.Module):
    """Upsample x2, concatenate the skip, convolve, FiLM-modulate."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, n_conditions: int, hidden: int):
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = Convolution(3, out_channels + skip_channels, out_channels, kernel_size=3, norm=None, act=None)
        self.film = FiLM(out_channels, n_conditions, hidden)
        self.act = nn.PReLU()

    def forward(self, x, skip, condition):
        """``x`` upsampled to ``skip``'s resolution, joined with it and modulated by ``condition``."""
        x = self.conv(torch.cat([self.up(x), skip], dim=1))
        return self.act(self.film(x, condition))


REFINEMENT_REACH = 2  # voxels: the refinement head's two 3x3x3 convolutions each read one voxel further


@dataclass(frozen=True)
class RefinementBox:
    """Where the refinement head runs at inference for one case: ``inner`` (slices of the model grid) holds every
    voxel the dose is read at (a case fills a fraction of the model grid: a neck CT of 160 mm about half its
    z, ~200 mm of its 500 x 312 mm in-plane); ``outer`` adds the head's reach, clipped to the grid. The head has
    no normalisation, so on ``inner`` its correction on ``outer`` equals the whole grid's exactly (zero
    padding at the edges of ``outer`` changes only voxels within the reach, outside ``inner``, where the
    grid's own edge is not); outside ``inner`` the correction is left 0."""

    inner: tuple[slice, slice, slice]
    outer: tuple[slice, slice, slice]

    @classmethod
    def around(cls, lower, upper, shape) -> "RefinementBox":
        """The box of model-grid voxels ``lower``..``upper`` (inclusive, z y x; clipped to ``shape``)."""
        inner = tuple(slice(max(0, int(lo)), min(n, int(hi) + 1)) for lo, hi, n in zip(lower, upper, shape))
        outer = tuple(slice(max(0, s.start - REFINEMENT_REACH), min(n, s.stop + REFINEMENT_REACH))
                      for s, n in zip(inner, shape))
        return cls(inner, outer)

    @property
    def inner_in_outer(self) -> tuple[slice, slice, slice]:
        """``inner`` as slices of an array that covers ``outer`` (where the correction computed on it is read)."""
        return tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(self.inner, self.outer))

    def mirrored(self, nx: int) -> "RefinementBox":
        """The box of the left-right mirrored case (x flipped on a grid of ``nx`` columns)."""
        def flip(s: slice) -> slice:
            return slice(nx - s.stop, nx - s.start)
        return RefinementBox((*self.inner[:2], flip(self.inner[2])), (*self.outer[:2], flip(self.outer[2])))


class PreferenceDoseNet(nn.Module):
    """Anatomy channels + sliders -> dose (normalised by the card's norm_gy), through the prior's decoder."""

    def __init__(self, in_channels: int, prior_config: dict | None = None, config: dict | None = None):
        super().__init__()
        config = {**DEFAULT_PREFERENCE_CONFIG, **(config or {})}
        self.prior = build_dose_prior(prior_config)
        latent_levels = int(math.log2(latent_downsampling(prior_config)))
        channels = config["down_channels"]
        if len(channels) <= latent_levels:
            raise ValueError("the encoder must go deeper than the prior's latent resolution")
        self.latent_level = latent_levels  # index into down features at the latent resolution
        self.down = nn.ModuleList()
        previous = in_channels
        for channel in channels:
            self.down.append(nn.Sequential(_conv(previous, channel, strides=2), _conv(channel, channel)))
            previous = channel
        self.up = nn.ModuleList()
        for level in range(len(channels) - 1, latent_levels - 1, -1):  # from the deepest to the latent level
            self.up.append(UpBlock(channels[level], channels[level - 1], channels[level - 1],
                                   config["n_sliders"], config["film_hidden"]))
        embedding_dim = self.prior.embedding_dim
        self.latent_head = nn.Conv3d(channels[latent_levels - 1], embedding_dim, kernel_size=1)
        # Refinement (our addition to the two-stage method): the frozen decoder draws from a coarse latent,
        # so sharp edges at target borders are smoothed; a small full-resolution residual head that sees the
        # anatomy restores them. It sees the sliders only through the decoded dose. 0 channels = off.
        refine = config["refine_channels"]
        self.refine = nn.Sequential(
            nn.Conv3d(in_channels + 1, refine, kernel_size=3, padding=1), nn.PReLU(),
            nn.Conv3d(refine, refine, kernel_size=3, padding=1), nn.PReLU(),
            nn.Conv3d(refine, 1, kernel_size=1),
        ) if refine else None
        if self.refine is not None:
            nn.init.zeros_(self.refine[-1].weight)
            nn.init.zeros_(self.refine[-1].bias)
        # v1 lets the sliders act only through the latent; with refine_film they also modulate the refinement
        # head, which can then reshape the dose inside the PTVs (what the homogeneity slider asks for)
        self.refine_film = nn.ModuleList(
            SliderModulation(refine, config["n_sliders"], config["film_hidden"]) for _ in range(2)
        ) if refine and config["refine_film"] else None

    def encode_anatomy(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Down-path features (independent of the sliders: cacheable)."""
        features = []
        for block in self.down:
            x = block(x)
            features.append(x)
        return features

    def latent(self, features: list[torch.Tensor], sliders: torch.Tensor) -> torch.Tensor:
        """The prior's continuous latent from the down-path ``features`` (:meth:`encode_anatomy`) and the
        ``sliders`` (batch, n_sliders): the up path, FiLM-modulated, and the latent head."""
        x = features[-1]
        for block, skip in zip(self.up, reversed(features[self.latent_level - 1:-1])):
            x = block(x, skip, sliders)
        return self.latent_head(x)

    def refinement_anatomy_term(self, anatomy: torch.Tensor, box: RefinementBox | None = None) -> torch.Tensor:
        """The refinement head's first convolution applied to the anatomy channels alone (with its bias). A
        convolution is linear in its input channels, so this part does not depend on the condition: a
        predictor computes it once per case, and each slider or DVH change convolves only the decoded dose
        (the anatomy is 11 of its 12 input channels). With ``box``: on its ``outer`` part only (exact on the
        voxels the inner part's correction reads)."""
        if box is not None:
            anatomy = anatomy[(..., *box.outer)]
        conv_in = self.refine[0]
        channels = anatomy.shape[1]
        return conv3d(anatomy.to(conv_in.weight.dtype), conv_in.weight[:, :channels], conv_in.bias,
                      padding=conv_in.padding)

    def _refinement(self, anatomy: torch.Tensor, coarse: torch.Tensor, sliders: torch.Tensor | None,
                    anatomy_term: torch.Tensor | None = None) -> torch.Tensor:
        conv_in, act_in, conv_mid, act_mid, conv_out = self.refine
        if anatomy_term is None:
            hidden = conv_in(torch.cat([anatomy.to(coarse.dtype), coarse], dim=1))
        else:
            dose_weights = conv_in.weight[:, anatomy.shape[1]:]
            hidden = anatomy_term + conv3d(coarse, dose_weights, None, padding=conv_in.padding)
        if self.refine_film is not None:
            hidden = self.refine_film[0](hidden, sliders)
        hidden = conv_mid(act_in(hidden))
        if self.refine_film is not None:
            hidden = self.refine_film[1](hidden, sliders)
        return conv_out(act_mid(hidden))

    def _refinement_inference(self, coarse: torch.Tensor, sliders: torch.Tensor | None,
                              anatomy_term: torch.Tensor) -> torch.Tensor:
        """:meth:`_refinement` without autograd, for one case: the same function, about twice as fast at full
        resolution on CPU. Each slider modulation is a per-channel affine map right after a convolution, so it
        is folded into that convolution's weights and bias; the activations run in place (each fresh full-size
        tensor costs as much as the arithmetic on it); the 3x3x3 convolution between them runs channels-last
        (oneDNN's preferred layout); the 1x1x1 output convolution is a matrix product."""
        conv_in, act_in, conv_mid, act_mid, conv_out = self.refine
        channels = conv_mid.weight.shape[0]
        ones, zeros = coarse.new_ones(channels), coarse.new_zeros(channels)
        scale_in, shift_in = ones, zeros
        scale_mid, shift_mid = ones, zeros
        if self.refine_film is not None:
            scale_in, shift_in = (t[0].to(coarse.dtype) for t in self.refine_film[0].scale_shift(sliders))
            scale_mid, shift_mid = (t[0].to(coarse.dtype) for t in self.refine_film[1].scale_shift(sliders))
        per_output = (-1, 1, 1, 1, 1)
        dose_weights = conv_in.weight[:, -coarse.shape[1]:]  # the anatomy channels' part is in the term
        hidden = conv3d(coarse, (dose_weights * scale_in.view(per_output)).to(coarse.dtype), shift_in,
                        padding=conv_in.padding)
        hidden.addcmul_(anatomy_term.to(hidden.dtype), scale_in.view(1, -1, 1, 1, 1))
        nn.functional.leaky_relu_(hidden, float(act_in.weight))  # a one-parameter PReLU
        weights_mid = (conv_mid.weight * scale_mid.view(per_output)).contiguous(memory_format=torch.channels_last_3d)
        hidden = conv3d(hidden.contiguous(memory_format=torch.channels_last_3d), weights_mid.to(hidden.dtype),
                        (conv_mid.bias * scale_mid + shift_mid).to(hidden.dtype), padding=conv_mid.padding)
        nn.functional.leaky_relu_(hidden, float(act_mid.weight))
        voxels_by_channel = hidden.permute(0, 2, 3, 4, 1).reshape(-1, channels)
        weights_out = conv_out.weight.view(1, channels).t().to(hidden.dtype)
        out = voxels_by_channel @ weights_out + conv_out.bias.to(hidden.dtype)
        return out.view(1, *hidden.shape[2:]).unsqueeze(1)

    def decode_parts(self, latent: torch.Tensor, anatomy: torch.Tensor | None = None,
                     sliders: torch.Tensor | None = None, anatomy_term: torch.Tensor | None = None,
                     box: RefinementBox | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the frozen decoder's dose, the final dose after the refinement head's correction);
        ``anatomy_term``: :meth:`refinement_anatomy_term` of ``anatomy``, when cached; ``box`` (inference, with
        the term of the same box): the correction on the box only (see :class:`RefinementBox`)."""
        coarse = self.prior.decode(latent)
        dose = coarse
        if self.refine is not None and anatomy is not None:
            if self.refine_film is not None and sliders is None:
                raise ValueError("this model's refinement head needs the slider values")
            if anatomy_term is not None and not torch.is_grad_enabled() and coarse.shape[0] == 1:
                if box is None:
                    dose = coarse + self._refinement_inference(coarse, sliders, anatomy_term)
                else:
                    correction = self._refinement_inference(coarse[(..., *box.outer)], sliders, anatomy_term)
                    dose = coarse.clone()
                    dose[(..., *box.inner)] += correction[(..., *box.inner_in_outer)]
            else:
                dose = coarse + self._refinement(anatomy, coarse, sliders, anatomy_term)
        return coarse, torch.relu(dose)

    def decode(self, latent: torch.Tensor, anatomy: torch.Tensor | None = None,
               sliders: torch.Tensor | None = None, anatomy_term: torch.Tensor | None = None,
               box: RefinementBox | None = None) -> torch.Tensor:
        """Dose from a latent; with the input ``anatomy`` the refinement head adds its correction."""
        return self.decode_parts(latent, anatomy, sliders, anatomy_term, box)[1]

    def forward(self, x: torch.Tensor, sliders: torch.Tensor) -> torch.Tensor:
        """Dose for the input channels ``x`` (batch, C, z, y, x) at the slider values ``sliders`` (batch, n)."""
        return self.decode(self.latent(self.encode_anatomy(x), sliders), x, sliders)

    def freeze_prior(self) -> None:
        """Fix the prior's weights (Stage II trains only the rest) and keep it in eval mode."""
        self.prior.eval()
        for parameter in self.prior.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True):
        """As ``nn.Module.train``, except that a frozen prior stays in eval mode."""
        super().train(mode)
        if not any(p.requires_grad for p in self.prior.parameters()):
            self.prior.eval()  # a frozen prior stays in eval mode (its EMA codebook must not move)
        return self
