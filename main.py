"""Train FCN-32s / FCN-16s / FCN-8s on KITTI semantics.

    python main.py --arch fcn16                       # one GPU (or the CPU)
    torchrun --nproc_per_node=4 main.py --arch fcn16  # four GPUs, DDP
    python main.py --demo                             # whole loop on synthetic data, no download needed
    python main.py --resume runs/x/last.pt            # continue exactly where a run stopped
"""
# ---- Hyperparameters: edit here, or override with the flag of the same name (--batch-size for BATCH_SIZE) ----
ARCH = "fcn16"                   # fcn32 | fcn16 | fcn8
EPOCHS = 50                      # passes over the training split (160 images for KITTI)
BATCH_SIZE = 8                   # images per step and per process (DDP: total = BATCH_SIZE x processes)
CROP_SIZE = 320                  # square training crop in pixels, taken after random scaling 0.5-2.0
LR = 0.01                        # peak SGD learning rate, reached after warm-up (not scaled with DDP)
MOMENTUM = 0.9                   # SGD momentum
WEIGHT_DECAY = 1e-4              # L2 on all weights
WARMUP_EPOCHS = 1.0              # linear warm-up from 0.1 x LR over this many epochs, then poly decay
POLY_POWER = 0.9                 # lr = LR x (1 - progress) ^ POLY_POWER, stepped every iteration
LABEL_SET = "train"              # train: 19 benchmark classes (others ignored) | full: all 34 label ids
DATA_ROOT = "data/data_semantics"  # folder holding training/ and testing/ (KITTI layout)
OUT_DIR = None                   # run folder; None -> runs/<arch>-<date>-<time>; never overwritten
SEED = 0                         # split, shuffling, augmentation and initialisation
AMP = True                       # CUDA only: bf16 autocast where supported, else fp16 with loss scaling
WORKERS = 2                      # DataLoader processes per training process
PRETRAINED = True                # ImageNet ResNet18 trunk (downloaded once, or --backbone-weights PATH)
CACHE = True                     # decode every PNG once and keep it in memory (about 280 MB for KITTI)
LOG_EVERY = 10                   # steps between loss read-backs / progress lines
# ------------------------------------------------------------------------------------------------------------

import argparse  # noqa: E402
import csv  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import distributed  # noqa: E402
from checkpoint import load_checkpoint, load_model_weights, save_checkpoint  # noqa: E402
from data_preprocessing import KittiSemantics, default_split, list_labelled, resolve_split, train_augmentation, write_split  # noqa: E402,E501
from engine import EpochProgress, NonFiniteLoss, evaluate, train_one_epoch  # noqa: E402
from errors import UserError  # noqa: E402
from labels import get_label_set  # noqa: E402
from metrics import evaluation_report  # noqa: E402
from model import ARCHS, build_model, count_parameters  # noqa: E402
from plots import plot_curves  # noqa: E402
from samplers import SeededTrainSampler, ShardSampler  # noqa: E402

HISTORY_FIELDS = ("epoch", "lr", "train_loss", "val_loss", "val_mIoU", "pixel_acc", "seconds", "data_wait",
                  "val_seconds", "peak_gpu_mb")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=ARCH, choices=ARCHS, help="(default %(default)s)")
    for name, value, kind in (("epochs", EPOCHS, int), ("batch-size", BATCH_SIZE, int), ("crop-size", CROP_SIZE, int),
                              ("lr", LR, float), ("momentum", MOMENTUM, float), ("weight-decay", WEIGHT_DECAY, float),
                              ("warmup-epochs", WARMUP_EPOCHS, float), ("poly-power", POLY_POWER, float),
                              ("seed", SEED, int), ("workers", WORKERS, int), ("log-every", LOG_EVERY, int)):
        p.add_argument(f"--{name}", type=kind, default=value, help="(default %(default)s)")
    p.add_argument("--label-set", default=LABEL_SET, choices=("train", "full"), help="(default %(default)s)")
    p.add_argument("--data-root", type=Path, default=Path(DATA_ROOT), help="(default %(default)s)")
    p.add_argument("--download", action="store_true", help="download KITTI into --data-root first")
    p.add_argument("--split-dir", type=Path, help="folder with train.txt/val.txt (default: 160/40 split by --seed)")
    p.add_argument("--out", type=Path, default=OUT_DIR, help="run folder (default runs/<arch>-<time>)")
    p.add_argument("--resume", type=Path, help="continue a run from its last.pt (config comes from the checkpoint)")
    p.add_argument("--init-from", type=Path, help="start from a coarser model's checkpoint (FCN32s -> FCN16s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default %(default)s)")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false", default=PRETRAINED,
                   help="random trunk instead of ImageNet weights")
    p.add_argument("--backbone-weights", help="ResNet18 ImageNet state_dict file, for machines without internet")
    p.add_argument("--no-amp", dest="amp", action="store_false", default=AMP, help="float32 on CUDA")
    p.add_argument("--no-cache", dest="cache", action="store_false", default=CACHE, help="decode PNGs every epoch")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across DDP processes")
    p.add_argument("--demo", nargs="?", const="", metavar="DIR",
                   help="write a synthetic KITTI tree (to DIR or a temp folder) and run a short CPU-friendly training")
    return p.parse_args(argv)


