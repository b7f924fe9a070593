"""Train FCN-32s / FCN-16s / FCN-8s on KITTI semantics: the recipe, top to bottom in ``train``.

    python main.py --arch fcn16                       # one GPU (or the CPU)
    torchrun --nproc_per_node=4 main.py --arch fcn16  # four GPUs, DDP
    python main.py --demo                             # whole loop on synthetic data, no download needed
    python main.py --resume runs/x/last.pt            # continue exactly where a run stopped
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from data_preprocessing import download_kitti
from labels import LabelSet, get_label_set
from model import build_model, count_parameters
from segmentation import UserError, error_line, quoted, runtime
from segmentation.checkpoint import (
    CheckpointWriter,
    best_epoch,
    initialise_from,
    label_set_of,
    non_finite,
    republish_best,
    restore,
    save_checkpoint,
)
from segmentation.engine import (
    EpochProgress,
    NonFiniteLoss,
    Stage,
    autocast,
    epoch_lr,
    evaluate,
    make_optimizer,
    segmentation_loss,
    stage_of,
    stage_plan,
    to_model_input,
    train_one_epoch,
)
from segmentation.layouts import write_split
from segmentation.loading import StartedEpoch, make_loaders
from segmentation.metrics import evaluation_report
from segmentation.records import (
    HistoryWriter,
    TensorBoardLog,
    claimed_run_dir,
    epoch_line,
    epoch_record,
    plan_run_dir,
)
from segmentation.settings import SETTINGS, add_flags, check_args, load_resume_state

# ---- Hyperparameters: edit here, or override with the flag of the same name (--batch-size for BATCH_SIZE) ----
ARCH = "fcn16"                   # fcn32 | fcn16 | fcn8
DATASET = "kitti"                # kitti | cityscapes (official layout; see docs/datasets.md)
EPOCHS = 50                      # passes over the training split (160 images for KITTI), all stages together
STAGES = ()                      # resolution stages first: (scale, epochs) pairs, e.g. ((0.5, 30),) trains 30 epochs at
                                 # half scale (scored once, at their end), then the rest of EPOCHS at full scale
BATCH_SIZE = 8                   # images per step and per process (DDP: total = BATCH_SIZE x processes)
CROP_SIZE = None                 # training crop, H or (H, W) pixels; None: the dataset's (segmentation/layouts.py)
BASE_SIZE = None                 # scaling draws the shorter side from 0.5-2.0 x this; None: the dataset's
LR = 0.01                        # peak SGD learning rate, reached after warm-up (not scaled with DDP)
MOMENTUM = 0.9                   # SGD momentum, in [0, 1)
WEIGHT_DECAY = 1e-4              # L2 on convolution weights (not on BatchNorm, biases or the x2 upsampling)
WARMUP_EPOCHS = 1.0              # linear warm-up from 0.1 x LR over this many epochs, then poly decay
POLY_POWER = 0.9                 # lr = LR x (1 - progress) ^ POLY_POWER, stepped every iteration
LABEL_SET = "train"              # train: 19 benchmark classes (others ignored) | full: 34 ids | a class table .csv
CLASS_WEIGHTS = "none"           # none | median-freq (SegNet) | log (ENet): cross-entropy weights from the train labels
DATA_ROOT = "data/data_semantics"  # KITTI: folder holding training/ and testing/; Cityscapes: leftImg8bit/ and gtFine/
OUT = None                       # run folder; None -> runs/<arch>-<date>-<time>; never overwritten
SEED = 0                         # shuffling, augmentation and initialisation (the train/val split is fixed)
AMP = True                       # CUDA only: bf16 autocast where supported, else fp16 with loss scaling
DETERMINISTIC = False            # CUDA: deterministic kernels, a resumed run bit-identical to an unbroken one; slower
WORKERS = "auto"                 # DataLoader processes per training process: a number, or auto (from the CPU count)
PRETRAINED = True                # ImageNet ResNet18 trunk (downloaded once, or --backbone-weights PATH)
CACHE_GB = None                  # keep decoded images in memory up to this size; None: half the free memory; 0: off
LOG_EVERY = 10                   # steps between loss read-backs / progress lines
# ------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The block's settings as flags (segmentation/settings.py declares each), then the flags of one run alone."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, {name: globals()[name.upper()] for name in SETTINGS})
    p.add_argument("--download", action="store_true", help="download KITTI into --data-root first")
    p.add_argument("--split-dir", type=Path, help="folder with train.txt/val.txt (default: the data root's own "
                   "splits/ folder, else KITTI's fixed 80/20 split or Cityscapes' official one, less splits/test.txt)")
    p.add_argument("--resume", type=Path, help="continue a run from its last.pt (config comes from the checkpoint)")
    p.add_argument("--init-from", type=Path, help="start from a checkpoint's weights: the same architecture "
                   "(fine-tuning, e.g. Cityscapes -> KITTI) or a coarser one (FCN32s -> FCN16s)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default auto; on --resume the run's)")
    p.add_argument("--backbone-weights", help="ResNet18 ImageNet state_dict file, for machines without internet")
    p.add_argument("--no-cache", dest="cache_gb", action="store_const", const=0.0, help="decode PNGs every epoch")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across DDP processes")
    p.add_argument("--demo", nargs="?", const="", metavar="DIR",
                   help="write a synthetic KITTI tree (to DIR or a temp folder) and run a short CPU-friendly training")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with ``explicit``: the names of those given on the command line (for --resume's contract).
    argparse leaves alone what a namespace already holds, so parsing ``argv`` again into one that holds a marker
    for every name shows which names the command line set."""
    parser, unset = build_parser(), object()
    args = parser.parse_args(argv)
    given = parser.parse_args(argv, argparse.Namespace(**{name: unset for name in vars(args)}))
    args.explicit = sorted(name for name, value in vars(given).items() if value is not unset)
    return args


