"""Run main.py as one DDP rank with a failure that only this rank sees, chosen by FAULT_PROBE (loss | disk) and
FAULT_PROBE_RANK:

    FAULT_PROBE=loss FAULT_PROBE_RANK=1 RANK=1 WORLD_SIZE=2 ... python tests/fault_probe.py <main.py flags>

- loss: that rank's training loss is infinite from its third step on (its own batch overflowed);
- disk: that rank's disk is full: torch.save fails with ENOSPC, as it does when the checkpoint folder fills up.
main.py is not changed: the functions it calls are wrapped on their modules. An unreadable image needs no probe:
the test damages one file of the tree.
"""
from __future__ import annotations

import errno
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import main  # noqa: E402

FAULT, ON_THIS_RANK = os.environ["FAULT_PROBE"], os.environ["RANK"] == os.environ["FAULT_PROBE_RANK"]
real_loss, calls = main.segmentation_loss, []


def infinite_from_the_third_step(logits, target, class_weights=None):
    calls.append(1)
    loss = real_loss(logits, target, class_weights)
    return loss * math.inf if len(calls) >= 3 else loss


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


if ON_THIS_RANK:
    if FAULT == "loss":
        main.segmentation_loss = infinite_from_the_third_step
    elif FAULT == "disk":
        torch.save = disk_full

if __name__ == "__main__":
    main.main()
