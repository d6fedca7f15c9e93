"""The torch device that training and prediction run on (needs torch: the ``models`` extra).

Core, not training: :mod:`doseai.predict` and :mod:`doseai.train` both use it, and inference must not
import training.
"""

from __future__ import annotations

import torch


def pick_device(requested: str = "auto") -> torch.device:
    """``requested`` as a torch device; "auto" is the GPU when CUDA has one, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)
