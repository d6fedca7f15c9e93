"""A conditional diffusion model of what a deterministic dose prediction gets wrong: several plausible doses.

The dose predicted by the preference model (the *base*) is one good answer; a clinical plan for the same anatomy
could be another. This model learns the distribution of the difference, clinical dose minus base dose, on a
coarse grid (the model grid average-pooled by ``pool_zyx``: its latent space, decoded by trilinear upsampling),
conditioned on

- the anatomy and the base dose on that grid (input channels, concatenated with the noisy residual),
- one token per structure (the seven OpenKBP OARs, up to three target levels) and one for the beams, each a
  short vector (kind, presence, volume, prescription, base dose in it, centroid), read through cross-attention,
- the treatment site, as a class embedding (only head and neck exists in the data: slot 0; the other slots are
  free for a second site's data),

with MONAI's ``DiffusionModelUNet`` and its schedulers (v-prediction, DDIM sampling in a few steps). A sample is
base dose + upsampled residual. The design is the two-stage regression + diffusion of CorrDiff (Mardani et al.
2025), on the project's own preference model: the sample mean stays near the base (whose dose score the model
cannot worsen much), and the samples' spread says where the base is unsure.

Why not in the Stage I VQ-VAE latent (as ADDiff-Dose diffuses in its VAE's): that decoder's own reconstruction
error (1.56 Gy mean absolute on validation doses, half the base's 2.9 Gy error) would sit in every sample, and
its 32 latent channels at 32 x 20 x 32 made a denoising step 10x slower on the 2-core CPU than this 1-channel
residual grid.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from doseai.models.features import channel_names

# the base model's input channels the conditions read
CHANNELS = channel_names()
OAR_CHANNELS = list(range(CHANNELS.index("Brainstem"), CHANNELS.index("Mandible") + 1))
TARGET, BODY, BEAMS = CHANNELS.index("target_dose"), CHANNELS.index("body"), CHANNELS.index("beam_plate")
SITES = ("head_and_neck",)  # class-embedding slots in use; the network has ``site_slots`` of them
DEFAULT_DIFFUSION_CONFIG = {
    "pool_zyx": [8, 4, 4],  # model grid 128 x 80 x 128 -> 16 x 20 x 32 (20 mm x 15.6 mm x 15.6 mm cells)
    "channels": [16, 32, 64],
    "attention_levels": [False, False, True],
    "num_res_blocks": 1,
    "head_channels": 32,
    "norm_groups": 8,
    "context_dim": 32,
    "site_slots": 4,
    "train_timesteps": 1000,
    "schedule": "scaled_linear_beta",
    "beta_start": 0.0015,
    "beta_end": 0.0195,
    "prediction_type": "v_prediction",
    "residual_scale": 0.04,  # the residual (relative dose) is divided by this: its std in the body (training)
}
TOKEN_FEATURES = 10  # kind (OAR, target, beams), present, volume, level, base dose, centroid z, y, x
TARGET_TOKENS = 3


def config_with_defaults(config: dict | None) -> dict:
    return {**DEFAULT_DIFFUSION_CONFIG, **(config or {})}


def coarse(volume: torch.Tensor, pool_zyx) -> torch.Tensor:
    """``volume`` (batch, channels, z, y, x) averaged over ``pool_zyx`` blocks: the residual grid."""
    return functional.avg_pool3d(volume.float(), kernel_size=tuple(pool_zyx), stride=tuple(pool_zyx))


def fine(residual: torch.Tensor, shape) -> torch.Tensor:
    """A residual of the coarse grid trilinearly upsampled to the model grid ``shape`` (z, y, x)."""
    return functional.interpolate(residual, size=tuple(shape), mode="trilinear", align_corners=False)


def structure_tokens(anatomy: torch.Tensor, base_dose: torch.Tensor, oar_channels: list[int], target_channel: int,
                     body_channel: int, beam_channel: int) -> torch.Tensor:
    """(batch, tokens, TOKEN_FEATURES): one token per OAR channel, per target level (highest first, up to
    TARGET_TOKENS; absent ones zero), and one for the beams (fraction of the body under the beam plate)."""
    batch = anatomy.shape[0]
    grid = [torch.linspace(0.0, 1.0, n, device=anatomy.device) for n in anatomy.shape[2:]]
    zz, yy, xx = torch.meshgrid(*grid, indexing="ij")
    body = (anatomy[:, body_channel] > 0.5).float()
    body_voxels = body.sum(dim=(1, 2, 3)).clamp(min=1)
    dose = base_dose[:, 0].float()

    def token(kind: int, mask: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        voxels = mask.sum(dim=(1, 2, 3))
        present = (voxels > 0).float()
        safe = voxels.clamp(min=1)
        centroid = [(mask * axis).sum(dim=(1, 2, 3)) / safe for axis in (zz, yy, xx)]
        kinds = torch.zeros(batch, 3, device=anatomy.device)
        kinds[:, kind] = 1.0
        values = [present, 10.0 * voxels / body_voxels, level, (mask * dose).sum(dim=(1, 2, 3)) / safe, *centroid]
        return torch.cat([kinds, torch.stack(values, dim=1)], dim=1) * present[:, None]  # absent: zeros

    tokens = [token(0, (anatomy[:, c] > 0.5).float(), torch.zeros(batch, device=anatomy.device))
              for c in oar_channels]
    target = anatomy[:, target_channel].float()
    for b_tokens in _target_tokens(target, token, batch):
        tokens.append(b_tokens)
    beams = anatomy[:, beam_channel].float() * body
    tokens.append(token(2, (beams > 0).float(), beams.sum(dim=(1, 2, 3)) / body_voxels))
    return torch.stack(tokens, dim=1)


def _target_tokens(target: torch.Tensor, token, batch: int) -> list[torch.Tensor]:
    """TARGET_TOKENS tokens: the target levels of each case, highest first (zeros where a case has fewer)."""
    rows = [[] for _ in range(TARGET_TOKENS)]
    for b in range(batch):
        levels = torch.unique(target[b][target[b] > 0]).flip(0)[:TARGET_TOKENS]
        for i in range(TARGET_TOKENS):
            if i < len(levels):
                mask = (target[b:b + 1] == levels[i]).float()
                rows[i].append(token(1, mask, levels[i].reshape(1))[0])
            else:
                rows[i].append(target.new_zeros(TOKEN_FEATURES))
    return [torch.stack(row) for row in rows]


class ResidualDiffusionNet(nn.Module):
    """MONAI ``DiffusionModelUNet`` on [noisy residual, condition channels], cross-attending to the structure
    tokens, with the site as its class embedding; predicts v (or what ``prediction_type`` says)."""

    def __init__(self, condition_channels: int, config: dict | None = None):
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet

        config = config_with_defaults(config)
        self.config = config
        self.token_embedding = nn.Sequential(nn.Linear(TOKEN_FEATURES, config["context_dim"]), nn.SiLU(),
                                             nn.Linear(config["context_dim"], config["context_dim"]))
        self.unet = DiffusionModelUNet(
            spatial_dims=3, in_channels=1 + condition_channels, out_channels=1, channels=tuple(config["channels"]),
            attention_levels=tuple(config["attention_levels"]), num_res_blocks=config["num_res_blocks"],
            num_head_channels=tuple(config["head_channels"] if a else 0 for a in config["attention_levels"]),
            norm_num_groups=config["norm_groups"], with_conditioning=True,
            cross_attention_dim=config["context_dim"], num_class_embeds=config["site_slots"])

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor, tokens: torch.Tensor,
                site: torch.Tensor) -> torch.Tensor:
        """``noisy`` (batch, 1, coarse grid), ``condition`` (batch, C, coarse grid), ``tokens`` (batch, T,
        TOKEN_FEATURES), ``site`` (batch,) class indices -> the network's prediction (batch, 1, coarse grid)."""
        context = self.token_embedding(tokens.float())
        return self.unet(torch.cat([noisy, condition.to(noisy.dtype)], dim=1), timesteps, context=context,
                         class_labels=site)


