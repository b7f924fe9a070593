"""One training run, from its run folder to its last epoch: data, model, optimiser, the epochs of training and
validation, checkpoints and history. main.py turns the command line into a run and calls ``run_epochs``."""
from __future__ import annotations

import argparse
import gc
import math
import os
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

import distributed
from checkpoint import load_checkpoint, load_model_weights, save_checkpoint
from checkpoint_writer import CheckpointWriter
from determinism import cudnn_autotuning
from engine import EpochProgress, NonFiniteLoss, evaluate, train_one_epoch
from errors import UserError
from labels import get_label_set
from metrics import evaluation_report
from model import build_model, count_parameters
from optimization import make_optimization
from run_data import StartedEpoch, make_loaders
from run_history import HistoryWriter, epoch_line, epoch_record
from stop_signal import StopRequest


def worker_count(value: str, world_size: int) -> int:
    """'auto' -> one fewer than this process's share of the CPU cores (the rest run the training step), 1..8."""
    if value != "auto":
        return int(value)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(8, cores // world_size - 1))


def prepare_run_dir(args: argparse.Namespace) -> Path:
    out = args.out or Path("runs") / f"{args.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"run folder {out} already exists and is not empty; pass a new --out, "
                        f"or --resume {out / 'last.pt'} to continue it")
    out.mkdir(parents=True, exist_ok=True)
    return out


def initialise_from(model: torch.nn.Module, args: argparse.Namespace, num_classes: int) -> str:
    """Load --init-from's weights: all of them from the same architecture (fine-tuning), or the shared ones from
    a coarser FCN (staged training: the new skip layers start at zero). Returns a line for the log."""
    state = load_checkpoint(args.init_from)
    if state["num_classes"] != num_classes:
        raise UserError(f"{args.init_from}: has {state['num_classes']} classes, this run {args.label_set!r} needs "
                        f"{num_classes}; pass a matching --label-set")
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if unexpected:
        raise UserError(f"{args.init_from}: a {state['arch']} cannot initialise a coarser {args.arch}")
    if missing:
        new_layers = sorted({key.split(".")[0] for key in missing})
        return f"initialised from {args.init_from} ({state['arch']}); new layers: {new_layers}"
    return f"initialised from {args.init_from}: all weights of its {state['arch']} (fine-tuning)"


def make_model(args: argparse.Namespace, ctx: distributed.Context) -> torch.nn.Module:
    num_classes = get_label_set(args.label_set).num_classes
    fresh = not args.resume
    model = build_model(args.arch, num_classes, args.pretrained and fresh and not args.init_from, args.backbone_weights
                        if fresh and not args.init_from else None)
    if args.init_from and fresh:  # a resumed run's checkpoint already holds these weights
        message = initialise_from(model, args, num_classes)
        if ctx.is_main:
            print(message)
    model.to(ctx.device, memory_format=torch.channels_last)
    if args.sync_bn and ctx.world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def config_of(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "explicit"}


def amp_dtype_for(device: torch.device, amp: bool) -> torch.dtype | None:
    """bf16 autocast on CUDA where supported, fp16 (with loss scaling) on older GPUs, none on the CPU."""
    if device.type != "cuda" or not amp:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def restore(state: dict, path: Path, model, optimizer, scheduler, scaler) -> tuple[list, float, int, EpochProgress]:
    """Load a checkpoint's training state; returns (history, best mIoU, epochs done, progress in the next epoch)."""
    load_model_weights(model, state, path)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as error:
        raise UserError(f"{path}: its optimizer state does not fit this version's parameter groups ({error}); "
                        f"start a new run from its weights with --init-from {path}") from None
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"] and scaler.is_enabled():  # empty when the run had no fp16 loss scaling (CPU, bf16)
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    return state["history"], state["best_miou"], state["epoch"], EpochProgress(**state["progress"])


