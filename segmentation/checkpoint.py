"""Checkpoints: written atomically (on a background thread during training), loaded with ``weights_only=True``,
checked before use, and turned back into models.

A checkpoint is a plain dict of tensors and primitives: model, optimizer, scheduler and scaler state,
``epoch`` (epochs completed), ``progress`` (steps done inside the next epoch, non-zero only after an
interrupt), ``best_miou``, ``arch``, ``num_classes``, ``label_set``, ``world_size``, ``config``,
``history`` (one dict per epoch), the torch RNG state, and ``label_table``: the run's class table
(``LabelSet.to_dict``), so that a model trained on a table file needs the file no more. A weights-only
checkpoint holds just ``REQUIRED_KEYS``: enough for test.py, export.py and --init-from, not for --resume.
"""
from __future__ import annotations

import errno
import math
import os
import pickle
import shutil
import threading
from pathlib import Path

import numpy as np
import torch

from labels import LabelSet, get_label_set
from model import build_model
from segmentation import UserError, os_error_line, quoted

REQUIRED_KEYS = ("model", "arch", "num_classes", "label_set")
TRAINING_KEYS = ("optimizer", "scheduler", "scaler", "rng_cpu", "history", "progress", "epoch", "best_miou", "config")


def _fsync_directory(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (the rename lives in the directory, not in the file)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict, path: Path) -> None:
    """Write to a temporary file beside ``path``, flush it to disk, then rename: never a half-written file.
    A failed write (a full disk, a folder gone or read-only) removes its temporary file, keeps the previous
    ``path`` as it was, and is a UserError that says how to go on."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
        raise UserError(f"{write_failure(error, path)}; {path.name} was not changed{resume_hint(path.parent)}") \
            from None
    finally:
        tmp.unlink(missing_ok=True)


def write_failure(error: Exception, path: Path) -> str:
    """What went wrong writing ``path``, and what to do: the system's reason where there is one."""
    if not isinstance(error, OSError):
        full = path.parent.is_dir() and shutil.disk_usage(path.parent).free < 2**26
        error = OSError(errno.ENOSPC if full else errno.EIO, os.strerror(errno.ENOSPC) if full else
                        f"write failed: {str(error).strip().splitlines()[0][:120]}")
    return os_error_line(OSError(error.errno, error.strerror, str(path)))


def resume_hint(run_dir: Path) -> str:
    last = run_dir / "last.pt"
    return f"; then continue with: python main.py --resume {quoted(last)}" if last.is_file() else "; then run again"


def best_epoch(history: list[dict], epochs: int, final_fit: bool) -> int | None:
    """The epoch best.pt holds, from a run's history: the first best-scoring full-scale epoch (a reduced
    resolution stage scores at its own scale), or a final fit's last (it scores none); None before any."""
    if final_fit:
        return epochs
    scored = [row for row in history if row.get("scale", 1) == 1 and not math.isnan(row["val_mIoU"])]
    return max(scored, key=lambda row: row["val_mIoU"])["epoch"] if scored else None


def republish_best(run_dir: Path, state: dict) -> None:
    """On resume (and on a refused resume of a finished run): best.pt is published right after last.pt is written,
    so a run killed between the two left best.pt an epoch behind, or none, when that last epoch was its best;
    publish it again from last.pt. A final fit is known by the empty val.txt in its run folder."""
    val_names = run_dir / "val.txt"
    final_fit = val_names.is_file() and not val_names.read_text().strip()
    best, epoch = run_dir / "best.pt", best_epoch(state["history"], state["config"]["epochs"], final_fit)
    if epoch == state["epoch"] and (not best.is_file() or load_checkpoint(best)["epoch"] != epoch):
        publish_copy(run_dir / "last.pt", best)


