"""Speed and memory as ratios measured in one process: FCN heads vs the bare ResNet18 trunk, vs torchvision's
fcn_resnet50, validation vs its forward passes, the exported ONNX file in onnxruntime vs eager PyTorch, the data
pipeline vs the training step, and a whole short run's wall time vs its loops.

    python bench.py                       # CPU
    python bench.py --device cuda --json bench.json

Ratios are what to compare across machines and commits; absolute numbers depend on the machine and its load. A
machine's speed drifts by more than the effects measured here (other processes, clock changes), so the cases that
a ratio compares are timed interleaved: one step of each per round, the order reversed every round (trunk, FCN,
FCN, trunk, ...), so that a slow spell hits both alike. A ratio is the median over the --steps rounds (three
times as many for the trunk/FCN inference group) of the per-round ratios; ``<ratio>_spread`` is half the
interquartile range of those per-round ratios (half the rounds fall within median +- spread), a measure of the
noise of one round, not a confidence interval of the median.
Each case's ms/step is the median of its own steps, after --warmup steps. The ONNX case needs onnxruntime
(requirements-dev.txt) and always runs on the CPU, against eager PyTorch on the CPU.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import onnxruntime
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.models.segmentation import fcn_resnet50

from data_preprocessing import KittiSemantics
from labels import IGNORE_INDEX, get_label_set
from model import ARCHS, ResNet18Trunk, build_model
from segmentation import MAX_SIDE, UserError, require, runtime
from segmentation.augmentation import TrainAugmentation
from segmentation.engine import class_map, predict, score_batch
from segmentation.layouts import get_layout, list_labelled
from segmentation.loading import WORKER_START, SeededTrainSampler
from segmentation.metrics import ConfusionMatrix
from segmentation.runtime import worker_count
from segmentation.synthetic import DEMO_SIZE, write_synthetic_kitti

FULL = (375, 1242)
INFER_ROUNDS_FACTOR = 3  # the inference group runs --steps x this many rounds (a step is ~0.1 s on a CPU)
RATIOS = ("fcn16_train_over_trunk", "fcn16_infer_over_trunk", "fcn16_over_fcn_resnet50",
          "onnxruntime_over_eager_cpu_infer", "fcn16_validate_over_forward", "bf16_speedup_fcn16_train")


def training_data_rates(args) -> dict:
    """Images/s of training batches out of the DataLoader (augmentation in the default number of workers) on
    KITTI-sized synthetic scenes. 32 scenes are repeated to 256 samples an epoch, so that the per-epoch start of
    the iterator does not dominate; two epochs are timed after one that starts the workers.
    """
    root = Path(tempfile.mkdtemp(prefix="bench-kitti-"))
    write_synthetic_kitti(root, num_train=32, seed=0)
    names = list_labelled(root) * 8
    dataset = KittiSemantics(root, names, transform=TrainAugmentation(tuple(args.crop_size)), cache=True)
    log(f"data pipeline, {args.workers} workers")
    return {"loader_img_per_s": loader_rate(dataset, args.batch_size, args.workers, timed_epochs=2)}


def loader_rate(dataset, batch_size: int, workers: int, timed_epochs: int) -> float:
    """Images/s of main.py's training DataLoader over ``dataset``: one epoch starts the workers, then
    ``timed_epochs`` epochs are timed."""
    sampler = SeededTrainSampler(len(dataset), seed=0)
    loader = DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0, multiprocessing_context=WORKER_START if workers else None)
    for _ in loader:
        pass
    start, images = time.perf_counter(), 0
    for epoch in range(1, timed_epochs + 1):
        sampler.set_epoch(epoch)
        images += sum(len(batch[0]) for batch in loader)
    return images / (time.perf_counter() - start)


def cityscapes_loading(args, num_scenes: int = 24) -> dict:
    """Cityscapes at full size (1024x2048): the loader's img/s, uncached as Cityscapes train is (it decodes to
    ~25 GB), with main.py's worker count and with twice as many, against FCN-16s train steps at the default
    512x1024 crop, batch 8 (bf16 on CUDA)."""
    from data_preprocessing import SegmentationDataset
    from segmentation.layouts import resolve_split
    from segmentation.synthetic import write_synthetic_cityscapes
    root = Path(tempfile.mkdtemp(prefix="bench-cityscapes-"))
    log(f"writing {num_scenes} synthetic 1024x2048 Cityscapes scenes")
    write_synthetic_cityscapes(root, num_train=num_scenes, num_val=1, seed=0, size=(1024, 2048))
    cityscapes = get_layout("cityscapes")
    names = resolve_split("cityscapes", root, ("train",)).names["train"]
    dataset = SegmentationDataset("cityscapes", root, names * 2, "train",
                                  TrainAugmentation(cityscapes.crop_size, cityscapes.base_size), cache=False)
    result = {}
    for workers in (args.workers, 2 * args.workers):
        log(f"Cityscapes loader, {workers} workers")
        result[f"cityscapes_loader_img_per_s_{workers}_workers"] = loader_rate(dataset, 8, workers, timed_epochs=1)
    device = torch.device(args.device)
    step = Case(build_model("fcn16", 19, pretrained=False), 8, cityscapes.crop_size, device, device.type == "cuda",
                train=True)
    log("FCN-16s train step, 8x512x1024")
    step_seconds = statistics.median([seconds(step, device) for _ in range(args.warmup + 3)][args.warmup:])
    result["cityscapes_step_img_per_s"] = 8 / step_seconds
    loader = result[f"cityscapes_loader_img_per_s_{args.workers}_workers"]
    result["cityscapes_loader_over_step"] = loader / result["cityscapes_step_img_per_s"]
    return result


def largest_batch(arch: str, device, amp: bool, size=FULL, limit: int = 256) -> int:
    """Largest power-of-two batch whose full-resolution train step fits in GPU memory."""
    batch, fits = 1, 0
    while batch <= limit:
        try:
            Case(build_model(arch, 19, pretrained=False), batch, size, device, amp, train=True)()
            fits = batch
            batch *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    return fits


def onnx_times(args, size: tuple[int, int] = FULL) -> dict[str, list[float]]:
    """The deployed computation (uint8 image -> label ids) of a random fcn16 on the CPU: the file that
    ``export.py`` writes, run in onnxruntime with as many threads, against the same computation in eager PyTorch
    as test.py runs it (channels_last, the model's own stem), timed interleaved."""
    log(f"onnxruntime vs eager, CPU, 1x{size[0]}x{size[1]}")
    label_set = get_label_set("train")
    fcn = build_model("fcn16", label_set.num_classes, pretrained=False).eval()
    folder = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    torch.save({"model": fcn.state_dict(), "arch": "fcn16", "num_classes": label_set.num_classes,
                "label_set": label_set.name}, folder / "fcn16.pt")
    subprocess.run([sys.executable, str(Path(__file__).with_name("export.py")), "--checkpoint",
                    str(folder / "fcn16.pt"), "--out", str(folder / "fcn16.onnx")], check=True, capture_output=True)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(folder / "fcn16.onnx"), options, providers=["CPUExecutionProvider"])
    image = torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8)
    fcn = fcn.to(memory_format=torch.channels_last)
    class_to_id = torch.from_numpy(label_set.class_to_id.copy())

    def eager() -> None:
        with torch.inference_mode():
            class_to_id[class_map(predict(fcn, image, torch.device("cpu")))]
    steps = {"eager cpu": eager, "onnxruntime cpu": lambda: session.run(None, {"image": image.numpy()})}
    return warmed_interleaved_seconds(steps, torch.device("cpu"), args.warmup, args.steps)