def shared_run_dir(args: argparse.Namespace, ctx: distributed.Context, resuming: bool) -> Path:
    """The run folder, made by rank 0 and passed to every rank (an error on rank 0 stops them all)."""
    if resuming:
        return args.resume.parent
    outcome = None
    if ctx.is_main:
        try:
            outcome = prepare_run_dir(args)
        except UserError as error:
            outcome = error
    outcome = distributed.broadcast_object(outcome)
    if isinstance(outcome, UserError):
        raise outcome
    return outcome


class TrainingRun:
    """Everything one run holds between epochs, and the steps of an epoch: train, validate, record, save."""

    def __init__(self, args: argparse.Namespace, ctx: distributed.Context, state: dict | None):
        self.args, self.ctx = args, ctx
        self.run_dir = shared_run_dir(args, ctx, resuming=state is not None)
        self.amp_dtype = amp_dtype_for(ctx.device, args.amp)
        torch.backends.cudnn.benchmark = cudnn_autotuning(ctx.device)
        self.data = make_loaders(args, ctx, self.run_dir, worker_count(args.workers, ctx.world_size), state)
        self.model = make_model(args, ctx)
        self.optimizer, self.scheduler = make_optimization(self.model, args, len(self.data.train_loader))
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.amp_dtype == torch.float16)
        self.history, self.best_miou, self.start_epoch, self.progress = [], -1.0, 0, EpochProgress()
        self.next_batches = None  # the next epoch's batches, started during validation
        if state is not None:
            self.history, self.best_miou, self.start_epoch, self.progress = restore(
                state, args.resume, self.model, self.optimizer, self.scheduler, self.scaler)
        self.net = self.model
        if ctx.world_size > 1:
            self.net = DistributedDataParallel(self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda"
                                               else None)
        if args.compile:  # after DDP's wrapper, as PyTorch recommends; checkpoints keep self.model's plain names
            self.net = torch.compile(self.net)
        self.label_set = get_label_set(args.label_set)
        self.class_weights = None if self.data.class_weights is None else self.data.class_weights.to(ctx.device)
        self.history_writer, self.checkpoints = HistoryWriter(self.run_dir), CheckpointWriter()

    def describe(self) -> str:
        total, trainable = count_parameters(self.model)
        processes = f" x {self.ctx.world_size}" if self.ctx.world_size > 1 else ""
        return (f"{self.args.arch}: {total / 1e6:.2f} M parameters ({trainable / 1e6:.2f} M trainable), "
                f"{self.label_set.num_classes} classes, {self.data.summary}, device {self.ctx.device}{processes}, "
                f"run folder {self.run_dir}")

    def snapshot(self, epoch: int) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": epoch,
                "progress": vars(self.progress), "best_miou": self.best_miou, "arch": self.args.arch,
                "num_classes": self.label_set.num_classes, "label_set": self.args.label_set,
                "world_size": self.ctx.world_size, "class_weights": self.data.class_weights,
                "config": config_of(self.args), "history": self.history, "rng_cpu": torch.get_rng_state()}

    def train_and_validate(self, epoch: int, stop: StopRequest) -> tuple | None:
        """One epoch's training (from where ``progress`` stands) and validation; None if asked to stop. The next
        epoch's batches are started before validating, so the loader prepares them meanwhile."""
        batches, self.next_batches = self.next_batches, None
        if batches is None:
            batches = StartedEpoch(self.data.train_loader, self.data.sampler, epoch,
                                   skip=self.progress.step * self.args.batch_size)
        try:
            finished = train_one_epoch(self.net, batches, self.optimizer, self.scheduler, self.scaler,
                                       self.ctx.device, self.amp_dtype, self.progress,
                                       f"epoch {epoch + 1}/{self.args.epochs}", self.args.log_every, self.ctx.is_main,
                                       stop, self.class_weights)
        except NonFiniteLoss as error:
            raise UserError(f"{error} in epoch {epoch + 1}; {self.run_dir / 'last.pt'} keeps the last good epoch; "
                            "lower --lr, or try --no-amp") from None
        if not finished:
            return None
        if epoch + 1 < self.args.epochs:
            self.next_batches = StartedEpoch(self.data.train_loader, self.data.sampler, epoch + 1, skip=0)
        distributed.broadcast_buffers(self.model)
        start = time.perf_counter()
        confusion, loss = evaluate(self.model, self.data.val_loader, self.label_set.num_classes, self.ctx.device,
                                   self.amp_dtype, show=self.ctx.is_main)
        return confusion, loss, time.perf_counter() - start

    def record(self, epoch: int, trained: EpochProgress, confusion, val_loss: float, val_seconds: float) -> None:
        """Rank 0: the epoch's row of metrics.csv (from ``trained``, the finished epoch's progress), last.pt (and
        best.pt) on the background writer, a log line."""
        report = evaluation_report(confusion.matrix, self.label_set)
        if math.isnan(report["benchmark_mIoU"]):
            raise UserError(f"{self.args.data_root}: the validation images hold no pixel of the 19 benchmark classes "
                            "(every label is ignored or void), so no model can be scored; check the val labels")
        self.history.append(epoch_record(epoch + 1, self.optimizer.param_groups[0]["lr"], trained, val_loss,
                                         report, val_seconds, self.ctx.device))
        is_best = report["benchmark_mIoU"] > self.best_miou
        self.best_miou = max(self.best_miou, report["benchmark_mIoU"])
        self.checkpoints.submit(self.snapshot(epoch + 1), self.run_dir / "last.pt",
                                self.run_dir / "best.pt" if is_best else None)
        self.history_writer.write(self.history, final=epoch + 1 == self.args.epochs)
        print(epoch_line(self.history[-1], self.args.epochs, is_best), flush=True)

    def save_and_exit(self, epoch: int, where: str, mid_epoch: bool) -> None:
        """Exit with status 130 once last.pt holds the state: written now if the stop came inside an epoch;
        after one, ``record`` has already handed that epoch's state to the background writer."""
        if self.ctx.is_main:
            self.checkpoints.wait()
            if mid_epoch:
                save_checkpoint(self.snapshot(epoch), self.run_dir / "last.pt")
            self.history_writer.write(self.history, final=True)
            print(f"\ninterrupted: saved {self.run_dir / 'last.pt'} {where}; continue with: python main.py --resume "
                  f"{self.run_dir / 'last.pt'}", flush=True)
        self.close()
        raise SystemExit(130)

    def close(self) -> None:
        """Leave the process group, after freeing DDP's wrapper. Freed after the group, the wrapper's reducer is
        the group's last owner and destroys it holding the GIL, while gloo's worker thread may need the GIL to
        free a finished all-reduce: under torch 2.11, torchrun runs on 2 CPU cores hung there at exit. With
        --compile, dynamo holds the wrapper in a reference cycle, hence the collection."""
        self.net = self.model
        gc.collect()
        distributed.cleanup()

    def run_epochs(self) -> None:
        """The epochs left. Ctrl-C / SIGTERM stop at the next step (or after validation) with a checkpoint."""
        with StopRequest(self.ctx.device, self.ctx.world_size) as stop:
            for epoch in range(self.start_epoch, self.args.epochs):
                try:
                    result = self.train_and_validate(epoch, stop)
                except KeyboardInterrupt:
                    raise UserError(f"aborted by a second interrupt; {self.run_dir / 'last.pt'} holds the last "
                                    "saved state") from None
                if result is None:
                    self.save_and_exit(epoch, f"at epoch {epoch + 1} step {self.progress.step}", mid_epoch=True)
                trained, self.progress = self.progress, EpochProgress()
                if self.ctx.is_main:
                    self.record(epoch, trained, *result)
                if stop.agreed() and epoch + 1 < self.args.epochs:
                    self.save_and_exit(epoch + 1, f"after epoch {epoch + 1}", mid_epoch=False)
