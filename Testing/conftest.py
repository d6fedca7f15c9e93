from pathlib import Path

import pytest

from doseai.paths import openkbp_root
from doseai.sample import make_sample_case

OPENKBP = openkbp_root()


@pytest.fixture(scope="session")
def small_case():
    """A small sample phantom (fast to write, read and rasterize)."""
    return make_sample_case(seed=1, shape=(24, 48, 48), spacing_xyz=(4.0, 4.0, 3.0))


@pytest.fixture(scope="session")
def fine_case():
    """The sample phantom on a CT finer than a dose grid: 192 x 192 x 128 voxels of 1.3 x 1.3 x 1.25 mm (its dose
    grid at the default 2.5 mm is 2.6 x 2.6 x 2.5 mm)."""
    return make_sample_case(seed=1, shape=(128, 192, 192), spacing_xyz=(1.3, 1.3, 1.25), with_dose=False)


@pytest.fixture(scope="session")
def openkbp_validation():
    folder = OPENKBP / "validation" / "128"
    if not folder.is_dir():
        pytest.skip(f"OpenKBP data not found at {folder} (set DOSEAI_DATA or place ../shared/data beside the repo)")
    return folder


def write_tiny_dvh_model(folder) -> Path:
    """A DVH-conditioned model with random (seeded) weights on a coarse 32^3 grid, with its card: fast,
    for testing the plumbing (shapes, geometry, validation), not the quality. The shipped model's
    quality is measured by Testing/benchmarks/bench_dvh.py."""
    import json

    import torch

    from doseai.models.dvh_conditioned import DEFAULT_DVH_LAYOUT, DEFAULT_DVH_NET_CONFIG, build_dvh_net
    from doseai.models.dose_prior import DEFAULT_PRIOR_CONFIG
    from doseai.models.features import channel_names

    torch.manual_seed(0)
    config = {**DEFAULT_DVH_NET_CONFIG, "down_channels": [4, 8, 8, 8], "film_hidden": 8, "refine_channels": 4}
    prior = {**DEFAULT_PRIOR_CONFIG, "channels": [4, 8], "num_embeddings": 16, "embedding_dim": 4}
    net = build_dvh_net(len(channel_names()), prior, DEFAULT_DVH_LAYOUT, config)
    for module in net.modules():  # the zero-initialised output layers would make every DVH give the same dose
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.3)
    path = Path(folder) / "tiny_dvh.pt"
    torch.save(net.state_dict(), path)
    card = {"inputs": {"channels": channel_names()},
            "grid": {"shape_zyx": [32, 32, 32], "spacing_xyz_mm": [6.0, 6.0, 3.0]},
            "dvh": DEFAULT_DVH_LAYOUT, "dose_prior": {"config": prior}, "network": {"config": config}}
    path.with_suffix(".json").write_text(json.dumps(card))
    return path


THREE_CONDITIONS = [
    {"name": "oar_sparing", "label": "OAR sparing", "abbreviation": "OAR", "range": [-1.0, 1.0]},
    {"name": "homogeneity", "label": "PTV homogeneity", "abbreviation": "HI", "range": [-1.0, 1.0]},
    {"name": "cord_margin", "label": "Cord margin", "abbreviation": "CM", "range": [-0.5, 2.0]},
]


def write_tiny_preference_model(folder, conditions=THREE_CONDITIONS) -> Path:
    """A preference model with random (seeded) weights on a coarse 32^3 grid whose card lists ``conditions``
    (by default a third one, ``cord_margin``, besides the shipped two): for the plumbing of the conditions from
    the card through every layer, not for quality (bench_preference.py measures the shipped model)."""
    import json

    import torch

    from doseai.models.dose_prior import DEFAULT_PRIOR_CONFIG
    from doseai.models.features import channel_names
    from doseai.models.preference import DEFAULT_PREFERENCE_CONFIG, PreferenceDoseNet

    torch.manual_seed(0)
    config = {**DEFAULT_PREFERENCE_CONFIG, "down_channels": [4, 8, 8, 8], "film_hidden": 8, "refine_channels": 4,
              "n_sliders": len(conditions)}
    prior = {**DEFAULT_PRIOR_CONFIG, "channels": [4, 8], "num_embeddings": 16, "embedding_dim": 4}
    net = PreferenceDoseNet(len(channel_names()), prior, config)
    for module in net.modules():  # the zero-initialised FiLM layers would make every slider give the same dose
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.3)
    path = Path(folder) / "tiny_preference.pt"
    torch.save(net.state_dict(), path)
    text = " ".join(f"{c['name']} = x moves it." for c in conditions) + " 0 = the typical plan."
    card = {"name": "tiny_preference", "inputs": {"channels": channel_names()},
            "grid": {"shape_zyx": [32, 32, 32], "spacing_xyz_mm": [6.0, 6.0, 3.0]},
            "preference": {"conditions": conditions, "text": text},
            "dose_prior": {"config": prior}, "network": {"config": config}}
    path.with_suffix(".json").write_text(json.dumps(card))
    return path


@pytest.fixture(scope="session")
def tiny_preference_model(tmp_path_factory):
    return write_tiny_preference_model(tmp_path_factory.mktemp("preference_model"))


def write_tiny_diffusion_model(folder) -> Path:
    """A residual diffusion model with random (seeded) weights over the tiny preference model (written beside it,
    which its card names as the base): for the plumbing of samples, spread and bands, not for quality
    (bench_diffusion.py measures the shipped model)."""
    import json

    import torch

    from doseai.models.diffusion import ResidualDiffusionNet, config_with_defaults

    base = write_tiny_preference_model(folder)
    torch.manual_seed(0)
    config = config_with_defaults({"pool_zyx": [4, 4, 4], "channels": [8, 16, 16], "head_channels": 8,
                                   "context_dim": 8, "norm_groups": 4})
    net = ResidualDiffusionNet(12, config)
    path = Path(folder) / "tiny_diffusion.pt"
    torch.save(net.state_dict(), path)
    card = {"name": "tiny_diffusion", "base_model": base.name,
            "inputs": {"condition_channels": 12}, "network": {"config": config}}
    path.with_suffix(".json").write_text(json.dumps(card))
    return path


@pytest.fixture(scope="session")
def tiny_diffusion_model(tmp_path_factory):
    return write_tiny_diffusion_model(tmp_path_factory.mktemp("diffusion_model"))


@pytest.fixture(scope="session")
def tiny_dvh_model(tmp_path_factory):
    return write_tiny_dvh_model(tmp_path_factory.mktemp("dvh_model"))
