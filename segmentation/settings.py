"""main.py's settings: what each one accepts, and what --resume lets change.

The block at the top of main.py and the flags that override it both end in one namespace; ``check_args``
takes each value in the forms the block's comments promise and names a wrong one in one line. A resumed run
takes its settings from its checkpoint, and only where it runs (``RESUMABLE_FLAGS``) may change.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable

from model import ARCHS
from segmentation import UserError, quoted
from segmentation.checkpoint import load_checkpoint, require_training_state
from segmentation.layouts import DATASETS
from segmentation.loading import WEIGHTINGS

# where and how it runs, not what: a resume may change these (a smaller machine, another log rate)
RESUMABLE_FLAGS = {"resume", "device", "workers", "data_root", "deterministic", "cache_gb", "log_every"}
# a setting newer than a checkpoint resumes as the run trained before it existed, not as the block says now
BEFORE_IT_EXISTED = {"stages": ()}
# a setting since removed: the values with which a run trained as today's code trains (any other is refused)
SINCE_REMOVED = {"aux_loss": (0, 0.0, None), "photometric": ("mild",)}


def readable(kind: type) -> Callable[[str], object]:
    """A flag's type that keeps text it cannot read as ``kind``: ``check_args`` then names the value in one line,
    as it does for the block's constants (argparse would print its usage instead)."""
    def convert(text: str) -> object:
        try:
            return kind(text)
        except ValueError:
            return text
    return convert


def stage_pair(text: str) -> tuple[float, int] | str:
    """--stages' ``SCALE:EPOCHS`` (e.g. ``0.5:30``) as ``(0.5, 30)``; text it cannot read is kept for
    ``check_args`` to name."""
    scale, _, epochs = text.partition(":")
    try:
        return float(scale), int(epochs)
    except ValueError:
        return text


def stages_valid(value: object) -> bool:
    return isinstance(value, (tuple, list)) and all(
        isinstance(pair, (tuple, list)) and len(pair) == 2 and real(pair[0]) and 0 < pair[0] < 1 and whole(pair[1], 1)
        for pair in value)


MAX_SIDE = 8192  # pixels: a crop or base size beyond it is a slip (an extra digit) that would exhaust any memory


