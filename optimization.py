"""SGD with momentum, weight decay on convolution weights only, and the warm-up + poly learning-rate schedule."""
from __future__ import annotations

import argparse

import torch


def warmup_poly(step: int, warmup: int, total: int, power: float) -> float:
    """LR multiplier at ``step``: linear from 0.1 to 1 over ``warmup`` steps, then (1 - progress) ^ power to 0."""
    if step < warmup:
        return 0.1 + 0.9 * step / warmup
    return max(0.0, 1 - (step - warmup) / max(1, total - warmup)) ** power


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on convolution weights only: not on BatchNorm's scale and shift, biases, or the learned x2
    upsampling (decay would pull its bilinear initialisation towards zero), as current practice does."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            plain_conv = type(module) is torch.nn.Conv2d and name == "weight"
            (decay if plain_conv else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimization(model: torch.nn.Module, args: argparse.Namespace, steps_per_epoch: int):
    """SGD with momentum, and one LambdaLR stepped every iteration: its whole state is the step count, so a
    resume restores the schedule exactly on any torch version (SequentialLR's restore has varied)."""
    optimizer = torch.optim.SGD(parameter_groups(model, args.weight_decay), lr=args.lr, momentum=args.momentum)
    total = args.epochs * steps_per_epoch
    warmup = min(max(1, round(args.warmup_epochs * steps_per_epoch)), total - 1)

    def multiplier(step: int) -> float:
        return warmup_poly(step, warmup, total, args.poly_power)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
