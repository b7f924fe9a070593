"""Run main.py as one DDP rank with a failure that only this rank sees, chosen by FAULT_PROBE (loss | weights |
miou) and FAULT_PROBE_RANK:

    FAULT_PROBE=loss FAULT_PROBE_RANK=1 RANK=1 WORLD_SIZE=2 ... python tests/fault_probe.py <main.py flags>

- loss: that rank's training loss is infinite from its third step on;
- weights: that rank finds a non-finite tensor in the model after epoch 1;
- miou: that rank's validation report has no scored pixel (NaN mIoU).
main.py is not changed: the functions it calls are wrapped on the module.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import main  # noqa: E402

FAULT, ON_THIS_RANK = os.environ["FAULT_PROBE"], os.environ["RANK"] == os.environ["FAULT_PROBE_RANK"]
real_loss, real_report, calls = main.segmentation_loss, main.evaluation_report, []


def infinite_from_the_third_step(logits, target, class_weights=None):
    calls.append(1)
    loss = real_loss(logits, target, class_weights)
    return loss * math.inf if len(calls) >= 3 else loss


def report_without_scored_pixels(confusion, label_set):
    report = real_report(confusion, label_set)
    report["benchmark_mIoU"] = math.nan
    return report


if ON_THIS_RANK:
    if FAULT == "loss":
        main.segmentation_loss = infinite_from_the_third_step
    elif FAULT == "weights":
        main.non_finite = lambda model: "trunk.stem.0.weight"
    elif FAULT == "miou":
        main.evaluation_report = report_without_scored_pixels

if __name__ == "__main__":
    main.main()