def whole(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# what each setting accepts: (test, what to write instead); the block's constant is the flag's name in capitals
ACCEPTS = {
    "arch": (lambda v: v in ARCHS, " | ".join(ARCHS)),
    "dataset": (lambda v: v in DATASETS, " | ".join(DATASETS)),
    "epochs": (lambda v: whole(v, 1), "a whole number, at least 1"),
    "stages": (stages_valid, "() or (scale, epochs) pairs, each scale in (0, 1), e.g. ((0.5, 30),) (--stages 0.5:30)"),
    "batch_size": (lambda v: whole(v, 1), "a whole number, at least 1"),
    "crop_size": (lambda v: v is None or (len(v) == 2 and all(whole(x, 32) and x <= MAX_SIDE for x in v)),
                  f"None, H or (H, W): whole numbers of pixels, each 32 to {MAX_SIDE}"),
    "base_size": (lambda v: v is None or (whole(v, 32) and v <= MAX_SIDE),
                  f"None or a whole number of pixels, 32 to {MAX_SIDE}"),
    "lr": (lambda v: real(v) and v > 0, "a positive learning rate, e.g. 0.01"),
    "momentum": (lambda v: real(v) and 0 <= v < 1, "a number in [0, 1), e.g. 0.9"),
    "weight_decay": (lambda v: real(v) and v >= 0, "0 or more, e.g. 1e-4"),
    "warmup_epochs": (lambda v: real(v) and v >= 0, "0 or more epochs, e.g. 1"),
    "poly_power": (lambda v: real(v) and v >= 0, "0 or more, e.g. 0.9"),
    "label_set": (lambda v: isinstance(v, (str, Path)) and bool(str(v).strip()),  # a table is judged by its content
                  "train | full | a class table file, e.g. \"data/camvid/camvid.csv\""),
    "class_weights": (lambda v: v in WEIGHTINGS, " | ".join(WEIGHTINGS)),
    "data_root": (lambda v: isinstance(v, Path), "a folder, e.g. \"data/data_semantics\""),
    "out": (lambda v: v is None or isinstance(v, Path), "None or a folder, e.g. \"runs/fcn16-a\""),
    "seed": (lambda v: whole(v, 0), "a whole number, 0 or more"),
    "amp": (lambda v: isinstance(v, bool), "True or False"),
    "deterministic": (lambda v: isinstance(v, bool), "True or False"),
    "workers": (lambda v: v == "auto" or whole(v, 0), "auto or a whole number, 0 or more"),
    "pretrained": (lambda v: isinstance(v, bool), "True or False"),
    "cache_gb": (lambda v: v is None or (real(v) and v >= 0), "None, 0 (off) or a size in GB"),
    "log_every": (lambda v: whole(v, 1), "a whole number, at least 1"),
}


def check_args(args: argparse.Namespace) -> None:
    """Take each setting in the forms the block's comments promise (``CROP_SIZE = 320`` or ``(320, 640)``, a
    folder as text, ``WORKERS = 4``) and refuse a meaningless one up front, in one line naming the constant."""
    if isinstance(args.crop_size, int) and not isinstance(args.crop_size, bool):
        args.crop_size = (args.crop_size, args.crop_size)
    elif isinstance(args.crop_size, (list, tuple)) and len(args.crop_size) in (1, 2):
        args.crop_size = (args.crop_size[0], args.crop_size[-1])
    for name in ("data_root", "out"):
        if isinstance(getattr(args, name), str):
            setattr(args, name, Path(getattr(args, name)))
    for name, (accepts, expected) in ACCEPTS.items():
        value = getattr(args, name)
        if not accepts(value):
            shown = f"({', '.join(map(str, value))})" if isinstance(value, tuple) else repr(value)
            raise UserError(f"{name.upper()} = {shown} (--{name.replace('_', '-')}) is not valid: use {expected}")
    args.stages = tuple(tuple(pair) for pair in args.stages)
    if sum(epochs for _, epochs in args.stages) >= args.epochs:
        raise UserError(f"STAGES = {args.stages} (--stages) take {sum(e for _, e in args.stages)} of EPOCHS = "
                        f"{args.epochs} epochs; the run ends at full scale, so raise EPOCHS or shorten the stages")
    if args.resume and args.init_from:
        raise UserError("--resume and --init-from exclude each other: --resume continues a run, --init-from starts one")


def args_from_checkpoint(state: dict, cli: argparse.Namespace, defaults: argparse.Namespace) -> argparse.Namespace:
    """The resumed run's config: the checkpoint's, over ``defaults`` (for settings newer than the checkpoint).
    Only where it runs may change (device, workers, data folder); any flag that would change the run itself is
    refused rather than silently ignored."""
    changed = sorted(set(cli.explicit) - RESUMABLE_FLAGS)
    if changed:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in changed)
        raise UserError(f"--resume continues {cli.resume} exactly as it was configured, so {flags} cannot change; "
                        f"to train on with other settings start a new run with --init-from {quoted(cli.resume)}")
    removed = {key: value for key, value in state["config"].items() if key not in vars(defaults)}
    for key, value in removed.items():
        if value not in SINCE_REMOVED.get(key, ()):
            raise UserError(f"{cli.resume}: the run trained with {key} = {value!r}, a setting this version no longer "
                            "has, so it cannot continue as it trained; finish it with the version it started with, or "
                            f"start a new run from its weights with --init-from {quoted(cli.resume)}")
    config = {key: value for key, value in state["config"].items() if key not in removed}
    args = argparse.Namespace(**{**vars(defaults), **BEFORE_IT_EXISTED, **config})
    for key in ("data_root", "split_dir", "out", "init_from"):
        setattr(args, key, Path(getattr(args, key)) if getattr(args, key) else None)
    for key in RESUMABLE_FLAGS & set(cli.explicit):
        setattr(args, key, getattr(cli, key))
    args.resume, args.explicit = cli.resume, cli.explicit
    return args


def load_resume_state(args: argparse.Namespace,
                      defaults: argparse.Namespace) -> tuple[argparse.Namespace, dict | None]:
    """The run's config and state when --resume is given, checked before anything starts."""
    if not args.resume:
        args.device = args.device or "auto"
        return args, None
    last = args.resume.parent / "last.pt"
    if last.is_file() and args.resume.resolve() != last.resolve():  # e.g. best.pt: it would rewind the run
        raise UserError(f"{args.resume}: a run continues from its last.pt, so resume with --resume {quoted(last)}; "
                        f"to start a new run from this checkpoint's weights, use --init-from {quoted(args.resume)}")
    state = load_checkpoint(args.resume)
    require_training_state(state, args.resume)
    args = args_from_checkpoint(state, args, defaults)
    check_args(args)
    if state["epoch"] >= args.epochs:
        raise UserError(f"{args.resume}: the run already finished its {args.epochs} epochs; evaluate it with "
                        f"python test.py --checkpoint {quoted(args.resume.parent / 'best.pt')}, or train on with a "
                        f"new run: --init-from {quoted(args.resume)} --epochs N")
    return args, state