def validation_times(args, device: torch.device, size: tuple[int, int] = FULL) -> dict[str, list[float]]:
    """FCN-16s validation of one full-size image as ``engine.evaluate`` does it (forward, loss, class map,
    confusion matrix, the running loss and pixel count), and its forward pass alone (``engine.predict``), timed
    interleaved."""
    log(f"validation vs forward, 1x{size[0]}x{size[1]}")
    net = build_model("fcn16", 19, pretrained=False).to(device, memory_format=torch.channels_last).eval()
    image = torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8)
    labels = torch.randint(0, 19, (1, *size), dtype=torch.uint8)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    confusion = ConfusionMatrix(19, device)
    loss_and_count = torch.zeros(2, dtype=torch.float64, device=device)

    @torch.no_grad()
    def validate() -> None:
        target = labels.to(device).long()
        loss, prediction = score_batch(predict(net, image, device, amp_dtype), target)
        loss_and_count[0] += loss
        loss_and_count[1] += (target != IGNORE_INDEX).sum()
        confusion.update(prediction, target)

    forward = torch.no_grad()(lambda: predict(net, image, device, amp_dtype))
    steps = {"fcn16 validate": validate, "fcn16 forward": forward}
    return warmed_interleaved_seconds(steps, device, args.warmup, args.steps * INFER_ROUNDS_FACTOR)


