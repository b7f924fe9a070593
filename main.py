"""Train FCN-32s / FCN-16s / FCN-8s on KITTI semantics.

    python main.py --arch fcn16                       # one GPU (or the CPU)
    torchrun --nproc_per_node=4 main.py --arch fcn16  # four GPUs, DDP
    python main.py --demo                             # whole loop on synthetic data, no download needed
    python main.py --resume runs/x/last.pt            # continue exactly where a run stopped
"""
# ---- Hyperparameters: edit here, or override with the flag of the same name (--batch-size for BATCH_SIZE) ----
ARCH = "fcn16"                   # fcn32 | fcn16 | fcn8
DATASET = "kitti"                # kitti | cityscapes (official layout; see README "From Cityscapes to KITTI")
EPOCHS = 50                      # passes over the training split (160 images for KITTI)
BATCH_SIZE = 8                   # images per step and per process (DDP: total = BATCH_SIZE x processes)
CROP_SIZE = None                 # training crop, H or (H, W) pixels; None: KITTI 320x320, Cityscapes 512x1024
BASE_SIZE = None                 # scaling draws the shorter side from 0.5-2.0 x this; None: the frame height
LR = 0.01                        # peak SGD learning rate, reached after warm-up (not scaled with DDP)
MOMENTUM = 0.9                   # SGD momentum
WEIGHT_DECAY = 1e-4              # L2 on convolution weights (not on BatchNorm, biases or the x2 upsampling)
WARMUP_EPOCHS = 1.0              # linear warm-up from 0.1 x LR over this many epochs, then poly decay
POLY_POWER = 0.9                 # lr = LR x (1 - progress) ^ POLY_POWER, stepped every iteration
LABEL_SET = "train"              # train: 19 benchmark classes (others ignored) | full: all 34 label ids
CLASS_WEIGHTS = "none"           # none | median-freq (SegNet) | log (ENet): cross-entropy weights from the train labels
DATA_ROOT = "data/data_semantics"  # KITTI: folder holding training/ and testing/; Cityscapes: leftImg8bit/ and gtFine/
OUT_DIR = None                   # run folder; None -> runs/<arch>-<date>-<time>; never overwritten
SEED = 0                         # shuffling, augmentation and initialisation (the train/val split is fixed)
AMP = True                       # CUDA only: bf16 autocast where supported, else fp16 with loss scaling
COMPILE = False                  # torch.compile the training step's network (measure first: see docs/results.md)
DETERMINISTIC = False            # CUDA: deterministic kernels, a resumed run bit-identical to an unbroken one; slower
WORKERS = "auto"                 # DataLoader processes per training process; auto: from the CPU count
AUGMENT_ON = "workers"           # workers (loader processes) | device: images kept on the GPU and augmented there
PRETRAINED = True                # ImageNet ResNet18 trunk (downloaded once, or --backbone-weights PATH)
CACHE_GB = None                  # keep decoded images in memory up to this size; None: half the free memory; 0: off
LOG_EVERY = 10                   # steps between loss read-backs / progress lines
# ------------------------------------------------------------------------------------------------------------

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import distributed  # noqa: E402
from checkpoint import load_checkpoint, require_training_state  # noqa: E402
from determinism import deterministic_algorithms  # noqa: E402
from errors import UserError  # noqa: E402
from model import ARCHS  # noqa: E402
from training_run import TrainingRun  # noqa: E402