def prepare_run_dir(args: argparse.Namespace) -> Path:
    out = args.out or Path("runs") / f"{args.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()):
        raise UserError(f"run folder {out} already exists and is not empty; pass a new --out, "
                        f"or --resume {out / 'last.pt'} to continue it")
    out.mkdir(parents=True, exist_ok=True)
    return out


def make_loaders(args: argparse.Namespace, ctx: distributed.Context, run_dir: Path):
    """Training loader (seeded sampler, augmentation) and validation loader (full images, no padding)."""
    if args.split_dir is None and ctx.is_main:
        write_split(default_split(list_labelled(args.data_root)), run_dir)
    label_set = get_label_set(args.label_set)
    train_set = KittiSemantics(args.data_root, resolve_split(args.data_root, "train", args.split_dir), label_set,
                               train_augmentation(args.crop_size), cache=args.cache)
    val_set = KittiSemantics(args.data_root, resolve_split(args.data_root, "val", args.split_dir), label_set,
                             cache=args.cache)
    if len(train_set) < args.batch_size * ctx.world_size:
        raise UserError(f"{args.data_root}: {len(train_set)} training images are fewer than one batch "
                        f"({args.batch_size} x {ctx.world_size} processes); lower --batch-size")
    sampler = SeededTrainSampler(len(train_set), args.seed, ctx.rank, ctx.world_size)
    common = dict(num_workers=args.workers, pin_memory=ctx.device.type == "cuda", persistent_workers=args.workers > 0)
    train_loader = DataLoader(train_set, args.batch_size, sampler=sampler, drop_last=True, **common)
    val_loader = DataLoader(val_set, 1, sampler=ShardSampler(len(val_set), ctx.rank, ctx.world_size), **common)
    return train_loader, val_loader, sampler


def warmup_poly(step: int, warmup: int, total: int, power: float) -> float:
    """LR multiplier at ``step``: linear from 0.1 to 1 over ``warmup`` steps, then (1 - progress) ^ power to 0."""
    if step < warmup:
        return 0.1 + 0.9 * step / warmup
    return max(0.0, 1 - (step - warmup) / max(1, total - warmup)) ** power


def make_optimization(model: torch.nn.Module, args: argparse.Namespace, steps_per_epoch: int):
    """SGD with momentum, and one LambdaLR stepped every iteration: its whole state is the step count, so a
    resume restores the schedule exactly on any torch version (SequentialLR's restore has varied)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    total = args.epochs * steps_per_epoch
    warmup = min(max(1, round(args.warmup_epochs * steps_per_epoch)), total - 1)

    def multiplier(step: int) -> float:
        return warmup_poly(step, warmup, total, args.poly_power)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def make_model(args: argparse.Namespace, ctx: distributed.Context) -> torch.nn.Module:
    model = build_model(args.arch, get_label_set(args.label_set).num_classes, args.pretrained and not args.resume,
                        args.backbone_weights)
    if args.init_from and not args.resume:  # a resumed run's checkpoint already holds these weights
        state = load_checkpoint(args.init_from)
        if state["num_classes"] != get_label_set(args.label_set).num_classes:
            raise UserError(f"{args.init_from}: has {state['num_classes']} classes, this run {args.label_set!r} needs "
                            f"{get_label_set(args.label_set).num_classes}; pass a matching --label-set")
        missing, unexpected = model.load_state_dict(state["model"], strict=False)
        if unexpected:
            raise UserError(f"{args.init_from}: a {state['arch']} cannot initialise a coarser {args.arch}")
        if ctx.is_main:
            print(f"initialised from {args.init_from} ({state['arch']}); new layers: {sorted({k.split('.')[0] for k in missing})}")
    model.to(ctx.device, memory_format=torch.channels_last)
    if args.sync_bn and ctx.world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def write_history(history: list[dict], run_dir: Path) -> None:
    """metrics.csv and curves.png, rewritten from the checkpoint's history (so a resume never duplicates rows)."""
    tmp = run_dir / ".metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(history)
    tmp.replace(run_dir / "metrics.csv")
    plot_curves(history, run_dir / "curves.png")


