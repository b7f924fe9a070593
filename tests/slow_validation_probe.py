"""Run main.py with a validation that takes SLOW_VALIDATION_S seconds an image (a large val set on a slow disk), and
print "validating" when it starts, so that a test can signal while it runs:

    SLOW_VALIDATION_S=2 torchrun --nproc_per_node=2 tests/slow_validation_probe.py <main.py flags>

main.py is not changed: engine.predict is wrapped on its module.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import main  # noqa: E402
from segmentation import engine  # noqa: E402

real_predict = engine.predict


def slow_predict(*args, **kwargs):
    print("validating", flush=True)
    time.sleep(float(os.environ["SLOW_VALIDATION_S"]))
    return real_predict(*args, **kwargs)


engine.predict = slow_predict

if __name__ == "__main__":
    main.main()
