"""Where data and caches live. Nothing here downloads: data comes from ``../shared/data`` beside the
repository (or ``$DOSEAI_DATA``); generated datasets and checkpoints go to a cache outside the repo."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    return Path(os.environ.get("DOSEAI_DATA", REPO_ROOT.parent / "shared" / "data"))


def openkbp_root() -> Path:
    return data_root() / "openkbp"


def cache_root() -> Path:
    """Checkpoints and generated datasets (never committed)."""
    return Path(os.environ.get("DOSEAI_CACHE", Path.home() / ".cache" / "doseai"))