def wall_over_compute(args, epochs: int = 6) -> dict:
    """Wall time of a whole short ``main.py`` run (a fresh process: imports, data, checkpoints and plots
    included) over its training + validation loop time, from metrics.csv. 1.0 would mean no overhead.

    The tree is KITTI-shaped and small enough for a CPU: 30 labelled scenes at half KITTI size (24 train,
    6 val), crops of 160, batch 4; on CUDA, KITTI-size scenes and the default crop."""
    import csv
    half = args.device == "cpu"
    root = Path(tempfile.mkdtemp(prefix="bench-wall-"))
    write_synthetic_kitti(root / "data", num_train=30, seed=0, size=DEMO_SIZE if half else None)
    command = [sys.executable, str(Path(__file__).with_name("main.py")), "--no-pretrained", "--device", args.device,
               "--data-root", str(root / "data"), "--out", str(root / "run"), "--epochs", str(epochs), "--workers",
               str(args.workers), "--batch-size", "4" if half else str(args.batch_size)]
    command += ["--crop-size", "160", "--base-size", str(DEMO_SIZE[0])] if half else []
    log(f"a {epochs}-epoch main.py run on {root / 'data'}")
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    wall = time.perf_counter() - start
    rows = list(csv.DictReader(open(root / "run" / "metrics.csv")))
    compute = sum(float(r["seconds"]) + float(r["val_seconds"]) for r in rows)
    return {"wall_over_compute": wall / compute, "wall_seconds": wall, "loop_seconds": compute,
            "wall_run_epochs": epochs}


def group_specs(args, device: torch.device, mode: str) -> list[tuple]:
    """The cases timed together in one mode: trunk and every FCN (train: also fcn_resnet50), every precision."""
    crop, train = tuple(args.crop_size), mode == "train"
    size, batch = (crop, args.batch_size) if train else (FULL, 1)
    specs = []
    for amp in ([False, True] if device.type == "cuda" else [False]):
        specs.append(("trunk", mode, ResNet18Trunk, batch, size, amp, True))
        specs += [(arch, mode, lambda a=arch: build_model(a, 19, pretrained=False), batch, size, amp, False)
                  for arch in args.arch]
        if train:
            specs.append(("fcn_resnet50", mode, lambda: fcn_resnet50(weights=None, weights_backbone=None,
                                                                    num_classes=19, aux_loss=False),
                          batch, size, amp, False))
    return specs


def run(args) -> dict:
    device = torch.device(args.device)
    amp = device.type == "cuda"  # the ratios are taken in the precision main.py trains in
    suffix, crop = " bf16" if amp else "", f"{args.batch_size}x{args.crop_size[0]}x{args.crop_size[1]}"
    rows, times = [], {**onnx_times(args), **validation_times(args, device)}
    for mode in ("train", "infer"):  # inference steps are short: more rounds cost little and steady the ratio
        rounds = args.steps * (INFER_ROUNDS_FACTOR if mode == "infer" else 1)
        group_rows, group_times = time_group(group_specs(args, device, mode), device, args.warmup, rounds)
        rows, times = rows + group_rows, {**times, **group_times}
    pairs = {
        "fcn16_train_over_trunk": (f"fcn16 train {crop}{suffix}", f"trunk train {crop}{suffix}"),
        "fcn16_infer_over_trunk": (f"fcn16 infer 1x375x1242{suffix}", f"trunk infer 1x375x1242{suffix}"),
        "fcn16_over_fcn_resnet50": (f"fcn_resnet50 train {crop}{suffix}", f"fcn16 train {crop}{suffix}"),
        "onnxruntime_over_eager_cpu_infer": ("onnxruntime cpu", "eager cpu"),
        "fcn16_validate_over_forward": ("fcn16 validate", "fcn16 forward"),
    }
    if amp:
        pairs["bf16_speedup_fcn16_train"] = (f"fcn16 train {crop}", f"fcn16 train {crop} bf16")
        rows += time_group([("fcn16", "train", lambda: build_model("fcn16", 19, pretrained=False), 8, FULL, True,
                             False)], device, args.warmup, args.steps)[0]
    result = {
        "device": torch.cuda.get_device_name(device) if amp else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "batch_size": args.batch_size,
        "crop_size": args.crop_size, "workers": args.workers, "steps": args.steps,
        "infer_rounds": args.steps * INFER_ROUNDS_FACTOR, "warmup": args.warmup,
        "onnx_cpu_ms": {name: 1000 * statistics.median(times[name]) for name in ("eager cpu", "onnxruntime cpu")},
    }
    for key, (numerator, denominator) in pairs.items():
        result[key], result[f"{key}_spread"] = paired_ratio(times[numerator], times[denominator])
    fcn16_step_rate = args.batch_size / statistics.median(times[pairs["fcn16_train_over_trunk"][0]])
    rates = training_data_rates(args)
    result.update(rates, loader_over_step=rates["loader_img_per_s"] / fcn16_step_rate, rows=rows)
    result.update(wall_over_compute(args))
    if args.cityscapes:
        result.update(cityscapes_loading(args))
    if amp:
        result["largest_full_res_batch_fcn16_bf16"] = largest_batch("fcn16", device, True)
    return result


