"""Run main.py under torchrun and record, per rank, what the training sampler yielded, the final weights, and
whether DDP's wrapper was still alive when the process group was left.

    DDP_PROBE_OUT=DIR python -m torch.distributed.run --nproc_per_node=2 tests/ddp_probe.py <main.py flags>

Writes DIR/rank<R>.json ({"epochs": {epoch: [[index, augmentation_seed], ...]}, "wrapper_alive_at_cleanup": bool})
and DIR/rank<R>.pt (the wrapped module's state_dict). main.py is not changed: the sampler's ``__iter__`` is wrapped
on the class, ``main.DistributedDataParallel`` is replaced by a subclass that remembers what it wraps, and
``runtime.cleanup`` by one that first looks whether the wrapper still exists.
"""
from __future__ import annotations

import json
import os
import sys
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import main  # noqa: E402
from segmentation import runtime  # noqa: E402
from segmentation.loading import SeededTrainSampler  # noqa: E402

yielded: dict[int, list[list[int]]] = {}
wrapped: list[torch.nn.Module] = []
wrappers: list[weakref.ref] = []
alive_at_cleanup: list[bool] = []
original_iter, original_cleanup = SeededTrainSampler.__iter__, runtime.cleanup


def recording_iter(self):
    record = yielded.setdefault(self.epoch, [])
    for index, seed, zoom in original_iter(self):
        record.append([index, seed])
        yield index, seed, zoom


class RecordingDDP(main.DistributedDataParallel):
    def __init__(self, module, *args, **kwargs):
        super().__init__(module, *args, **kwargs)
        wrapped.append(module)
        wrappers.append(weakref.ref(self))


def recording_cleanup() -> None:
    alive_at_cleanup.append(any(wrapper() is not None for wrapper in wrappers))
    original_cleanup()


def run(argv: list[str]) -> None:
    SeededTrainSampler.__iter__ = recording_iter
    main.DistributedDataParallel = RecordingDDP
    runtime.cleanup = recording_cleanup
    main.main(argv)
    out, rank = Path(os.environ["DDP_PROBE_OUT"]), int(os.environ["RANK"])
    if len(wrapped) != 1:
        raise SystemExit(f"rank {rank}: main wrapped {len(wrapped)} models in DDP, expected 1")
    (out / f"rank{rank}.json").write_text(json.dumps({"epochs": yielded,
                                                      "wrapper_alive_at_cleanup": alive_at_cleanup[0]}))
    torch.save(wrapped[0].state_dict(), out / f"rank{rank}.pt")


if __name__ == "__main__":
    run(sys.argv[1:])
