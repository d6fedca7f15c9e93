import pytest

from doseai.paths import openkbp_root
from doseai.sample import make_sample_case

OPENKBP = openkbp_root()


@pytest.fixture(scope="session")
def small_case():
    """A small sample phantom (fast to write, read and rasterize)."""
    return make_sample_case(seed=1, shape=(24, 48, 48), spacing_xyz=(4.0, 4.0, 3.0))


@pytest.fixture(scope="session")
def openkbp_validation():
    folder = OPENKBP / "validation" / "128"
    if not folder.is_dir():
        pytest.skip(f"OpenKBP data not found at {folder} (set DOSEAI_DATA or place ../shared/data beside the repo)")
    return folder