def print_table(result: dict) -> None:
    print(f"device: {result['device']}, torch {result['torch']}, onnxruntime {result['onnxruntime']}")
    print(f"{'network':<14}{'mode':<7}{'input':<16}{'bf16':<6}{'ms/step':>9}{'img/s':>9}{'peak MB':>9}")
    for r in result["rows"]:
        shape = f"{r['batch']}x{r['size'][0]}x{r['size'][1]}"
        print(f"{r['name']:<14}{r['mode']:<7}{shape:<16}{'yes' if r['bf16'] else 'no':<6}{r['ms']:>9.1f}"
              f"{r['img_per_s']:>9.1f}{r['peak_mb']:>9.0f}")
    ms = result["onnx_cpu_ms"]
    print(f"deploy 1x375x1242 on the CPU: eager {ms['eager cpu']:.1f} ms, onnxruntime {ms['onnxruntime cpu']:.1f} ms")
    for key in RATIOS:
        if key in result:
            print(f"{key:<36}{result[key]:.3f} +- {result[f'{key}_spread']:.3f}")
    for key in ["loader_over_step", "loader_img_per_s",
                "wall_over_compute", "wall_seconds", "loop_seconds",
                "largest_full_res_batch_fcn16_bf16"] + [k for k in result if k.startswith("cityscapes_")]:
        if key in result:
            print(f"{key:<36}{result[key]:.3f}" if isinstance(result[key], float) else f"{key:<36}{result[key]}")


def check(args: argparse.Namespace) -> None:
    """Every number in range before anything is built, each mistake one line."""
    require(args.batch_size >= 1, "--batch-size", args.batch_size, "1 or more")
    require(all(32 <= side <= MAX_SIDE for side in args.crop_size), "--crop-size", args.crop_size,
            f"H W, each 32 to {MAX_SIDE} pixels")
    require(args.workers >= 0, "--workers", args.workers, "0 or more")
    require(args.steps >= 2, "--steps", args.steps, "2 or more: a ratio's spread needs two rounds")
    require(args.warmup >= 0, "--warmup", args.warmup, "0 or more")
    runtime.pick_device(args.device)


# --- the timing harness: a slow spell of the machine hits every case of an interleaved group alike ---------------

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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--batch-size", type=int, default=8, help="training batch (default %(default)s, main.py's)")
    p.add_argument("--crop-size", type=int, nargs=2, default=list(get_layout("kitti").crop_size),
                   metavar=("H", "W"), help="training crop (default: main.py's for KITTI, %(default)s)")
    p.add_argument("--workers", type=int, default=worker_count("auto", 1),
                   help="DataLoader workers (default: main.py's)")
    p.add_argument("--steps", type=int, default=10, help="interleaved rounds timed; trunk/FCN inference: 3x as many "
                   "(default %(default)s)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cityscapes", action="store_true", help="also time Cityscapes-size loading against a 512x1024 "
                   "train step (writes 24 full-size synthetic scenes first)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    try:
        check(args)
    except UserError as error:
        sys.exit(f"error: {error}")
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    result = run(args)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
