"""The machinery that main.py, test.py, export.py and bench.py share, one module per concern:

    layouts       where each dataset's files are on disk, its fixed splits, folders of images
    augmentation  the joint image/label training augmentation, each dataset's crop and scale
    loading       what a training run reads: its split, samplers, loaders and class weights
    engine        loss, optimiser and schedule; one training epoch, one evaluation pass, prediction
    metrics       confusion matrix -> IoU, following the official Cityscapes/KITTI evaluation
    checkpoint    atomic (background) saving, safe loading, models and weights from checkpoints
    records       what a run leaves in its folder besides checkpoints: metrics.csv, curves, confusion
    runtime       where a run executes: device, DDP processes, loader workers, Ctrl-C / SIGTERM
    settings      main.py's settings: what each accepts, and what --resume lets change
    synthetic     procedurally drawn street scenes in KITTI's or Cityscapes' layout

Data flows one way, disk -> data -> model -> loss/metrics -> checkpoint/report. The package builds on the three
files at the root that a user edits for their own data and network (labels.py, data_preprocessing.py with the
dataset, model.py) and never imports a command a user runs (main.py, test.py, export.py, bench.py), whose
``main`` would otherwise run on import (tests/test_structure.py checks it).
"""

import errno
import shlex
from pathlib import Path

_WORKER_MARKER = f"{__name__}.UserError: "
MAX_SIDE = 8192  # pixels: any command's crop, base or image size beyond it is a slip (an extra digit) that would
#                  exhaust any memory
OS_ERROR_FIXES = {
    errno.ENOSPC: "free space on that disk",
    errno.EDQUOT: "free space within your disk quota",
    errno.EACCES: "choose a folder you may write (or fix its permissions)",
    errno.EPERM: "choose a folder you may write (or fix its permissions)",
    errno.EROFS: "choose a folder on a writable file system",
    errno.ENOENT: "the folder is gone (moved or deleted?): restore it, or choose another",
}


def require(valid: bool, flag: str, value: object, allowed: str) -> None:
    """Refuse a command-line value outside its range, before anything is allocated or written: one line naming
    the flag, the value given and what is allowed."""
    if not valid:
        shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        raise UserError(f"{flag} {shown} is not valid: use {allowed}")


def quoted(path: Path) -> str:
    """``path`` as a shell word, so that a printed command can be pasted even when the path holds spaces."""
    return shlex.quote(str(path))


def os_error_line(error: OSError) -> str:
    """One line for a failed file operation: the path, the system's reason, and what to do."""
    where = error.filename or "a file"
    return f"{where}: {error.strerror or error}; {OS_ERROR_FIXES.get(error.errno, 'check the path and the disk')}"


class UserError(Exception):
    """Bad input or set-up that the user can fix; the message names the file and the fix. Every command turns it
    into one line ``error: ...`` and a non-zero exit.

    A DataLoader worker's exception reaches the main process re-raised as the same type, but with the
    worker's whole traceback as its message; only the original message after the marker is kept, so an
    error in a worker still reaches the user as one line.
    """

    def __init__(self, message: str):
        if _WORKER_MARKER in message:
            message = message.rsplit(_WORKER_MARKER, 1)[1].strip()
        super().__init__(message)


def error_line(error: UserError | OSError) -> str:
    """The line a command exits with for bad input (a UserError) or a failed file operation (an OSError)."""
    return f"error: {os_error_line(error) if isinstance(error, OSError) else error}"