def non_finite(model: torch.nn.Module | dict) -> str | None:
    """The name of the first parameter or buffer (BatchNorm statistics included) holding NaN or inf, or None."""
    state = model if isinstance(model, dict) else model.state_dict()
    return next((name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)


def publish_copy(source: Path, path: Path) -> None:
    """Make ``path`` hold what ``source`` holds now, atomically and without writing the data again.

    A hard link shares the file: ``source`` is later replaced by a rename, never rewritten in place, so
    ``path`` keeps this version. File systems without hard links get a copy.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{write_failure(error, path)}; {path.name} was not changed{resume_hint(path.parent)}") \
            from None


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


def label_set_of(state: dict) -> LabelSet:
    """The classes a checkpoint's model predicts: its own table, or (older checkpoints) the named Cityscapes set."""
    if state.get("label_table") is not None:
        return LabelSet.from_dict(state["label_table"])
    return get_label_set(state["label_set"])


def load_model(path: Path, device: torch.device) -> tuple[torch.nn.Module, dict, LabelSet]:
    """The checkpoint's network in eval mode on ``device`` (channels_last), its state, and its label set."""
    state = load_checkpoint(path)
    label_set = label_set_of(state)
    if state["num_classes"] != label_set.num_classes:
        raise UserError(f"{path}: {state['num_classes']} classes do not match label set {state['label_set']!r} "
                        f"({label_set.num_classes}); the checkpoint is inconsistent")
    broken = non_finite(state["model"])
    if broken:
        raise UserError(f"{path}: {broken} holds NaN or infinite values, so every prediction would be meaningless; "
                        "use a checkpoint of a run that trained without diverging (lower --lr)")
    model = build_model(state["arch"], state["num_classes"], pretrained=False)
    load_model_weights(model, state, path)
    return model.to(device, memory_format=torch.channels_last).eval(), state, label_set


def initialise_from(model: torch.nn.Module, path: Path, arch: str, label_set: LabelSet) -> str:
    """Load ``path``'s weights into ``model``: all of them from the same architecture and classes (fine-tuning),
    the shared ones from a coarser FCN (staged training: the new skip layers start at zero), or, from a model of
    other classes, the trunk alone (its score and upsampling layers are this model's fresh ones). Returns a line
    for the log."""
    state = load_checkpoint(path)
    theirs = label_set_of(state)
    same_classes = theirs.class_names == label_set.class_names and \
        np.array_equal(theirs.class_to_id, label_set.class_to_id)
    own = model.state_dict()
    if any(key not in own for key in state["model"]):
        raise UserError(f"{path}: a {state['arch']} cannot initialise a coarser {arch}")
    loaded = {key: value for key, value in state["model"].items()
              if (same_classes or key.startswith("trunk.")) and value.shape == own[key].shape}
    model.load_state_dict(loaded, strict=False)
    fresh = sorted({key.split(".")[0] for key in own if key not in loaded})
    if not fresh:
        return f"initialised from {path}: all weights of its {state['arch']} (fine-tuning)"
    classes = "" if same_classes else f"; its {theirs.num_classes} classes ({theirs.source}) differ from these " \
        f"{label_set.num_classes}, so only the trunk is loaded"
    return f"initialised from {path} ({state['arch']}): {len(loaded)} of {len(own)} tensors{classes}; " \
        f"fresh: {', '.join(fresh)}"


def restore(state: dict, path: Path, model, optimizer, scheduler, scaler) -> None:
    """Load a resumed run's weights, optimizer, schedule, loss scale and global RNG state."""
    load_model_weights(model, state, path)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as error:
        raise UserError(f"{path}: its optimizer state does not fit this version's parameter groups ({error}); "
                        f"start a new run from its weights with --init-from {path}") from None
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"] and scaler.is_enabled():  # empty when the run had no fp16 loss scaling (CPU, bf16)
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])


def detached_copy(value: object) -> object:
    """A copy of a (nested) state that later training cannot change: tensors cloned to the CPU, containers
    copied, other values shared (they are immutable)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: detached_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(detached_copy(item) for item in value)
    return value


class CheckpointWriter:
    """Writes checkpoints on a background thread, so training goes on while a file is saved and fsynced.

    ``submit`` first waits for the previous write (one in flight at most, files written in order) and takes a
    detached copy of the state, then returns. Each file is still written atomically and durably by
    ``save_checkpoint``; a failed write is raised by the next ``submit`` or by ``wait``.
    """

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, state: dict, path: Path, best: Path | None = None) -> None:
        """Save ``state`` to ``path``; then, if ``best`` is given, publish the same file there."""
        self.wait()
        state = detached_copy(state)

        def write() -> None:
            try:
                save_checkpoint(state, path)
                if best is not None:
                    publish_copy(path, best)
            except BaseException as error:  # handed to the training thread by wait()
                self._error = error
        self._thread = threading.Thread(target=write, name="checkpoint-writer")
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
