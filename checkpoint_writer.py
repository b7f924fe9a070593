"""Checkpoints saved on a background thread, so training goes on while a file is written and fsynced.

The state is copied (tensors to the CPU) before ``submit`` returns, so the next steps cannot change what is
saved; each file is still written by ``checkpoint.save_checkpoint``, atomically and durably.
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch

from checkpoint import publish_copy, save_checkpoint


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