RESUMABLE_FLAGS = {"resume", "device", "workers", "augment_on", "data_root", "deterministic",
                   "compile"}  # what --resume may change: where and how it runs, not what it computes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=ARCH, choices=ARCHS, help="(default %(default)s)")
    p.add_argument("--dataset", default=DATASET, choices=("kitti", "cityscapes"), help="(default %(default)s)")
    for name, value, kind in (("epochs", EPOCHS, int), ("batch-size", BATCH_SIZE, int), ("lr", LR, float),
                              ("momentum", MOMENTUM, float), ("weight-decay", WEIGHT_DECAY, float),
                              ("warmup-epochs", WARMUP_EPOCHS, float), ("poly-power", POLY_POWER, float),
                              ("seed", SEED, int), ("log-every", LOG_EVERY, int)):
        p.add_argument(f"--{name}", type=kind, default=value, help="(default %(default)s)")
    p.add_argument("--crop-size", type=int, nargs="+", default=CROP_SIZE, metavar="H [W]",
                   help="training crop (default: the dataset's)")
    p.add_argument("--base-size", type=int, default=BASE_SIZE, help="scaling reference (default: the dataset's)")
    p.add_argument("--workers", default=WORKERS, help="DataLoader processes per training process, or auto "
                   "(default %(default)s)")
    p.add_argument("--augment-on", default=AUGMENT_ON, choices=("workers", "device"),
                   help="where training crops are made: loader workers, or the training device from the cached images "
                   "kept there (default %(default)s)")
    p.add_argument("--label-set", default=LABEL_SET, choices=("train", "full"), help="(default %(default)s)")
    p.add_argument("--class-weights", default=CLASS_WEIGHTS, choices=("none", "median-freq", "log"),
                   help="class balancing of the cross-entropy (default %(default)s)")
    p.add_argument("--data-root", type=Path, default=Path(DATA_ROOT), help="(default %(default)s)")
    p.add_argument("--download", action="store_true", help="download KITTI into --data-root first")
    p.add_argument("--split-dir", type=Path, help="folder with train.txt/val.txt (default: KITTI's fixed 80/20 "
                   "split, Cityscapes' official split)")
    p.add_argument("--out", type=Path, default=OUT_DIR, help="run folder (default runs/<arch>-<time>)")
    p.add_argument("--resume", type=Path, help="continue a run from its last.pt (config comes from the checkpoint)")
    p.add_argument("--init-from", type=Path, help="start from a checkpoint's weights: the same architecture "
                   "(fine-tuning, e.g. Cityscapes -> KITTI) or a coarser one (FCN32s -> FCN16s)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default auto; on --resume the run's)")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false", default=PRETRAINED,
                   help="random trunk instead of ImageNet weights")
    p.add_argument("--backbone-weights", help="ResNet18 ImageNet state_dict file, for machines without internet")
    p.add_argument("--no-amp", dest="amp", action="store_false", default=AMP, help="float32 on CUDA")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=COMPILE,
                   help="torch.compile the network for training steps; validation stays eager (default %(default)s)")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=DETERMINISTIC,
                   help="deterministic kernels only (no cuDNN autotuning), so that a resumed CUDA run ends "
                   "bit-identical to an uninterrupted one; slower. CPU runs are bit-exact without it "
                   "(default %(default)s)")
    p.add_argument("--cache-gb", type=float, default=CACHE_GB, help="memory budget of the decoded-image cache "
                   "(default: half the available memory)")
    p.add_argument("--no-cache", dest="cache_gb", action="store_const", const=0.0, help="decode PNGs every epoch")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across DDP processes")
    p.add_argument("--demo", nargs="?", const="", metavar="DIR",
                   help="write a synthetic KITTI tree (to DIR or a temp folder) and run a short CPU-friendly training")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with ``explicit``: the names of those given on the command line (for --resume's contract)."""
    args = build_parser().parse_args(argv)
    detector = build_parser()
    for action in detector._actions:  # no defaults: the namespace then holds only what argv named
        action.default = argparse.SUPPRESS
    args.explicit = sorted(vars(detector.parse_args(argv)))
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Refuse meaningless values up front, each with one line naming the flag and the fix."""
    checks = (("--epochs", args.epochs, args.epochs >= 1, "at least 1"),
              ("--batch-size", args.batch_size, args.batch_size >= 1, "at least 1"),
              ("--lr", args.lr, args.lr > 0, "a positive learning rate, e.g. 0.01"),
              ("--momentum", args.momentum, 0 <= args.momentum < 1, "in [0, 1), e.g. 0.9"),
              ("--weight-decay", args.weight_decay, args.weight_decay >= 0, "0 or more, e.g. 1e-4"),
              ("--warmup-epochs", args.warmup_epochs, args.warmup_epochs >= 0, "0 or more, e.g. 1"),
              ("--poly-power", args.poly_power, args.poly_power >= 0, "0 or more, e.g. 0.9"),
              ("--log-every", args.log_every, args.log_every >= 1, "at least 1"),
              ("--cache-gb", args.cache_gb, args.cache_gb is None or args.cache_gb >= 0, "0 (off) or more"),
              ("--crop-size", args.crop_size,
               args.crop_size is None or (len(args.crop_size) <= 2 and min(args.crop_size) >= 32),
               "H or H W, each at least 32"),
              ("--base-size", args.base_size, args.base_size is None or args.base_size >= 32, "at least 32"),
              ("--workers", args.workers, args.workers == "auto" or (args.workers.isdigit()), "auto or 0 or more"))
    for flag, value, ok, expected in checks:
        if not ok:
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            raise UserError(f"{flag} {shown} is not valid: use {expected}")
    if args.resume and args.init_from:
        raise UserError("--resume and --init-from exclude each other: --resume continues a run, --init-from starts one")


def args_from_checkpoint(state: dict, cli: argparse.Namespace) -> argparse.Namespace:
    """The resumed run's config. Only where it runs may change (device, workers, data folder); any flag that
    would change the run itself is refused rather than silently ignored."""
    changed = sorted(set(cli.explicit) - RESUMABLE_FLAGS)
    if changed:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in changed)
        raise UserError(f"--resume continues {cli.resume} exactly as it was configured, so {flags} cannot change; "
                        f"to train on with other settings start a new run with --init-from {cli.resume}")
    args = argparse.Namespace(**{**vars(build_parser().parse_args([])), **state["config"]})
    for key in ("data_root", "split_dir", "out", "init_from"):
        setattr(args, key, Path(getattr(args, key)) if getattr(args, key) else None)
    for key in RESUMABLE_FLAGS & set(cli.explicit):
        setattr(args, key, getattr(cli, key))
    args.resume, args.explicit = cli.resume, cli.explicit
    return args


def load_resume_state(args: argparse.Namespace) -> tuple[argparse.Namespace, dict | None]:
    """The run's config and state when --resume is given, checked before anything starts."""
    if not args.resume:
        args.device = args.device or "auto"
        return args, None
    last = args.resume.parent / "last.pt"
    if last.is_file() and args.resume.resolve() != last.resolve():  # e.g. best.pt: it would rewind the run
        raise UserError(f"{args.resume}: a run continues from its last.pt, so resume with --resume {last}; to start a "
                        f"new run from this checkpoint's weights, use --init-from {args.resume}")
    state = load_checkpoint(args.resume)
    require_training_state(state, args.resume)
    args = args_from_checkpoint(state, args)
    if state["epoch"] >= args.epochs:
        raise UserError(f"{args.resume}: the run already finished its {args.epochs} epochs; evaluate it with "
                        f"python test.py --checkpoint {args.resume.parent / 'best.pt'}, or train on with a new run: "
                        f"--init-from {args.resume} --epochs N")
    return args, state


def train(args: argparse.Namespace) -> Path:
    """The whole job: data, model, epochs of training and validation, checkpoints. Returns the run folder."""
    validate_args(args)
    args, state = load_resume_state(args)
    with deterministic_algorithms(args.deterministic):
        return train_from(args, state)


def train_from(args: argparse.Namespace, state: dict | None) -> Path:
    """``train`` after the flags are checked: from scratch, or from a resumed run's ``state``."""
    ctx = distributed.setup(args.device)
    if state is not None and state.get("world_size", 1) != ctx.world_size:
        raise UserError(f"{args.resume}: the run trained with {state.get('world_size', 1)} process(es), this resume "
                        f"has {ctx.world_size}; steps per epoch and the schedule depend on it, so resume with "
                        f"torchrun --nproc_per_node={state.get('world_size', 1)} (or start a new run with --init-from)")
    torch.manual_seed(args.seed)
    if args.download and ctx.is_main and state is None:
        from kitti_download import download_kitti
        download_kitti(args.data_root)
    run = TrainingRun(args, ctx, state)
    if ctx.is_main:
        print(run.describe())
    try:
        run.run_epochs()
    finally:
        run.checkpoints.wait()  # the last write is complete (or its error raised) before the run ends
    if ctx.is_main:
        print(f"done: best val mIoU {100 * run.best_miou:.2f}% (19-class benchmark); checkpoints, metrics.csv and "
              f"curves.png in {run.run_dir}\nevaluate with: python test.py --checkpoint {run.run_dir / 'best.pt'}")
    run.close()
    return run.run_dir


DEMO_SCENE_SIZE = (188, 620)  # half KITTI's frame: 4x fewer pixels to learn from and to validate on


def demo_args(args: argparse.Namespace) -> argparse.Namespace:
    """Settings for --demo: 40 half-size synthetic scenes and a short run, about 25 s on 2 CPU cores."""
    from synthetic_kitti import write_synthetic_kitti
    from torchvision.models import ResNet18_Weights
    root = Path(args.demo) if args.demo else Path(tempfile.mkdtemp(prefix="fcn-demo-"))
    print(f"demo: writing 40 SYNTHETIC KITTI-layout scenes of {DEMO_SCENE_SIZE[0]}x{DEMO_SCENE_SIZE[1]} to {root} "
          "(not real KITTI data)")
    write_synthetic_kitti(root, num_train=40, num_test=4, seed=args.seed, size=DEMO_SCENE_SIZE)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    if args.pretrained and not args.backbone_weights and not cached.is_file():
        print(f"demo: no ImageNet weights in {cached.parent}; training from random initialisation")
        args.pretrained = False
    args.data_root = root
    settings = {"epochs": 10, "batch_size": 4, "warmup_epochs": 0.5, "lr": 0.02,
                "crop_size": [160], "base_size": DEMO_SCENE_SIZE[0], "workers": "1", "device": "auto"}
    for name, value in settings.items():
        if name not in args.explicit:  # a flag given with --demo wins over the demo's setting
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.demo is not None:
            args = demo_args(args)
        run_dir = train(args)
        if args.demo is not None:
            import test
            test.main(["--checkpoint", str(run_dir / "best.pt"), "--device", args.device, "--num-visuals", "4"])
            print(f"demo done: checkpoints in {run_dir}, curves in {run_dir / 'curves.png'}, "
                  f"predictions and overlays in {run_dir / 'test_val'}")
    except UserError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:  # before the training loop installs its handler, or a second Ctrl-C
        sys.exit("interrupted; the run folder, if any, keeps its last saved checkpoint")


if __name__ == "__main__":
    main()
