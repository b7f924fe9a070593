"""Where a run executes: the device, the DDP process group that ``torchrun`` describes (a plain ``python main.py``
runs as world size 1), the loader worker count, mixed precision, and Ctrl-C / SIGTERM as a request to stop.

Stopping. Raising ``KeyboardInterrupt`` wherever the main process happens to be can land inside an optimizer
step, between the update of one tensor and the next: the saved state would then match no step at all. Instead
the first signal only sets a flag that the training loop reads between steps; a later one aborts at once.
Under DDP the ranks agree on the flag (``StopRequest.agreed``), so they all stop at the same step.

Launchers send a stop to a whole process group (a terminal's Ctrl-C, ``timeout``, SLURM, systemd) and torchrun
passes its own on to each rank, so a process may get the same request twice in a moment, and its DataLoader
workers get it too. Workers ignore it (``StopSafeLoader``): the main process owns the stop and ends them itself.
A repeat within ``REPEAT_WINDOW_S`` counts as the same request; only a later one aborts.
"""
from __future__ import annotations

import atexit
import gc
import multiprocessing
import os
import signal
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from segmentation import UserError

SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and cluster schedulers' pre-emption
REPEAT_WINDOW_S = 2.0  # a second signal this soon after the first is a launcher passing the same request on
T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str) -> torch.device:
    """'auto' -> the first CUDA GPU if there is one, else the CPU; a device this machine lacks is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} usable CUDA GPU(s); "
                        "use --device cpu (or auto)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name} is not supported here; use auto, cpu, cuda or cuda:N")
    return device


def setup(device_name: str) -> Context:
    """Join the process group that torchrun describes in the environment (NCCL on GPUs, gloo on CPUs)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world_size == 1:
        return Context(0, 1, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(dist.get_rank(), world_size, device)


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics). DDP copies them at the start of each
    training forward, so after the last step each rank holds its own; validation and the checkpoint must
    all use rank 0's model."""
    if dist.is_available() and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def on_main_rank(ctx: Context, make: Callable[[], T], share: bool = True) -> T | None:
    """``make()`` run by rank 0 alone; its UserError is raised on every rank. Its result is given to every rank
    (``share``), or kept by rank 0 (the others get None)."""
    outcome = None
    if ctx.is_main:
        try:
            outcome = make()
        except UserError as error:
            outcome = error
    shared = [outcome if share or isinstance(outcome, UserError) else None]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(shared, src=0)  # now rank 0's on every rank
    if isinstance(shared[0], UserError):
        raise shared[0]
    return outcome if ctx.is_main else shared[0]