def schedulers(config: dict | None = None):
    """(training scheduler DDPM, sampling scheduler DDIM) of MONAI with the card's noise schedule."""
    return noise_schedulers(config_with_defaults(config))


def noise_schedulers(config: dict):
    """(DDPM, DDIM) of MONAI for a complete network config (``train_timesteps``, ``schedule``, ``beta_start``,
    ``beta_end``, ``prediction_type``); the dose and the fluence diffusion models share it."""
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

    common = {"num_train_timesteps": config["train_timesteps"], "schedule": config["schedule"],
              "beta_start": config["beta_start"], "beta_end": config["beta_end"],
              "prediction_type": config["prediction_type"]}
    return DDPMScheduler(**common), DDIMScheduler(**common, clip_sample=False)


def predicted_sample(scheduler, model_output: torch.Tensor, noisy: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """The clean residual the network's output implies at ``timesteps`` (for the loss on clinical metrics)."""
    alphas = scheduler.alphas_cumprod.to(noisy.device)[timesteps].view(-1, 1, 1, 1, 1)
    kind = scheduler.prediction_type
    if kind == "v_prediction":
        return alphas.sqrt() * noisy - (1 - alphas).sqrt() * model_output
    if kind == "epsilon":
        return (noisy - (1 - alphas).sqrt() * model_output) / alphas.sqrt()
    return model_output


@torch.no_grad()
def sample_residuals(net: ResidualDiffusionNet, condition: torch.Tensor, tokens: torch.Tensor, site: int,
                     n: int, steps: int, generator: torch.Generator, batch: int = 4) -> torch.Tensor:
    """``n`` residual samples (n, 1, coarse grid) for one case (``condition`` (1, C, ...), ``tokens`` (1, T, F)),
    in dose units relative to the case's norm, by DDIM (eta 0) in ``steps`` steps, ``batch`` at a time."""
    _, sampler = schedulers(net.config)
    sampler.set_timesteps(steps)
    out = []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        x = torch.randn((m, 1, *condition.shape[2:]), generator=generator).to(condition.device)
        cond, tok = condition.expand(m, -1, -1, -1, -1), tokens.expand(m, -1, -1)
        labels = torch.full((m,), site, dtype=torch.long, device=condition.device)
        for t in sampler.timesteps:
            v = net(x, torch.full((m,), int(t), device=condition.device, dtype=torch.long), cond, tok, labels)
            x, _ = sampler.step(v, int(t), x)
        out.append(x)
    return torch.cat(out) * net.config["residual_scale"]


# --- the fine scale: what the coarse residual grid cannot carry -------------------------------------------------
# On the training patients the base's error splits into a coarse part (what the samples vary) and a fine part (the
# rest, 2.44 of the 3.18 Gy mean absolute error, mostly at steep dose edges). The fine part's size is kept as a
# table of its root mean square by the base dose's gradient and level (fitted on training residuals, in the card
# under ``fine_scale``), and the voxel-wise band adds it to the samples' spread (see DoseSamples.band).


def dose_gradient(dose, spacing_zyx) -> np.ndarray:
    """|grad dose| (dose units per mm) of a (z, y, x) dose."""
    parts = np.gradient(np.asarray(dose, np.float32), *spacing_zyx)
    return np.sqrt(sum(p * p for p in parts))


def fine_sigma(dose, spacing_zyx, table: dict) -> np.ndarray:
    """The fine-scale error's RMS per voxel of a (z, y, x) base dose (relative dose units), from the card's
    ``fine_scale`` table (``gradient_edges``, ``dose_edges``, ``rms`` [dose bin][gradient bin])."""
    gradient_bin = np.clip(np.searchsorted(table["gradient_edges"], dose_gradient(dose, spacing_zyx), side="right") - 1,
                           0, len(table["gradient_edges"]) - 2)
    dose_bin = np.clip(np.searchsorted(table["dose_edges"], dose, side="right") - 1, 0, len(table["dose_edges"]) - 2)
    return np.asarray(table["rms"], np.float32)[dose_bin, gradient_bin]


def condition_inputs(anatomy: torch.Tensor, base_dose: torch.Tensor, pool_zyx) -> tuple[torch.Tensor, torch.Tensor]:
    """(coarse condition channels: the anatomy's and then the base dose's, structure tokens) of one batch."""
    condition = torch.cat([coarse(anatomy, pool_zyx), coarse(base_dose, pool_zyx)], dim=1)
    tokens = structure_tokens(anatomy, base_dose, OAR_CHANNELS, TARGET, BODY, BEAMS)
    return condition, tokens