def train(args: argparse.Namespace) -> Path:
    """The recipe: settings, data, model, optimiser and schedule, resume, then the epochs. Returns the run folder;
    an interrupted run exits with status 130 once last.pt holds its state."""
    # 0. settings (a resumed run's come from its checkpoint), processes and seeds, the run folder (planned, not made)
    check_args(args)
    args, state = load_resume_state(args, defaults=build_parser().parse_args([]))
    ctx = set_up_processes(args, state)
    if args.download and ctx.is_main and state is None:
        download_kitti(args.data_root)
    run_dir = runtime.on_main_rank(ctx, lambda: plan_run_dir(args.out, args.arch, args.resume if state else None))

    # 1. data: the classes (a resumed run's own table), the resolution stages, the split, the loaders, the class weights
    label_set = label_set_of(state) if state else get_label_set(args.label_set)
    plan = stage_plan(args.stages, args.epochs)
    data = make_loaders(args, ctx, run_dir, label_set, plan, state)
    class_weights = None if data.class_weights is None else data.class_weights.to(ctx.device)

    # 2. model
    model = make_model(args, ctx, label_set, state)
    net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None) \
        if ctx.world_size > 1 else model

    # 3. optimiser, schedule, mixed precision, and the training step they make
    steps_per_epoch = len(data.train_loader)  # a whole epoch's: a mid-epoch resume shortens the loader's length later
    optimizer, scheduler = make_optimizer(model, args, plan, steps_per_epoch)
    amp_dtype = runtime.amp_dtype_for(ctx.device, args.amp)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype == torch.float16)

    def train_step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One SGD step on a uint8 batch; returns the (device) loss, the cross-entropy over valid pixels (weighted by
        the class weights where the run has them)."""
        target = labels.to(ctx.device, non_blocking=True).long()
        with autocast(ctx.device, amp_dtype):
            logits = net(to_model_input(images, ctx.device))
        loss = segmentation_loss(logits.float(), target, class_weights)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        return loss

    # 4. resume: weights, optimiser, schedule, RNG state, history, and how far the interrupted epoch got
    history, best_miou, start_epoch, progress = [], -1.0, 0, EpochProgress()
    if state is not None:
        restore(state, args.resume, model, optimizer, scheduler, scaler)
        if ctx.device.type == "cuda" and state.get("rng_cuda") is not None:  # e.g. a dropout added to model.py
            torch.cuda.set_rng_state(state["rng_cuda"], ctx.device)
        history, best_miou, start_epoch = state["history"], state["best_miou"], state["epoch"]
        progress = EpochProgress(**state["progress"])
        if args.warmup_epochs == 0 and history and not math.isclose(history[0]["lr"], epoch_lr(
                scheduler, 0, steps_per_epoch), rel_tol=1e-9):  # logged before WARMUP_EPOCHS = 0 meant none
            raise UserError(f"{args.resume}: the run started when WARMUP_EPOCHS = 0 still meant one warm-up step, so "
                            "it cannot continue on today's schedule; finish it with the version it started with, or "
                            f"start a new run from its weights with --init-from {quoted(args.resume)}")
    if ctx.is_main:
        print(describe(args, model, label_set, data.summary, ctx, run_dir))

    def snapshot(epoch: int) -> dict:
        """Everything --resume needs to continue exactly, after ``epoch`` finished epochs (plus ``progress``)."""
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch, "progress": vars(progress), "best_miou": best_miou,
                "arch": args.arch, "num_classes": label_set.num_classes, "label_set": str(args.label_set),
                "label_table": label_set.to_dict(), "world_size": ctx.world_size, "class_weights": data.class_weights,
                "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "explicit"},
                "history": history, "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(ctx.device) if ctx.device.type == "cuda" else None}

    # 5. epochs: train -> validate -> keep (last.pt, best.pt) -> record, each a helper below
    checkpoints, history_writer, stopped = CheckpointWriter(), HistoryWriter(run_dir, label_set.class_names), None
    tensorboard = TensorBoardLog(run_dir, label_set, start_epoch)  # where the tensorboard package is installed
    batches = StartedEpoch(data.train_loader, data.sampler, start_epoch, skip=progress.step * args.batch_size)

    def validate(epoch: int, stage: Stage) -> tuple[dict | None, float, float]:
        """The validation report (None for a final fit without val images, an epoch a reduced stage does not score,
        or a DDP validation a stop cut short), its loss and seconds. Every rank holds the summed confusion matrix
        and rank 0's BatchNorm statistics, so every rank draws the same conclusions."""
        runtime.broadcast_buffers(model)  # rank 0's statistics are the ones saved and scored
        if data.val_loader is None or (stage.scale != 1 and epoch + 1 < stage.end):  # never chosen: scored at its end
            return None, math.nan, 0.0
        start = time.perf_counter()
        cut = (lambda: stop.requested) if ctx.world_size > 1 else None  # torchrun kills soon after a signal
        confusion, val_loss = evaluate(model, data.val_loader, label_set.num_classes, ctx.device, amp_dtype,
                                       show=ctx.is_main, class_weights=class_weights, zoom=stage.scale, until=cut,
                                       on_prediction=tensorboard.keep_overlays(data.val_loader)
                                       if ctx.is_main and stage.scale == 1 else None)
        if cut and runtime.on_any_rank(stop.requested, ctx.device):  # a rank stopped early: the epoch goes unscored
            return None, math.nan, time.perf_counter() - start
        report = evaluation_report(confusion.matrix, label_set)
        if math.isnan(report["benchmark_mIoU"]):
            raise UserError(f"{args.data_root}: the validation images hold no pixel of a scored class "
                            "(every label is ignored or void), so no model can be scored; check the val labels")
        return report, val_loss, time.perf_counter() - start

    def diverged(what: str, finished: int) -> UserError:
        """The line for a run whose loss or weights became non-finite, saying what last.pt keeps."""
        runtime.on_main_rank(ctx, checkpoints.wait, share=False)
        kept = (f"{run_dir / 'last.pt'} keeps epoch {finished}, the last whose weights were finite" if finished
                else "no checkpoint was saved before it")
        return UserError(f"{what}; {kept}; lower --lr, or try --no-amp")

    def keep_and_record(epoch: int, trained: EpochProgress, report: dict | None, val_loss: float, seconds: float,
                        scale: float) -> None:
        """Rank 0: last.pt, and best.pt for the best full-scale epoch (a final fit's: its last), then the records."""
        nonlocal best_miou
        history.append(epoch_record(epoch + 1, epoch_lr(scheduler, epoch, steps_per_epoch), trained, val_loss,
                                    report, seconds, ctx.device, scale))
        is_best = best_epoch(history, args.epochs, final_fit=data.val_loader is None) == epoch + 1
        best_miou = history[-1]["val_mIoU"] if is_best else best_miou
        checkpoints.submit(snapshot(epoch + 1), run_dir / "last.pt", run_dir / "best.pt" if is_best else None)
        history_writer.write(history, final=epoch + 1 == args.epochs)
        tensorboard.epoch(history[-1])
        print(epoch_line(history[-1], args.epochs, is_best), flush=True)

    # the folder is made only now that data, model and resume state are checked; rank 0 holds its lock till the end
    with claimed_run_dir(ctx, run_dir, new=state is None), runtime.StopRequest(ctx.device, ctx.world_size) as stop:
        if ctx.is_main and state is None:
            write_split(data.split, run_dir)
        elif ctx.is_main:
            republish_best(run_dir, state)
        for epoch in range(start_epoch, args.epochs):
            stage = stage_of(plan, epoch)  # the sampler hands this epoch's samples stage.scale
            try:
                finished = train_one_epoch(net, train_step, batches, progress, stop, f"epoch {epoch + 1}/{args.epochs}",
                                           args.log_every, ctx.is_main)
            except NonFiniteLoss as error:
                raise diverged(f"{error} in epoch {epoch + 1}", epoch) from None
            if not finished:  # Ctrl-C or SIGTERM inside the epoch
                stopped = f"at epoch {epoch + 1} step {progress.step}"
                break
            if epoch + 1 < args.epochs:  # the loader workers prepare the next epoch while this one validates
                batches = StartedEpoch(data.train_loader, data.sampler, epoch + 1)
            trained, progress = progress, EpochProgress()
            report, val_loss, seconds = validate(epoch, stage)
            broken = non_finite(model)  # e.g. BatchNorm statistics overflowed, the loss finite; the same on every rank
            if broken:
                raise diverged(f"epoch {epoch + 1} left {broken} with NaN or infinite values", epoch)
            # rank 0 writes; a write that failed (a full disk) stops every rank with its line
            runtime.on_main_rank(ctx, lambda: keep_and_record(epoch, trained, report, val_loss, seconds, stage.scale),
                                 share=False)
            if stop.agreed() and epoch + 1 < args.epochs:  # a signal during validation: stop after the epoch
                stopped = f"after epoch {epoch + 1}"
                break

        # 6. the last write finishes (or its error is raised); an interrupted run saves where it stands, and exits 130
        runtime.on_main_rank(ctx, checkpoints.wait, share=False)
        tensorboard.close()
        if stopped and ctx.is_main:
            if progress.step:  # inside an epoch: the finished steps are saved now
                save_checkpoint(snapshot(epoch), run_dir / "last.pt")
            history_writer.write(history, final=True)
            print(f"\ninterrupted: saved {run_dir / 'last.pt'} {stopped}; continue with: python main.py --resume "
                  f"{quoted(run_dir / 'last.pt')}", flush=True)
        elif ctx.is_main:
            scored = "19-class benchmark" if label_set.class_to_train_id is not None else label_set.source
            chosen = f"best val mIoU {100 * best_miou:.2f}% ({scored})" if data.val_loader else \
                "no validation: best.pt is the last epoch"
            print(f"done: {chosen}; checkpoints, metrics.csv and curves.png in {run_dir}\nevaluate with: "
                  f"python test.py --checkpoint {quoted(run_dir / 'best.pt')}", flush=True)
    net = train_step = None  # DDP's wrapper must be freed before the process group is left (runtime.cleanup)
    runtime.cleanup()
    if stopped:
        raise SystemExit(130)
    return run_dir


