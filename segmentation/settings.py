"""main.py's settings, each declared once: its constant in main.py's block, and its row in ``SETTINGS``, from
which follow its flag (``add_flags``), its one-line check (``check_args``) and whether --resume may change it
(``args_from_checkpoint``: a resumed run takes its settings from its checkpoint)."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Callable, NamedTuple

from model import ARCHS
from segmentation import MAX_SIDE, UserError, quoted
from segmentation.checkpoint import load_checkpoint, republish_best, require_training_state
from segmentation.layouts import LAYOUTS
from segmentation.loading import WEIGHTINGS

# a setting newer than a checkpoint resumes as the run trained before it existed, not as the block says now
BEFORE_IT_EXISTED = {"stages": ()}
# a setting since removed: the values with which a run trained as today's code trains (any other is refused)
SINCE_REMOVED = {"aux_loss": (0, 0.0, None), "photometric": ("mild",)}


def readable(kind: Callable[[str], object]) -> Callable[[str], object]:
    """A flag's type that keeps text it cannot read as ``kind``: ``check_args`` then names the value in one line,
    as it does for the block's constants (argparse would print its usage instead)."""
    def convert(text: str) -> object:
        try:
            return kind(text)
        except ValueError:
            return text
    return convert


def stage_pair(text: str) -> tuple[float, int]:
    """--stages' ``SCALE:EPOCHS`` (e.g. ``0.5:30``) as ``(0.5, 30)``."""
    scale, _, epochs = text.partition(":")
    return float(scale), int(epochs)


def stage_valid(pair: object) -> bool:
    return isinstance(pair, (tuple, list)) and len(pair) == 2 and real(pair[0]) and 0 < pair[0] < 1 and \
        whole(pair[1], 1)


