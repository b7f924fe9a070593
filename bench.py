"""Speed and memory as ratios measured in one process: FCN heads vs the bare ResNet18 trunk, vs torchvision's
fcn_resnet50, and the training data pipeline vs the training step.

    python bench.py                       # CPU
    python bench.py --device cuda --json bench.json

Each timing is the median of --steps runs after --warmup runs. Ratios are what to compare across machines
and commits; absolute numbers depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.models.segmentation import fcn_resnet50

from data_preprocessing import KittiSemantics, list_labelled, train_augmentation
from main import BATCH_SIZE, CROP_SIZE, WORKERS
from model import ARCHS, ResNet18Trunk, build_model
from samplers import SeededTrainSampler
from synthetic_kitti import write_synthetic_kitti

FULL = (375, 1242)


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def median_seconds(step, device: torch.device, steps: int, warmup: int) -> float:
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the process peak so far


class Case:
    """One network in train or inference mode, on one input shape, under one precision."""

    def __init__(self, net, batch: int, size: tuple[int, int], device, amp: bool, train: bool, trunk_only=False):
        self.device, self.amp, self.train, self.trunk_only = device, amp, train, trunk_only
        fmt = torch.channels_last if amp or device.type == "cpu" else torch.contiguous_format  # as main.py runs
        self.net = net.to(device, memory_format=fmt).train(train)
        self.x = torch.randn(batch, 3, *size, device=device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, 19, (batch, *size), device=device)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=1e-4, momentum=0.9) if train else None

    def output(self):
        out = self.net(self.x)
        return out[-1] if self.trunk_only else (out["out"] if isinstance(out, dict) else out)

    def __call__(self):
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp), torch.set_grad_enabled(self.train):
            out = self.output()
            if not self.train:
                return
            loss = out.float().mean() if self.trunk_only else F.cross_entropy(out.float(), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not self.trunk_only:
            self.optimizer.step()


def time_case(name, net, args, device, amp, train, size, batch, trunk_only=False) -> dict:
    log(f"{name} {'train' if train else 'infer'} {batch}x{size[0]}x{size[1]}{' bf16' if amp else ''}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    case = Case(net, batch, size, device, amp, train, trunk_only)
    seconds = median_seconds(case, device, args.steps, args.warmup)
    return {"name": name, "mode": "train" if train else "infer", "batch": batch, "size": list(size),
            "bf16": amp, "ms": 1000 * seconds, "img_per_s": batch / seconds, "peak_mb": peak_memory_mb(device)}


def loader_images_per_second(args) -> float:
    """Images/s out of the training DataLoader (augmentation, default workers) on KITTI-sized synthetic scenes.

    32 scenes are repeated to 256 samples an epoch, so that the per-epoch start of the iterator does not
    dominate; two epochs are timed after one that starts the workers.
    """
    root = Path(tempfile.mkdtemp(prefix="bench-kitti-"))
    write_synthetic_kitti(root, num_train=32, seed=0)
    names = list_labelled(root) * 8
    dataset = KittiSemantics(root, names, transform=train_augmentation(args.crop_size), cache=True)
    sampler = SeededTrainSampler(len(dataset), seed=0)
    loader = DataLoader(dataset, args.batch_size, sampler=sampler, num_workers=args.workers, drop_last=True,
                        persistent_workers=args.workers > 0)
    log(f"data pipeline, {args.workers} workers")
    for _ in loader:
        pass
    start, images = time.perf_counter(), 0
    for epoch in range(1, 3):
        sampler.set_epoch(epoch)
        images += sum(len(batch[0]) for batch in loader)
    return images / (time.perf_counter() - start)


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


def run(args) -> dict:
    device = torch.device(args.device)
    crop = (args.crop_size, args.crop_size)
    precisions = [False, True] if device.type == "cuda" else [False]
    rows = []
    for amp in precisions:
        rows.append(time_case("trunk", ResNet18Trunk(), args, device, amp, True, crop, args.batch_size, trunk_only=True))
        rows.append(time_case("trunk", ResNet18Trunk(), args, device, amp, False, FULL, 1, trunk_only=True))
        for arch in args.arch:
            rows.append(time_case(arch, build_model(arch, 19, pretrained=False), args, device, amp, True, crop,
                                  args.batch_size))
            rows.append(time_case(arch, build_model(arch, 19, pretrained=False), args, device, amp, False, FULL, 1))
        fcn50 = fcn_resnet50(weights=None, weights_backbone=None, num_classes=19, aux_loss=False)
        rows.append(time_case("fcn_resnet50", fcn50, args, device, amp, True, crop, args.batch_size))
        if device.type == "cuda":
            rows.append(time_case("fcn16", build_model("fcn16", 19, pretrained=False), args, device, amp, True, FULL, 8))
    loader_rate = loader_images_per_second(args)

    def ms(name, mode, amp=precisions[-1], size=None):
        return next(r["ms"] for r in rows if r["name"] == name and r["mode"] == mode and r["bf16"] == amp
                    and (size is None or tuple(r["size"]) == size))
    fcn16_step_rate = args.batch_size / ms("fcn16", "train", size=crop) * 1000
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "batch_size": args.batch_size, "crop_size": args.crop_size, "workers": args.workers,
        "fcn16_train_over_trunk": ms("fcn16", "train", size=crop) / ms("trunk", "train"),
        "fcn16_infer_over_trunk": ms("fcn16", "infer") / ms("trunk", "infer"),
        "loader_over_step": loader_rate / fcn16_step_rate,
        "fcn16_over_fcn_resnet50": ms("fcn_resnet50", "train") / ms("fcn16", "train", size=crop),
        "loader_img_per_s": loader_rate, "rows": rows,
    }
    if device.type == "cuda":
        result["bf16_speedup_fcn16_train"] = ms("fcn16", "train", False, crop) / ms("fcn16", "train", True, crop)
        result["largest_full_res_batch_fcn16_bf16"] = largest_batch("fcn16", device, True)
    return result


def print_table(result: dict) -> None:
    print(f"device: {result['device']}, torch {result['torch']}")
    print(f"{'network':<14}{'mode':<7}{'input':<16}{'bf16':<6}{'ms/step':>9}{'img/s':>9}{'peak MB':>9}")
    for r in result["rows"]:
        shape = f"{r['batch']}x{r['size'][0]}x{r['size'][1]}"
        print(f"{r['name']:<14}{r['mode']:<7}{shape:<16}{'yes' if r['bf16'] else 'no':<6}{r['ms']:>9.1f}"
              f"{r['img_per_s']:>9.1f}{r['peak_mb']:>9.0f}")
    for key in ("fcn16_train_over_trunk", "fcn16_infer_over_trunk", "loader_over_step", "fcn16_over_fcn_resnet50",
                "loader_img_per_s", "bf16_speedup_fcn16_train", "largest_full_res_batch_fcn16_bf16"):
        if key in result:
            print(f"{key:<36}{result[key]:.3f}" if isinstance(result[key], float) else f"{key:<36}{result[key]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--crop-size", type=int, default=CROP_SIZE)
    p.add_argument("--workers", type=int, default=WORKERS, help="DataLoader workers (default: main.py's)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    result = run(args)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