def set_up_processes(args: argparse.Namespace, state: dict | None) -> runtime.Context:
    """This process's device and place among the DDP processes, its seed, and --deterministic's kernels."""
    ctx = runtime.setup(args.device)
    if state is not None and state.get("world_size", 1) != ctx.world_size:
        raise UserError(f"{args.resume}: the run trained with {state.get('world_size', 1)} process(es), this resume "
                        f"has {ctx.world_size}; steps per epoch and the schedule depend on it, so resume with "
                        f"torchrun --nproc_per_node={state.get('world_size', 1)} (or start a new run with --init-from)")
    torch.manual_seed(args.seed)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reads it before its first matmul
    torch.use_deterministic_algorithms(args.deterministic)  # an op with no deterministic kernel raises
    torch.backends.cudnn.benchmark = ctx.device.type == "cuda" and not args.deterministic
    return ctx


def make_model(args: argparse.Namespace, ctx: runtime.Context, label_set: LabelSet,
               state: dict | None) -> torch.nn.Module:
    """The FCN on ``ctx.device``: ImageNet trunk for a new run, --init-from's weights, or (resuming) whatever the
    checkpoint's weights will overwrite."""
    fresh_trunk = state is None and not args.init_from
    model = build_model(args.arch, label_set.num_classes, args.pretrained and fresh_trunk,
                        args.backbone_weights if fresh_trunk else None)
    if args.init_from and state is None:
        message = initialise_from(model, args.init_from, args.arch, label_set)
        if ctx.is_main:
            print(message)
    model.to(ctx.device, memory_format=torch.channels_last)
    if args.sync_bn and ctx.world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def describe(args, model, label_set, data_summary: str, ctx: runtime.Context, run_dir: Path) -> str:
    total, trainable = count_parameters(model)
    processes = f" x {ctx.world_size}" if ctx.world_size > 1 else ""
    return (f"{args.arch}: {total / 1e6:.2f} M parameters ({trainable / 1e6:.2f} M trainable), "
            f"{label_set.num_classes} classes (label set {label_set.name}), {data_summary}, device {ctx.device}"
            f"{processes}, precision {runtime.precision_name(runtime.amp_dtype_for(ctx.device, args.amp))} (training "
            f"and validation), run folder {run_dir}")


