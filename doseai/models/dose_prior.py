"""Stage I: a vector-quantized autoencoder of dose distributions (MONAI ``VQVAE``).

Its decoder, frozen, turns latent codes into plausible doses; the preference model's encoder maps
anatomy into this latent space. MONAI's VQVAE is used as is (strided convolutions, so it is cheap
on a CPU); the configuration lives in the model card under ``dose_prior``.
"""

from __future__ import annotations

from monai.networks.nets import VQVAE

DEFAULT_PRIOR_CONFIG = {
    "channels": [16, 32],
    "num_res_layers": 1,
    "num_embeddings": 256,
    "embedding_dim": 32,
    "commitment_cost": 0.25,
}


def build_dose_prior(config: dict | None = None) -> VQVAE:
    """The VQ-VAE of ``config`` (overrides of :data:`DEFAULT_PRIOR_CONFIG`), one dose channel in and out."""
    config = {**DEFAULT_PRIOR_CONFIG, **(config or {})}
    levels = len(config["channels"])
    return VQVAE(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=tuple(config["channels"]),
        num_res_channels=tuple(config["channels"]),
        num_res_layers=config["num_res_layers"],
        downsample_parameters=((2, 4, 1, 1),) * levels,
        upsample_parameters=((2, 4, 1, 1, 0),) * levels,
        num_embeddings=config["num_embeddings"],
        embedding_dim=config["embedding_dim"],
        commitment_cost=config["commitment_cost"],
    )


def latent_downsampling(config: dict | None = None) -> int:
    """How many times smaller along each axis the latent grid is than the dose grid (2 per level)."""
    return 2 ** len({**DEFAULT_PRIOR_CONFIG, **(config or {})}["channels"])

