"""scripts/summarize_runs.py, the source of docs/results.md's means, spreads and differences, on run folders written
by the project's own writers (main.py's metrics.csv, test.py's metrics.json)."""
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

import test as evaluation
from labels import get_label_set
from segmentation.metrics import evaluation_report
from segmentation.records import HistoryWriter

ROOT = Path(__file__).resolve().parents[1]
FULL = get_label_set("full")  # 34 ids scored, 19 in the benchmark: the two mIoUs differ


def make_run(folder: Path, val_by_epoch: list[tuple[float, float]], seed: int) -> tuple[Path, dict]:
    """A run folder: metrics.csv with (scale, val mIoU) per epoch, and test_test/metrics.json from a random
    confusion matrix of the full label set in which one class has no pixels at all."""
    folder.mkdir()
    history = [{"epoch": epoch, "scale": scale, "lr": 0.01, "train_loss": 1.0, "val_loss": 1.0, "val_mIoU": val,
                "pixel_acc": 0.8, "seconds": 50.0, "data_wait": 0.0, "val_seconds": 10.0, "peak_gpu_mb": 0}
               for epoch, (scale, val) in enumerate(val_by_epoch, 1)]
    HistoryWriter(folder, FULL.class_names).write(history)
    confusion = np.random.default_rng(seed).integers(0, 50, (FULL.num_classes,) * 2) * 1.0
    confusion[np.diag_indices(FULL.num_classes)] += 2000
    road = FULL.class_names.index("road")
    confusion[:, road] = confusion[road] = 0  # road: in no label and no prediction, so its IoU is absent
    report = evaluation_report(confusion, FULL)
    (folder / "test_test").mkdir()
    evaluation.write_report(report, folder / "test_test", {})
    return folder, report


def summarize(*args) -> list[str]:
    done = subprocess.run([sys.executable, "scripts/summarize_runs.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


def test_rows_take_the_best_full_scale_val_and_the_benchmark_test_score_and_compute_mean_spread_difference(tmp_path):
    nan = float("nan")
    a, report_a = make_run(tmp_path / "a", [(0.5, nan), (0.5, 0.90), (1.0, 0.40), (1.0, 0.62), (1.0, 0.55)], 0)
    b, report_b = make_run(tmp_path / "b", [(1.0, 0.30), (1.0, 0.50)], 1)
    c, report_c = make_run(tmp_path / "c", [(1.0, 0.45)], 2)
    assert abs(report_a["benchmark_mIoU"] - report_a["mIoU"]) > 0.01  # the test can tell the two figures apart
    lines = summarize(a, b, "--against", c)

    # a's half-scale 0.90 is not comparable with full-scale epochs, so epoch 4's 0.62 is its best val
    assert lines[0] == (f"a: best val 62.00 (epoch 4), test_test mIoU {100 * report_a['benchmark_mIoU']:.2f}, "
                        f"pixel acc {100 * report_a['benchmark_pixel_acc']:.2f}, 5 min of epochs")
    scores = [100 * report["benchmark_mIoU"] for report in (report_a, report_b)]
    assert lines[2] == (f"test_test {scores[0]:.2f} / {scores[1]:.2f}: mean {statistics.mean(scores):.2f}, "
                        f"spread {max(scores) - min(scores):.2f}; mean val {statistics.mean([62, 50]):.2f}")
    header, _, row_a = lines[3:6]
    road = header.split(" | ").index("road")
    assert row_a.split(" | ")[road] == "n/a"
    difference = statistics.mean(scores) - 100 * report_c["benchmark_mIoU"]
    assert lines[-1].startswith(f"difference in mean test_test mIoU: {difference:+.2f}")


def test_the_same_runs_scored_two_ways_get_a_difference_per_run(tmp_path):
    run, report = make_run(tmp_path / "r", [(1.0, 0.5)], 0)
    flipped = run / "val_flip"
    flipped.mkdir()
    better = {**report, "benchmark_mIoU": report["benchmark_mIoU"] + 0.0123}
    evaluation.write_report(better, flipped, {})
    lines = summarize(run, "--scored", "val_flip", "--against", run, "--against-scored", "test_test")
    assert lines[-1] == "per run: r +1.23"