def demo_args(args: argparse.Namespace) -> argparse.Namespace:
    """Settings for --demo: 40 half-size synthetic scenes and a short run, about 25 s on 2 CPU cores."""
    from torchvision.models import ResNet18_Weights

    from segmentation.synthetic import DEMO_SIZE, write_synthetic_kitti
    root = Path(args.demo) if args.demo else Path(tempfile.mkdtemp(prefix="fcn-demo-"))
    print(f"demo: writing 40 SYNTHETIC KITTI-layout scenes of {DEMO_SIZE[0]}x{DEMO_SIZE[1]} to {root} "
          "(not real KITTI data)")
    write_synthetic_kitti(root, num_train=40, num_test=4, seed=args.seed, size=DEMO_SIZE)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    if args.pretrained and not args.backbone_weights and not cached.is_file():
        print(f"demo: no ImageNet weights in {cached.parent}; training from random initialisation")
        args.pretrained = False
    args.data_root = root
    settings = {"epochs": 10, "batch_size": 4, "warmup_epochs": 0.5, "lr": 0.02,
                "crop_size": 160, "base_size": DEMO_SIZE[0], "workers": 1, "device": "auto"}
    for name, value in settings.items():
        if name not in args.explicit:  # a flag given with --demo wins over the demo's setting
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        with runtime.interrupts_end_in_one_line("the run folder, if any, keeps its last saved checkpoint"):
            if args.demo is not None:
                args = demo_args(args)
            run_dir = train(args)
            if args.demo is not None:
                evaluation = subprocess.run([sys.executable, str(Path(__file__).with_name("test.py")), "--checkpoint",
                                             str(run_dir / "best.pt"), "--device", args.device, "--num-visuals", "4"])
                if evaluation.returncode:
                    sys.exit(evaluation.returncode)
                print(f"demo done: checkpoints in {run_dir}, curves in {run_dir / 'curves.png'}, "
                      f"predictions and overlays in {run_dir / 'test_val'}")
    except (UserError, OSError) as error:  # OSError: a folder or disk that fails mid-run; checkpoints are kept
        line = error_line(error)
    except RuntimeError as error:
        if "deterministic implementation" not in str(error):
            raise
        operation = str(error).strip().splitlines()[0].split(". ")[0]
        line = (f"error: --deterministic: {operation} (PyTorch {torch.__version__}); run (or --resume) with "
                "--no-deterministic, which keeps everything exact except the last bits on CUDA")
    else:
        return
    runtime.cleanup(after_failure=True)  # the error's frames are gone now, DDP's wrapper with them
    sys.exit(line)


if __name__ == "__main__":
    main()
