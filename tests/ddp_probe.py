"""Run main.py under torchrun and record, per rank, what the training sampler yielded and the final weights.

    DDP_PROBE_OUT=DIR python -m torch.distributed.run --nproc_per_node=2 tests/ddp_probe.py <main.py flags>

Writes DIR/rank<R>.json ({"epochs": {epoch: [[index, augmentation_seed], ...]}}) and DIR/rank<R>.pt (the
wrapped module's state_dict). main.py is not changed: the sampler's ``__iter__`` is wrapped on the class (run_data
imported the class, so patching the name would not reach it) and ``training_run.DistributedDataParallel`` is
replaced by a subclass that remembers the module it wraps.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import main  # noqa: E402
import samplers  # noqa: E402
import training_run  # noqa: E402

yielded: dict[int, list[list[int]]] = {}
wrapped: list[torch.nn.Module] = []
original_iter = samplers.SeededTrainSampler.__iter__


def recording_iter(self):
    record = yielded.setdefault(self.epoch, [])
    for index, seed in original_iter(self):
        record.append([index, seed])
        yield index, seed


class RecordingDDP(training_run.DistributedDataParallel):
    def __init__(self, module, *args, **kwargs):
        super().__init__(module, *args, **kwargs)
        wrapped.append(module)


def run(argv: list[str]) -> None:
    samplers.SeededTrainSampler.__iter__ = recording_iter
    training_run.DistributedDataParallel = RecordingDDP
    main.main(argv)
    out, rank = Path(os.environ["DDP_PROBE_OUT"]), int(os.environ["RANK"])
    if len(wrapped) != 1:
        raise SystemExit(f"rank {rank}: main wrapped {len(wrapped)} models in DDP, expected 1")
    (out / f"rank{rank}.json").write_text(json.dumps({"epochs": yielded}))
    torch.save(wrapped[0].state_dict(), out / f"rank{rank}.pt")


if __name__ == "__main__":
    run(sys.argv[1:])
