"""How the network learns and is scored: the loss, the optimiser and its schedule, one training epoch, one
evaluation pass, and prediction (with optional test-time augmentation). main.py wires them into the recipe;
test.py and bench.py use the same evaluation and prediction."""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from data_preprocessing import normalize
from labels import IGNORE_INDEX
from segmentation import UserError
from segmentation.augmentation import zoomed
from segmentation.metrics import ConfusionMatrix
from segmentation.runtime import StopRequest, agreed_failure, on_any_rank

BAND_ROWS = 32  # rows of an image scored at a time on the CPU (score_batch)


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class EpochProgress:
    """How far an epoch got. Lives outside the loop so that Ctrl-C can checkpoint mid-epoch."""

    step: int = 0
    loss_sum: float = 0.0
    data_wait: float = 0.0
    seconds: float = 0.0


class ProgressLine:
    """A tqdm bar on a terminal; plain log lines (one every ``update`` with a postfix) when piped to a file."""

    def __init__(self, total: int, desc: str, enabled: bool = True, initial: int = 0):
        tty = sys.stderr.isatty()
        self.desc, self.total, self.done = desc, total, initial
        self.plain = enabled and not tty
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not (enabled and tty), leave=False,
                        dynamic_ncols=True)

    def update(self, n: int = 1, postfix: dict | None = None) -> None:
        self.done += n
        self.bar.update(n)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
            if self.plain:
                items = " ".join(f"{k} {v}" for k, v in postfix.items())
                print(f"{self.desc} {self.done}/{self.total} {items}", flush=True)

    def close(self) -> None:
        self.bar.close()


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def to_model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 batch from the loader -> normalised float on ``device``, channels_last (faster convolutions on GPUs
    and on the CPU alike: docs/results.md)."""
    return normalize(images.to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)


def train_one_epoch(model: nn.Module, train_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batches,
                    progress: EpochProgress, stop: StopRequest | None = None, desc: str = "train",
                    log_every: int = 10, show: bool = True) -> bool:
    """Train over ``batches`` (which may start mid-epoch) with ``train_step(images, labels) -> device loss``,
    updating ``progress`` in place.

    Returns False if ``stop`` asked to stop: then ``progress`` holds every finished step, its loss and its
    time, and nothing of an unfinished one. The loss is accumulated on the device and read back only every
    ``log_every`` steps (and on stopping), so the host never waits for the GPU in between. Time spent
    waiting for the next batch is added to ``progress.data_wait``.
    """
    model.train()
    pending_loss, failure, batch_iterator = None, None, iter(batches)
    stand_in = (torch.zeros(2, 3, 64, 64, dtype=torch.uint8), torch.zeros(2, 64, 64))  # after a failure (below)
    line = ProgressLine(len(batches) + progress.step, desc, show, initial=progress.step)
    start = window_start = time.perf_counter()
    window_steps, window_images, wait_start, stopped = 0, 0, start, False
    for step in range(1, len(batches) + 1):
        try:
            images, labels = next(batch_iterator) if failure is None else stand_in
        except UserError as error:  # e.g. an unreadable image in this rank's shard: the others learn it below
            failure, (images, labels) = error, stand_in  # keeps this rank in DDP's gradient exchange
        progress.data_wait += time.perf_counter() - wait_start
        loss = train_step(images, labels).detach().double()
        pending_loss = loss if pending_loss is None else pending_loss + loss
        progress.step += 1
        window_steps, window_images = window_steps + 1, window_images + len(images)
        at_boundary = step % log_every == 0 or step == len(batches)
        stopped = stop is not None and stop.agreed()
        if at_boundary or stopped:
            failure = agreed_failure(failure, loss.device)  # every rank reaches a boundary together
            if failure is not None:
                raise failure
            window_loss, pending_loss = pending_loss.item(), None
            if on_any_rank(not math.isfinite(window_loss), loss.device):
                raise NonFiniteLoss(f"training loss became NaN or infinite by step {progress.step}")
            progress.loss_sum += window_loss
            now = time.perf_counter()
            line.update(window_steps, {"loss": f"{progress.loss_sum / progress.step:.4f}",
                                       "img/s": f"{window_images / (now - window_start):.1f}"})
            window_start, window_steps, window_images = now, 0, 0
        if stopped:
            break
        wait_start = time.perf_counter()
    line.close()
    progress.seconds += time.perf_counter() - start
    return not stopped


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor,
                      class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of (N, C, H, W) ``logits`` over the non-ignored pixels of (N, H, W) ``target``: the sum of
    each pixel's (weighted) loss divided by the (weighted) count of valid pixels, as PyTorch's weighted mean.

    Dividing by hand keeps a crop that is all ignore finite (PyTorch's mean would be 0/0). The per-pixel terms
    (``reduction="none"``) are summed by a plain reduction: CUDA's summing ``nll_loss`` adds with atomics, which
    --deterministic refuses.
    """
    per_pixel = F.cross_entropy(logits, target, weight=class_weights, ignore_index=IGNORE_INDEX, reduction="none")
    if class_weights is None:
        return per_pixel.sum() / (target != IGNORE_INDEX).sum().clamp(min=1)
    return per_pixel.sum() / pixel_weights(class_weights, target).sum().clamp(min=1e-12)


