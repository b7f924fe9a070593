"""Checkpoints: written atomically, loaded with ``weights_only=True``, checked before use.

A checkpoint is a plain dict of tensors and primitives: model, optimizer, scheduler and scaler state,
``epoch`` (epochs completed), ``progress`` (steps done inside the next epoch, non-zero only after an
interrupt), ``best_miou``, ``arch``, ``num_classes``, ``label_set``, ``world_size``, ``config``,
``history`` (one dict per epoch) and the torch RNG state.
"""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import torch

from errors import UserError

REQUIRED_KEYS = ("model", "arch", "num_classes", "label_set")
TRAINING_KEYS = ("optimizer", "scheduler", "scaler", "rng_cpu", "history", "progress", "epoch", "config")


def _fsync_directory(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (the rename lives in the directory, not in the file)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict, path: Path) -> None:
    """Write to a temporary file beside ``path``, flush it to disk, then rename: never a half-written file.
    A failed write removes its temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def publish_copy(source: Path, path: Path) -> None:
    """Make ``path`` hold what ``source`` holds now, atomically and without writing the data again.

    A hard link shares the file: ``source`` is later replaced by a rename, never rewritten in place, so
    ``path`` keeps this version. File systems without hard links get a copy.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_directory(path.parent)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint saved by main.py; any other file gives a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the best.pt or last.pt of a run directory")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save writes a zip (or, before 1.6, a pickle)
        raise UserError(f"{path}: not a PyTorch checkpoint file; pass the best.pt or last.pt of a run directory")
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


def require_training_state(state: dict, path: Path) -> None:
    """A checkpoint to resume from needs the optimizer, schedule and progress, not only the weights."""
    missing = [key for key in TRAINING_KEYS if key not in state]
    if missing:
        raise UserError(f"{path}: holds weights but no training state ({', '.join(missing)} missing), so it cannot "
                        f"be resumed; start a new run from it with --init-from {path}")


def load_model_weights(model: torch.nn.Module, state: dict, path: Path) -> None:
    """Load ``state['model']`` into ``model``, turning a shape or key mismatch into a one-line error."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise UserError(f"{path}: weights do not fit a {state['arch']} with {state['num_classes']} classes "
                        f"({str(error).splitlines()[0]})") from None
