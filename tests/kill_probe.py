"""Run main.py and SIGKILL it at a chosen point, as a power cut or the OOM killer would:

    KILL_AT_STEP=5 python tests/kill_probe.py <main.py flags>          # right after the 5th optimiser step
    KILL_AFTER_SAVE=2 python tests/kill_probe.py <main.py flags>       # right after last.pt of epoch 2 is written

main.py is not changed: the functions it calls are wrapped on their modules.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import main  # noqa: E402
from segmentation import checkpoint  # noqa: E402

real_step, real_save, steps = torch.optim.SGD.step, checkpoint.save_checkpoint, []


def step_then_die(self, *args, **kwargs):
    result = real_step(self, *args, **kwargs)
    steps.append(1)
    if len(steps) == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return result


def save_then_die(state: dict, path: Path) -> None:
    real_save(state, path)
    if path.name == "last.pt" and state["epoch"] == int(os.environ["KILL_AFTER_SAVE"]):
        os.kill(os.getpid(), signal.SIGKILL)


if "KILL_AT_STEP" in os.environ:
    torch.optim.SGD.step = step_then_die
if "KILL_AFTER_SAVE" in os.environ:
    checkpoint.save_checkpoint = save_then_die

if __name__ == "__main__":
    main.main()
