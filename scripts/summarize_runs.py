"""The rows docs/results.md reports, computed from run folders: each seed's best full-scale val mIoU (its epoch),
its test mIoU and pixel accuracy (``test.py --split test`` wrote RUN/test_test/metrics.json), then the mean and the
spread (max - min) over the seeds, and the per-class test IoU of each run. Means and differences are never typed.
Val and test are the same figure, the benchmark's mIoU (main.py chooses by it): a class table's own mIoU, the 19
train classes' for the Cityscapes label sets.
``--scored`` reads another of test.py's output folders instead of test_test, e.g. val_flip from
``test.py --split val --flip --out RUN/val_flip``.

    python scripts/summarize_runs.py runs/stages-s0 runs/stages-s1
    python scripts/summarize_runs.py runs/a-s0 runs/a-s1 --against runs/b-s0 runs/b-s1   # and the difference
    python scripts/summarize_runs.py runs/a-s0 --scored val_flip --against runs/a-s0 --against-scored val_plain
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path


def run_figures(run: Path, folder: str) -> dict:
    """Best full-scale val mIoU and its epoch from metrics.csv; the scored figures from RUN/<folder>/metrics.json."""
    with open(run / "metrics.csv") as file:
        epochs = list(csv.DictReader(file))
    scored = [row for row in epochs if float(row.get("scale") or 1) == 1 and row["val_mIoU"] not in ("", "nan")]
    best = max(scored, key=lambda row: float(row["val_mIoU"])) if scored else None
    metrics = json.loads((run / folder / "metrics.json").read_text())
    return {"run": run.name, "val": 100 * float(best["val_mIoU"]) if best else None,
            "epoch": int(best["epoch"]) if best else None, "score": 100 * metrics["benchmark_mIoU"],
            "pixel_acc": 100 * metrics["benchmark_pixel_acc"], "class_iou": metrics["class_iou"],
            "minutes": sum(float(row["seconds"]) + float(row["val_seconds"]) for row in epochs) / 60}


def percent(iou: float | None) -> str:
    """A class IoU as the per-class tables print it; n/a for a class absent from the scored split (None)."""
    return "n/a" if iou is None else f"{100 * iou:.1f}"


def summary(runs: list[Path], folder: str) -> dict:
    figures = [run_figures(run, folder) for run in runs]
    scores = [f["score"] for f in figures]
    vals = [f["val"] for f in figures if f["val"] is not None]
    return {"figures": figures, "mean_score": statistics.mean(scores), "spread": max(scores) - min(scores),
            "mean_val": statistics.mean(vals) if vals else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--against", type=Path, nargs="+", help="the runs of another row: print the difference")
    parser.add_argument("--scored", default="test_test", help="test.py's output folder in a run (default %(default)s)")
    parser.add_argument("--against-scored", help="the same for the --against runs (default: --scored)")
    args = parser.parse_args()
    result = summary(args.runs, args.scored)
    for f in result["figures"]:
        val = f"{f['val']:.2f} (epoch {f['epoch']})" if f["val"] is not None else "none (no validation)"
        print(f"{f['run']}: best val {val}, {args.scored} mIoU {f['score']:.2f}, pixel acc {f['pixel_acc']:.2f}, "
              f"{f['minutes']:.0f} min of epochs")
    seeds = " / ".join(f"{f['score']:.2f}" for f in result["figures"])
    mean_val = f"{result['mean_val']:.2f}" if result["mean_val"] is not None else "n/a"
    print(f"{args.scored} {seeds}: mean {result['mean_score']:.2f}, spread {result['spread']:.2f}; mean val {mean_val}")
    names = list(result["figures"][0]["class_iou"])
    print("| run | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for f in result["figures"]:
        print(f"| {f['run']} | " + " | ".join(percent(f["class_iou"][n]) for n in names) + " |")
    if args.against:
        other = summary(args.against, args.against_scored or args.scored)
        print(f"difference in mean {args.scored} mIoU: {result['mean_score'] - other['mean_score']:+.2f} "
              f"({result['mean_score']:.2f} against {other['mean_score']:.2f})")
        if [f["run"] for f in result["figures"]] == [f["run"] for f in other["figures"]]:  # one set, two ways
            print("per run: " + ", ".join(f"{f['run']} {f['score'] - g['score']:+.2f}"
                                          for f, g in zip(result["figures"], other["figures"])))


if __name__ == "__main__":
    main()
