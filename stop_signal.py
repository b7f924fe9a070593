"""Ctrl-C and SIGTERM as a request to stop at the next step boundary, so an interrupted run resumes exactly.

Raising ``KeyboardInterrupt`` wherever the main process happens to be can land inside an optimizer step,
between the update of one tensor and the next: the saved state would then match no step at all. Instead the
first signal only sets a flag that the training loop reads between steps; a second signal aborts at once.
Under DDP the ranks agree on the flag (an all-reduce at log boundaries), so they all stop at the same step.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and cluster schedulers' pre-emption


class StopRequest:
    """Context manager that installs the handlers and restores the previous ones on exit."""

    def __init__(self, device: torch.device, world_size: int = 1):
        self.device, self.world_size = device, world_size
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt  # the second signal: abort now, without saving
        self.requested = True

    def __enter__(self) -> StopRequest:
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def agreed(self, at_boundary: bool = True) -> bool:
        """Whether to stop now. One process: the flag, checked every step. DDP: only at a boundary that every
        rank reaches at the same step, where any rank's request stops them all."""
        if self.world_size == 1:
            return self.requested
        if not at_boundary:
            return False
        flag = torch.tensor(float(self.requested), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
