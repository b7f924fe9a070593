"""The timing harness of bench.py: cases (a network in one mode, input shape and precision), steps timed interleaved
so that a slow spell of the machine hits every case of a group alike, and ratios of paired rounds with their
spread."""
from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def peak_memory_mb(device: torch.device, baseline: int = 0) -> float:
    """CUDA: the peak allocated since the last reset, less ``baseline`` bytes (memory held by other cases).
    CPU: the whole process's peak resident size so far (Linux reports KiB)."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Case:
    """One network in train or inference mode, on one input shape, under one precision."""

    def __init__(self, net, batch: int, size: tuple[int, int], device, amp: bool, train: bool, trunk_only=False):
        self.device, self.amp, self.train, self.trunk_only = device, amp, train, trunk_only
        fmt = torch.channels_last if amp or device.type == "cpu" else torch.contiguous_format  # as main.py runs
        self.net = net.to(device, memory_format=fmt).train(train)
        self.x = torch.randn(batch, 3, *size, device=device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, 19, (batch, *size), device=device)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=1e-4, momentum=0.9) if train else None

    def __call__(self):
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp), torch.set_grad_enabled(self.train):
            out = self.net(self.x)  # the trunk: its three feature maps; torchvision's FCN: a dict
            out = out[-1] if self.trunk_only else (out["out"] if isinstance(out, dict) else out)
            if not self.train:
                return
            loss = out.float().mean() if self.trunk_only else F.cross_entropy(out.float(), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not self.trunk_only:
            self.optimizer.step()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(step: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_seconds(steps: dict[str, Callable[[], None]], device: torch.device,
                        rounds: int) -> dict[str, list[float]]:
    """Per case, ``rounds`` timings taken one step of each case per round, the order reversed every round."""
    order, times = list(steps), {name: [] for name in steps}
    for i in range(rounds):
        for name in order if i % 2 == 0 else reversed(order):
            times[name].append(seconds(steps[name], device))
    return times


def paired_ratio(numerator: list[float], denominator: list[float]) -> tuple[float, float]:
    """Median of the per-round ratios numerator/denominator, and half their interquartile range."""
    ratios = [a / b for a, b in zip(numerator, denominator)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), (q3 - q1) / 2


def build_cases(specs: list[tuple], device: torch.device, warmup: int) -> tuple[dict[str, Case], list[dict]]:
    """Build each case of ``specs`` and warm it up alone, which is also when its peak memory is measured.

    A spec is (name, mode, net factory, batch, size, bf16, trunk_only); keys are "name mode batchxHxW [bf16]".
    """
    cases, rows = {}, []
    for name, mode, make_net, batch, size, amp, trunk_only in specs:
        key = f"{name} {mode} {batch}x{size[0]}x{size[1]}{' bf16' if amp else ''}"
        log(key)
        baseline = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            baseline = torch.cuda.memory_allocated(device)
        cases[key] = Case(make_net(), batch, size, device, amp, mode == "train", trunk_only)
        for _ in range(warmup):
            cases[key]()
        rows.append({"key": key, "name": name, "mode": mode, "batch": batch, "size": list(size), "bf16": amp,
                     "peak_mb": peak_memory_mb(device, baseline)})
    return cases, rows


def time_group(specs: list[tuple], device: torch.device, warmup: int,
               rounds: int) -> tuple[list[dict], dict[str, list[float]]]:
    """Warm up every case of ``specs``, then time them interleaved; rows for the table and the raw times."""
    cases, rows = build_cases(specs, device, warmup)
    log(f"timing {len(cases)} cases interleaved, {rounds} rounds")
    times = interleaved_seconds(cases, device, rounds)
    for row in rows:
        ms = 1000 * statistics.median(times[row["key"]])
        row.update(ms=ms, img_per_s=1000 * row["batch"] / ms)
    return rows, times


def warmed_interleaved_seconds(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int,
                               rounds: int) -> dict[str, list[float]]:
    """``warmup`` untimed calls of every step, then ``interleaved_seconds``."""
    for step in list(steps.values()) * warmup:
        step()
    return interleaved_seconds(steps, device, rounds)