def pixel_weights(weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``weight[class]`` for each pixel of (N, H, W) ``target``, 0 where it is IGNORE_INDEX. The whole map is
    indexed (ignored pixels as class 0, then zeroed): indexing only the valid pixels would sync with the host."""
    valid = target != IGNORE_INDEX
    return torch.where(valid, weight[target.masked_fill(~valid, 0)], 0)


def class_map(scores: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) scores -> (N, H, W) int64 class indices, the first maximum as ``argmax`` gives. Written as
    ``max(1).indices``, which the CPU computes several times faster than ``argmax`` over the class dimension."""
    return scores.max(1).indices


def predict(model: nn.Module, images: torch.Tensor, device: torch.device, amp_dtype: torch.dtype | None = None,
            flip: bool = False, scales: tuple[float, ...] = (1.0,)) -> torch.Tensor:
    """(N, 3, H, W) uint8 images -> (N, C, H, W) float class scores: the logits, or with ``flip`` and/or several
    ``scales`` (TTA) the log of the variants' averaged softmax outputs. Either way ``log_softmax`` of the scores
    gives the log-probabilities and their maximum the class; normalising is left to the caller, which may do it
    in bands (``score_batch``). The average is taken in log space (log-sum-exp of the variants' log-softmaxes):
    a confident model's softmax underflows to 0 in float32, and the log of such an average would be -inf, a
    pixel's loss inf. A scaled variant is resized to and from explicit sizes, so the two resizes are inverses.
    """
    x = to_model_input(images, device)
    height, width = x.shape[-2:]
    variants = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    log_sum = None
    for scale, flipped in variants:
        scaled = [max(1, round(side * scale)) for side in (height, width)]  # as augmentation.zoomed sizes a stage
        inp = x if scale == 1 else F.interpolate(x, size=scaled, mode="bilinear", align_corners=False)
        with autocast(device, amp_dtype):
            logits = model(inp.flip(-1) if flipped else inp).float()
        logits = logits.flip(-1) if flipped else logits
        if scale != 1:
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        if len(variants) == 1:
            return logits
        log_probabilities = logits.log_softmax(1)
        log_sum = log_probabilities if log_sum is None else torch.logaddexp(log_sum, log_probabilities)
    return log_sum - math.log(len(variants))


def score_batch(scores: torch.Tensor, target: torch.Tensor,
                class_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed cross-entropy of ``target`` under (N, C, H, W) ``scores`` (see ``predict``), each pixel's term
    times its class's weight if ``class_weights`` are given (as ``segmentation_loss`` weighs them), and their
    (N, H, W) class map, from one maximum over the classes: the class map is its index, and the loss of a pixel is
    ``top + log(sum(exp(scores - top))) - scores[target]``, the log-softmax's own formula for just the one class
    it needs. No (N, C, H, W) log-probabilities are made: on the CPU such a full-size temporary costs more in
    fresh pages than in arithmetic, so the CPU also works in bands of BAND_ROWS rows."""
    rows = BAND_ROWS if scores.device.type == "cpu" else scores.shape[2]
    loss, maps = 0.0, []
    for band, band_target in zip(scores.split(rows, 2), target.split(rows, 1)):
        top, classes = band.max(1)
        log_sum_exp = top + (band - top.unsqueeze(1)).exp_().sum(1).log_()
        valid = band_target != IGNORE_INDEX
        picked = band.gather(1, band_target.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
        per_pixel = torch.where(valid, log_sum_exp - picked, 0)
        if class_weights is not None:
            per_pixel = per_pixel * pixel_weights(class_weights, band_target)
        loss = loss + per_pixel.sum()
        maps.append(classes)
    return loss, torch.cat(maps, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, device: torch.device, amp_dtype: torch.dtype | None = None,
             show: bool = True, on_prediction: Callable[[int, torch.Tensor], None] | None = None,
             class_weights: torch.Tensor | None = None, zoom: float = 1.0,
             until: Callable[[], bool] | None = None, **predict_options) -> tuple[ConfusionMatrix, float]:
    """One confusion matrix and the mean loss over the whole loader, summed over DDP ranks. The loss is the
    training loss's definition: with ``class_weights`` each pixel's term weighs as its class, divided by the sum of
    the weights (``segmentation_loss``), so a weighted run's train and val losses are one quantity.

    ``on_prediction(batch_index, (N, H, W) class map)`` lets test.py save predictions. ``zoom`` scores images
    and labels resized by it (``augmentation.zoomed``): a reduced resolution stage validates at its own scale.
    ``until()`` true ends the pass early (a stop request), with what was scored so far.
    """
    model.eval()
    confusion = ConfusionMatrix(num_classes, device)
    loss_and_count = torch.zeros(2, dtype=torch.float64, device=device)
    line = ProgressLine(len(loader), "val", show)
    try:
        for batch_index, (images, labels) in enumerate(loader):
            if until is not None and until():
                break
            images, labels = zoomed(images, labels, zoom)
            scores = predict(model, images, device, amp_dtype, **predict_options)
            target = labels.to(device, non_blocking=True).long()
            loss, prediction = score_batch(scores, target, class_weights)
            loss_and_count[0] += loss
            loss_and_count[1] += (target != IGNORE_INDEX).sum() if class_weights is None else \
                pixel_weights(class_weights, target).sum()
            confusion.update(prediction, target)
            if on_prediction is not None:
                on_prediction(batch_index, prediction)
            line.update()
        failure = None
    except UserError as error:  # e.g. an unreadable image in this rank's share: every rank stops with its line
        failure = error
    line.close()
    failure = agreed_failure(failure, device)
    if failure is not None:
        raise failure
    confusion.all_reduce()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(loss_and_count)
    loss, count = loss_and_count.tolist()
    return confusion, loss / count if count else float("nan")


class Stage(NamedTuple):
    """Epochs ``start`` to ``end`` (0-based, end excluded) trained at ``scale`` x the dataset's training sizes."""
    scale: float
    start: int
    end: int


def stage_plan(stages: tuple | list, epochs: int) -> list[Stage]:
    """The run's resolution stages: STAGES' ``(scale, epochs)`` pairs in order, then full scale up to ``epochs``.
    Each stage has its own warm-up and poly decay (``make_optimizer``), as a new run from the previous stage's
    weights would; only full-scale epochs are scored for best.pt (a reduced stage validates at its own scale)."""
    plan, start = [], 0
    for scale, length in stages:
        plan.append(Stage(float(scale), start, start + length))
        start += length
    return plan + [Stage(1.0, start, epochs)]


def stage_of(plan: list[Stage], epoch: int) -> Stage:
    """The stage that trains epoch ``epoch`` (0-based); past the end, the last."""
    return next((stage for stage in plan if epoch < stage.end), plan[-1])


def warmup_poly(step: int, warmup: int, total: int, power: float) -> float:
    """LR multiplier at ``step``: linear from 0.1 to 1 over ``warmup`` steps (none if 0: WARMUP_EPOCHS = 0), then
    (1 - progress) ^ power to 0."""
    if step < warmup:
        return 0.1 + 0.9 * step / warmup
    return max(0.0, 1 - (step - warmup) / max(1, total - warmup)) ** power


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on convolution weights only: not on BatchNorm's scale and shift, biases, or the learned x2
    upsampling (decay would pull its bilinear initialisation towards zero), as current practice does."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                (decay if type(module) is torch.nn.Conv2d and name == "weight" else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace, plan: list[Stage], steps_per_epoch: int):
    """SGD with momentum, and one LambdaLR stepped every iteration: its whole state is the step count, so a
    resume restores the schedule exactly on any torch version (SequentialLR's restore has varied). Each stage of
    ``plan`` warms up and decays on its own."""
    optimizer = torch.optim.SGD(parameter_groups(model, args.weight_decay), lr=args.lr, momentum=args.momentum)

    def multiplier(step: int) -> float:
        stage = stage_of(plan, step // steps_per_epoch)
        total = (stage.end - stage.start) * steps_per_epoch
        warmup = 0 if args.warmup_epochs == 0 else min(max(1, round(args.warmup_epochs * steps_per_epoch)), total - 1)
        return warmup_poly(step - stage.start * steps_per_epoch, warmup, total, args.poly_power)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def epoch_lr(scheduler: torch.optim.lr_scheduler.LambdaLR, epoch: int, steps_per_epoch: int) -> float:
    """The mean learning rate of epoch ``epoch``'s steps (0-based), the rate metrics.csv logs for the epoch: the
    scheduler's rate after the epoch is already the next one's first."""
    steps = range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
    return scheduler.base_lrs[0] * sum(scheduler.lr_lambdas[0](step) for step in steps) / steps_per_epoch