def cleanup(after_failure: bool = False) -> None:
    """Leave the process group. Free DDP's wrapper first: freed after the group, its reducer is the group's last
    owner and destroys it holding the GIL, while gloo's worker thread may need the GIL to free a finished
    all-reduce; torchrun runs on 2 CPU cores hung there at exit (torch 2.11). ``after_failure``: the failed run's
    frames (DDP's wrapper among them) are first collected; left to the interpreter's exit, the group was torn down
    in no fixed order and one rank in ten aborted ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        if after_failure:
            gc.collect()
        dist.destroy_process_group()


def worker_count(value: str | int, world_size: int) -> int:
    """'auto' -> one fewer than this process's share of the CPU cores (the rest run the training step), 1..8."""
    if value != "auto":
        return int(value)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(8, cores // world_size - 1))


def amp_dtype_for(device: torch.device, amp: bool) -> torch.dtype | None:
    """bf16 autocast on CUDA where supported, fp16 (with loss scaling) on older GPUs, none on the CPU."""
    if device.type != "cuda" or not amp:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@contextmanager
def interrupts_end_in_one_line(what_is_kept: str):
    """Within it SIGTERM interrupts as Ctrl-C does; either ends the command with one line on stderr saying
    ``what_is_kept``, and status 130 (128 + SIGINT, what shells report for Ctrl-C), never a traceback."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # raises KeyboardInterrupt
    try:
        yield
    except KeyboardInterrupt:
        print(f"interrupted; {what_is_kept}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def ignore_stop_signals(worker_id: int) -> None:
    """A loader worker's ``worker_init_fn``: ignore SIGINT and SIGTERM, which reach workers with their parent's
    process group. Forked with both blocked (``StopSafeLoader``), the worker discards one that came in between
    (POSIX drops a pending signal whose action becomes SIG_IGN) before it unblocks them."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


class StopSafeLoader(DataLoader):
    """A DataLoader whose workers leave Ctrl-C and SIGTERM to the main process (``ignore_stop_signals``, and
    ``__iter__`` below): a worker killed by a group signal would otherwise end the training process with
    "DataLoader worker ... killed by signal" before it could save.

    A worker that ignores SIGTERM would outlive the two places that end a worker by force, both of which send
    SIGTERM and then join it, forever: the loader's shutdown when a worker does not finish in time (so this
    loader's workers ``terminate`` with SIGKILL), and multiprocessing's exit handler (so the workers still alive
    at exit are ended first, by ``_end_workers``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, worker_init_fn=ignore_stop_signals, **kwargs)

    def __iter__(self):
        """Workers start with the stop signals blocked in this thread (a fork copies its mask) and deferred in every
        thread: the kernel hands a group signal to any thread that has it unblocked (OpenMP's, the checkpoint
        writer), and Python would then raise in the main thread between the workers' start and their registration.
        A deferred signal is raised again once every worker is registered."""
        held, deferred = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS), []
        main = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
        previous = {s: signal.signal(s, lambda signum, frame: deferred.append(signum)) for s in SIGNALS} if main else {}
        try:
            before = set(multiprocessing.active_children())
            iterator = super().__iter__()
            for worker in set(multiprocessing.active_children()) - before:  # the workers this iterator started
                worker.terminate = worker.kill
                _WORKERS.add(worker)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        for signum in deferred[:1]:
            signal.raise_signal(signum)
        return iterator


_WORKERS: weakref.WeakSet = weakref.WeakSet()  # the worker processes StopSafeLoaders started


@atexit.register  # registered after multiprocessing's exit handler (torch imports it first), so it runs before it
def _end_workers() -> None:
    """Kill the workers still alive at exit: multiprocessing's handler would SIGTERM them (bypassing ``terminate``)
    and wait forever. The loaders' own shutdown has run by then for every iterator that was freed."""
    for worker in list(_WORKERS):
        if worker.is_alive():
            worker.kill()
            worker.join()


def on_any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any DDP rank (on this process alone without DDP). Every rank must call it at the
    same point: a failure one rank sees then stops them all, instead of leaving the others in a collective."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def agreed_failure(failure: UserError | None, device: torch.device) -> UserError | None:
    """The first rank's failure, on every rank (None if no rank failed); all ranks call it at the same point. A
    failure only one rank sees (an unreadable image in its shard, its disk) then ends every rank with the same line
    instead of leaving the others waiting in a collective until the process group times out."""
    if not (dist.is_available() and dist.is_initialized()):
        return failure
    if not on_any_rank(failure is not None, device):
        return None
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, None if failure is None else str(failure))
    return UserError(next(message for message in everyone if message))


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """How a model is run, for logs and reports: float32, or autocast's reduced type."""
    return "float32" if amp_dtype is None else f"{str(amp_dtype).removeprefix('torch.')} autocast"


class StopRequest:
    """Context manager that installs the handlers and restores the previous ones on exit.

    Under DDP the ranks agree on a stop at every training step, over a gloo group of their own on the CPU (no GPU
    synchronisation): torchrun kills its ranks a fixed time after it forwards a signal (its --shutdown-timeout, 30 s
    by default), so the agreement must not wait for a log boundary. Validation ends early on a rank whose flag is set
    (``evaluate``'s ``until``), and the ranks then agree that the epoch goes unscored."""

    def __init__(self, device: torch.device, world_size: int = 1):
        self.device, self.world_size = device, world_size
        self.requested, self._first = False, 0.0
        self._previous: dict = {}
        self._group = None

    def _handle(self, signum, frame) -> None:
        if self.requested and time.monotonic() - self._first > REPEAT_WINDOW_S:
            raise KeyboardInterrupt  # a second request: abort now, without saving
        if not self.requested:
            self.requested, self._first = True, time.monotonic()

    def __enter__(self) -> StopRequest:
        if self.world_size > 1:  # every rank enters at the same point, as new_group requires
            self._group = dist.new_group(backend="gloo")
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def agreed(self) -> bool:
        """Whether to stop now: this process's flag, or under DDP any rank's (every rank calls it at each step)."""
        if self.world_size == 1:
            return self.requested
        flag = torch.tensor(float(self.requested))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())
