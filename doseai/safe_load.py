"""Loading model weights and training checkpoints without ever unpickling code.

``torch.load(..., weights_only=False)`` runs whatever a pickle holds, so a checkpoint from elsewhere could run
code on the user's machine. Every file the project reads with torch goes through :func:`load_torch_file`, which
uses ``weights_only=True`` (tensors, dicts, lists, strings and numbers only); what the project saves is kept to
those types (:func:`plain`), so that suffices.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from doseai.errors import UnreadableInputError


def plain(value: Any) -> Any:
    """``value`` with numpy scalars and arrays, tuples and paths turned into what ``weights_only`` loads."""
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


def load_torch_file(path: str | Path, what: str = "model file") -> Any:
    """The contents of a torch file, loaded with ``weights_only=True``. Raises UnreadableInputError (one line
    that says what the file is not) for a missing, truncated, non-torch or code-carrying file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UnreadableInputError(f"{path}: no such {what}")
    try:
        with warnings.catch_warnings():  # torch's advice on weights_only is for programmers, not for users
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if not found:  # not a Python object torch refused: a damaged or foreign file
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
            raise UnreadableInputError(
                f"{path}: not a {what}: unreadable as a torch file, perhaps truncated or of another kind "
                f"({(detail.group(1) if detail else str(error).splitlines()[0])[:160]})") from None
        raise UnreadableInputError(
            f"{path}: not loaded as a {what}: it holds Python objects other than tensors and plain values "
            f"({found.group(1)}), and unpickling them could run code") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, TypeError) as error:
        raise UnreadableInputError(
            f"{path}: not a {what}: unreadable as a torch file, perhaps truncated or of another kind "
            f"({type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else 'no detail'})") from None


def load_state_dict_file(path: str | Path, what: str = "model weights file") -> dict:
    """A state dict (parameter name -> tensor) from ``path``; refuses anything else with a one-line error."""
    import torch

    state = load_torch_file(path, what)
    if not isinstance(state, Mapping) or not state or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()):
        raise UnreadableInputError(f"{path}: not a {what}: expected a mapping of parameter names to tensors, "
                                   f"found {type(state).__name__}")
    return dict(state)


def load_checkpoint(path: str | Path, required: tuple[str, ...] = ("model",), what: str = "training checkpoint"
                    ) -> dict:
    """A training checkpoint (a dict holding at least ``required``) from ``path``, loaded safely."""
    state = load_torch_file(path, what)
    missing = [key for key in required if not isinstance(state, Mapping) or key not in state]
    if missing:
        raise UnreadableInputError(f"{path}: not a {what}: it lacks {', '.join(missing)} (a checkpoint is the "
                                   "last.pt that `doseai train` writes in its run folder)")
    return dict(state)


def load_into(net, state: Mapping, path: str | Path, card_name: str) -> None:
    """Load ``state`` into ``net`` strictly; a file made for another network is refused in one line."""
    expected = set(net.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise UnreadableInputError(
            f"{path}: these weights do not fit the network of model card {card_name} ({len(missing)} parameters "
            f"missing, {len(unexpected)} unexpected, e.g. {sorted(missing or unexpected)[0]}): the card .json "
            "beside the weights must be the one exported with them")
    try:
        net.load_state_dict({key: value.float() for key, value in state.items()})
    except RuntimeError as error:
        raise UnreadableInputError(f"{path}: these weights do not fit the network of model card {card_name} "
                                   f"({str(error).splitlines()[-1].strip()[:200]})") from None