def epoch_line(row: dict, epochs: int, is_best: bool) -> str:
    line = (f"epoch {row['epoch']}/{epochs}  lr {row['lr']:.2e}  train loss {row['train_loss']:.4f}  val loss "
            f"{row['val_loss']:.4f}  mIoU {100 * row['val_mIoU']:.2f}%  pixel acc {100 * row['pixel_acc']:.2f}%  "
            f"train {row['seconds']:.1f} s (data wait {100 * row['data_wait']:.1f}%)  val {row['val_seconds']:.1f} s")
    if row["peak_gpu_mb"]:
        line += f"  peak GPU {row['peak_gpu_mb']:.0f} MB"
    return line + ("  best" if is_best else "")


def config_of(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def args_from_checkpoint(state: dict, cli: argparse.Namespace) -> argparse.Namespace:
    """The resumed run's config; only the device and the worker count may change."""
    args = argparse.Namespace(**state["config"])
    for key in ("data_root", "split_dir", "out", "init_from", "resume"):
        setattr(args, key, Path(getattr(args, key)) if getattr(args, key) else None)
    args.device, args.workers, args.resume = cli.device, cli.workers, cli.resume
    return args


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def amp_dtype_for(device: torch.device, amp: bool) -> torch.dtype | None:
    """bf16 autocast on CUDA where supported, fp16 (with loss scaling) on older GPUs, none on the CPU."""
    if device.type != "cuda" or not amp:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def restore(state: dict, path: Path, model, optimizer, scheduler, scaler) -> tuple[list, float, int, EpochProgress]:
    """Load a checkpoint's training state; returns (history, best mIoU, epochs done, progress in the next epoch)."""
    load_model_weights(model, state, path)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    return state["history"], state["best_miou"], state["epoch"], EpochProgress(**state["progress"])


def epoch_record(epoch: int, lr: float, progress: EpochProgress, val_loss: float, report: dict, val_seconds: float,
                 device: torch.device) -> dict:
    """One row of metrics.csv."""
    return {"epoch": epoch, "lr": lr, "train_loss": progress.loss_sum / max(progress.step, 1), "val_loss": val_loss,
            "val_mIoU": report["mIoU"], "pixel_acc": report["pixel_acc"], "seconds": progress.seconds,
            "data_wait": progress.data_wait / max(progress.seconds, 1e-9), "val_seconds": val_seconds,
            "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0}


def train(args: argparse.Namespace) -> Path:
    """The whole job: data, model, epochs of training and validation, checkpoints. Returns the run folder."""
    ctx = distributed.setup(args.device)
    state = load_checkpoint(args.resume) if args.resume else None
    if state is not None:
        args = args_from_checkpoint(state, args)
    torch.manual_seed(args.seed)
    if args.download and ctx.is_main:
        from kitti_download import download_kitti
        download_kitti(args.data_root)
    run_dir = args.resume.parent if state else (prepare_run_dir(args) if ctx.is_main else args.out)
    amp_dtype = amp_dtype_for(ctx.device, args.amp)
    torch.backends.cudnn.benchmark = ctx.device.type == "cuda"
    train_loader, val_loader, sampler = make_loaders(args, ctx, run_dir)
    model = make_model(args, ctx)
    optimizer, scheduler = make_optimization(model, args, len(train_loader))
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype == torch.float16)
    history, best_miou, start_epoch, progress = [], -1.0, 0, EpochProgress()
    if state is not None:
        history, best_miou, start_epoch, progress = restore(state, args.resume, model, optimizer, scheduler, scaler)
    if ctx.world_size > 1:
        net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    else:
        net = model
    label_set = get_label_set(args.label_set)
    if ctx.is_main:
        total, trainable = count_parameters(model)
        print(f"{args.arch}: {total / 1e6:.2f} M parameters ({trainable / 1e6:.2f} M trainable), {label_set.num_classes} "
              f"classes, {len(train_loader.dataset)} train / {len(val_loader.dataset)} val images, device {ctx.device}"
              f"{f' x {ctx.world_size}' if ctx.world_size > 1 else ''}, run folder {run_dir}")

    def snapshot(epoch: int) -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch, "progress": vars(progress), "best_miou": best_miou,
                "arch": args.arch, "num_classes": label_set.num_classes, "label_set": args.label_set,
                "config": config_of(args), "history": history, "rng_cpu": torch.get_rng_state()}

    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # cluster pre-emption: save like Ctrl-C
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch, skip=progress.step * args.batch_size)
        try:
            train_one_epoch(net, train_loader, optimizer, scheduler, scaler, ctx.device, amp_dtype, progress,
                            f"epoch {epoch + 1}/{args.epochs}", args.log_every, ctx.is_main)
            val_start = time.perf_counter()
            confusion, val_loss = evaluate(model, val_loader, label_set.num_classes, ctx.device, amp_dtype,
                                           show=ctx.is_main)
        except KeyboardInterrupt:  # mid-epoch state is exact: --resume skips the samples already trained on
            if ctx.is_main:
                save_checkpoint(snapshot(epoch), run_dir / "last.pt")
                print(f"\ninterrupted: saved {run_dir / 'last.pt'} at epoch {epoch + 1} step {progress.step}; "
                      f"continue with: python main.py --resume {run_dir / 'last.pt'}")
            raise SystemExit(130) from None
        except NonFiniteLoss as error:
            raise UserError(f"{error} in epoch {epoch + 1}; {run_dir / 'last.pt'} keeps the last good epoch; "
                            "lower --lr, or try --no-amp") from None
        if not ctx.is_main:
            progress = EpochProgress()
            continue
        report = evaluation_report(confusion.matrix, label_set)
        history.append(epoch_record(epoch + 1, optimizer.param_groups[0]["lr"], progress, val_loss, report,
                                    time.perf_counter() - val_start, ctx.device))
        progress = EpochProgress()
        is_best = report["mIoU"] > best_miou
        best_miou = max(best_miou, report["mIoU"])
        save_checkpoint(snapshot(epoch + 1), run_dir / "last.pt")
        if is_best:
            save_checkpoint(snapshot(epoch + 1), run_dir / "best.pt")
        write_history(history, run_dir)
        print(epoch_line(history[-1], args.epochs, is_best), flush=True)
    if ctx.is_main:
        print(f"done: best val mIoU {100 * best_miou:.2f}%; checkpoints, metrics.csv and curves.png in {run_dir}\n"
              f"evaluate with: python test.py --checkpoint {run_dir / 'best.pt'} --data-root {args.data_root}")
    distributed.cleanup()
    return run_dir


def demo_args(args: argparse.Namespace) -> argparse.Namespace:
    """Settings for --demo: a small synthetic tree and a short run that fits in a few CPU minutes."""
    from synthetic_kitti import write_synthetic_kitti
    from torchvision.models import ResNet18_Weights
    root = Path(args.demo) if args.demo else Path(tempfile.mkdtemp(prefix="fcn-demo-"))
    print(f"demo: writing 40 SYNTHETIC KITTI-layout scenes to {root} (not real KITTI data)")
    write_synthetic_kitti(root, num_train=40, num_test=4, seed=args.seed)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    if args.pretrained and not args.backbone_weights and not cached.is_file():
        print(f"demo: no ImageNet weights in {cached.parent}; training from random initialisation")
        args.pretrained = False
    args.data_root, args.epochs, args.batch_size, args.crop_size, args.warmup_epochs = root, 12, 4, 256, 0.5
    args.lr, args.workers = 0.02, 1
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
    except KeyboardInterrupt:
        sys.exit("interrupted before training started; nothing was saved")


if __name__ == "__main__":
    main()