def whole(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def boolean(value: object) -> bool:
    return isinstance(value, bool)


class Setting(NamedTuple):
    """One setting of main.py's block: what it accepts (a test, and what to write instead), its flag's help, how
    the flag reads its text (add_argument's keywords), and whether --resume may change it (where and how a run
    runs, not what it learns: a smaller machine, another log rate)."""
    accepts: Callable[[object], bool]
    expected: str
    help: str
    flag: dict | None = None
    resumable: bool = False


INTEGER, NUMBER = {"type": readable(int)}, {"type": readable(float)}
SWITCH = {"action": argparse.BooleanOptionalAction}
SETTINGS = {
    "arch": Setting(lambda v: v in ARCHS, " | ".join(ARCHS), " | ".join(ARCHS)),
    "dataset": Setting(lambda v: v in LAYOUTS, " | ".join(LAYOUTS), f"{' | '.join(LAYOUTS)} (the folder layout)"),
    "epochs": Setting(lambda v: whole(v, 1), "a whole number, at least 1", "passes over the training split, all "
                      "stages together", INTEGER),
    "stages": Setting(lambda v: isinstance(v, (tuple, list)) and all(stage_valid(pair) for pair in v),
                      "() or (scale, epochs) pairs, each scale in (0, 1), e.g. ((0.5, 30),) (--stages 0.5:30)",
                      "resolution stages before the full-scale epochs, e.g. --stages 0.5:30; none: --stages",
                      {"type": readable(stage_pair), "nargs": "*", "metavar": "SCALE:EPOCHS"}),
    "batch_size": Setting(lambda v: whole(v, 1), "a whole number, at least 1", "images per step and process", INTEGER),
    "crop_size": Setting(lambda v: v is None or (len(v) == 2 and all(whole(x, 32) and x <= MAX_SIDE for x in v)),
                         f"None, H or (H, W): whole numbers of pixels, each 32 to {MAX_SIDE}",
                         "training crop (None: the dataset's)", {**INTEGER, "nargs": "+", "metavar": "H [W]"}),
    "base_size": Setting(lambda v: v is None or (whole(v, 32) and v <= MAX_SIDE),
                         f"None or a whole number of pixels, 32 to {MAX_SIDE}", "scaling reference (None: the "
                         "dataset's)", INTEGER),
    "lr": Setting(lambda v: real(v) and v > 0, "a positive learning rate, e.g. 0.01", "peak SGD learning rate", NUMBER),
    "momentum": Setting(lambda v: real(v) and 0 <= v < 1, "a number in [0, 1), e.g. 0.9", "SGD momentum", NUMBER),
    "weight_decay": Setting(lambda v: real(v) and v >= 0, "0 or more, e.g. 1e-4", "L2 on convolution weights", NUMBER),
    "warmup_epochs": Setting(lambda v: real(v) and v >= 0, "0 or more epochs, e.g. 1", "linear warm-up (per stage)",
                             NUMBER),
    "poly_power": Setting(lambda v: real(v) and v >= 0, "0 or more, e.g. 0.9", "poly decay exponent", NUMBER),
    "label_set": Setting(lambda v: isinstance(v, (str, Path)) and bool(str(v).strip()),  # a table: by its content
                         "train | full | a class table file, e.g. \"data/camvid/camvid.csv\"",
                         "train | full (Cityscapes ids) | a class table file: value,name,r,g,b[,void]"),
    "class_weights": Setting(lambda v: v in WEIGHTINGS, " | ".join(WEIGHTINGS),
                             f"class balancing of the cross-entropy: {' | '.join(WEIGHTINGS)}"),
    "data_root": Setting(lambda v: isinstance(v, Path), "a folder, e.g. \"data/data_semantics\"", "the dataset's "
                         "folder", {"type": Path}, resumable=True),
    "out": Setting(lambda v: v is None or isinstance(v, Path), "None or a folder, e.g. \"runs/fcn16-a\"",
                   "run folder (None: runs/<arch>-<time>)", {"type": Path}),
    "seed": Setting(lambda v: whole(v, 0), "a whole number, 0 or more", "order, augmentation and initialisation",
                    INTEGER),
    "amp": Setting(boolean, "True or False", "CUDA: bf16/fp16 autocast; --no-amp: float32", SWITCH),
    "deterministic": Setting(boolean, "True or False", "deterministic kernels only (no cuDNN autotuning), so that a "
                             "resumed CUDA run ends bit-identical to an uninterrupted one; slower. CPU runs are "
                             "bit-exact without it", SWITCH, resumable=True),
    "workers": Setting(lambda v: v == "auto" or whole(v, 0), "auto or a whole number, 0 or more",
                       "DataLoader processes per training process, or auto", INTEGER, resumable=True),
    "pretrained": Setting(boolean, "True or False", "ImageNet trunk, or (--no-pretrained) random weights", SWITCH),
    "cache_gb": Setting(lambda v: v is None or (real(v) and v >= 0), "None, 0 (off) or a size in GB",
                        "memory budget of the decoded-image cache (None: half the available memory)",
                        NUMBER, resumable=True),
    "log_every": Setting(lambda v: whole(v, 1), "a whole number, at least 1", "steps between loss read-backs",
                         INTEGER, resumable=True),
}
RESUMABLE_FLAGS = {"resume", "device"} | {name for name, setting in SETTINGS.items() if setting.resumable}


def add_flags(parser: argparse.ArgumentParser, block: dict[str, object]) -> None:
    """A flag for each row of ``SETTINGS`` (``--batch-size`` for batch_size), its default the block's constant."""
    for name, setting in SETTINGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", default=block[name], help=f"{setting.help} (default "
                            "%(default)s)", **(setting.flag or {}))


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
    for name, setting in SETTINGS.items():
        value = getattr(args, name)
        if not setting.accepts(value):
            shown = f"({', '.join(map(str, value))})" if isinstance(value, tuple) else repr(value)
            raise UserError(f"{name.upper()} = {shown} (--{name.replace('_', '-')}) is not valid: use "
                            f"{setting.expected}")
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


def load_resume_state(args: argparse.Namespace, defaults: argparse.Namespace) -> tuple[argparse.Namespace, dict | None]:
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
        if int(os.environ.get("RANK", "0")) == 0:  # killed after its last last.pt: best.pt may be behind
            republish_best(args.resume.parent, state)
        raise UserError(f"{args.resume}: the run already finished its {args.epochs} epochs; evaluate it with "
                        f"python test.py --checkpoint {quoted(args.resume.parent / 'best.pt')}, or train on with a "
                        f"new run: --init-from {quoted(args.resume)} --epochs N")
    return args, state
