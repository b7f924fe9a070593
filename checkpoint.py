"""Checkpoints: written atomically, loaded with ``weights_only=True``, checked before use.

A checkpoint is a plain dict of tensors and primitives: model, optimizer, scheduler and scaler state,
``epoch`` (epochs completed), ``step`` (steps done inside the next epoch, non-zero only after Ctrl-C),
``best_miou``, ``arch``, ``num_classes``, ``label_set``, ``config``, ``history`` (one dict per epoch) and
the torch RNG states.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from errors import UserError

REQUIRED_KEYS = ("model", "arch", "num_classes", "label_set")


def save_checkpoint(state: dict, path: Path) -> None:
    """Write to a temporary file beside ``path``, flush it to disk, then rename: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint saved by main.py; any other file gives a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the best.pt or last.pt of a run directory")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0]
        raise UserError(f"{path}: refused to load, it holds objects other than tensors and plain data "
                        f"({first_line}); only load checkpoints you trust, saved by main.py") from None
    except Exception as error:  # truncated or foreign files raise many types inside torch.load
        raise UserError(f"{path}: not a readable checkpoint, truncated or corrupt ({str(error).splitlines()[0]}); "
                        "use another checkpoint, e.g. the run's best.pt or last.pt") from None
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        raise UserError(f"{path}: not a checkpoint written by main.py (needs keys {', '.join(REQUIRED_KEYS)})")
    return state


def load_model_weights(model: torch.nn.Module, state: dict, path: Path) -> None:
    """Load ``state['model']`` into ``model``, turning a shape or key mismatch into a one-line error."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise UserError(f"{path}: weights do not fit a {state['arch']} with {state['num_classes']} classes "
                        f"({str(error).splitlines()[0]})") from None
