"""Faults and folders: a full disk, a refused start, a folder that is not writable, a wrong weights file, a run
that diverges, two runs in one folder, and SIGKILL at random moments. Each ends in one line and loses nothing."""
import csv
import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import one_line_error, train_argv
from torchvision.models import resnet34

import main
from segmentation import records
from segmentation.checkpoint import load_checkpoint, non_finite

ROOT = Path(__file__).resolve().parents[1]


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def test_a_full_disk_while_saving_keeps_the_last_checkpoint_and_resume_finishes_the_run(synthetic_root, trained_run,
                                                                                       tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def fills_the_disk_on_the_second_checkpoint(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # as torch reports it: a RuntimeError from its zip writer
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
        return real_save(*args, **kwargs)
    monkeypatch.setattr(torch, "save", fills_the_disk_on_the_second_checkpoint)
    run = tmp_path / "run"
    message = one_line_error(main.main, train_argv(synthetic_root, run, "--arch", "fcn16"))
    assert f"{run / 'last.pt'}: " in message and "last.pt was not changed" in message
    assert f"continue with: python main.py --resume {run / 'last.pt'}" in message
    assert load_checkpoint(run / "last.pt")["epoch"] == 1 and not list(run.glob(".*.tmp"))
    monkeypatch.setattr(torch, "save", real_save)  # space freed
    main.main(["--resume", str(run / "last.pt")])
    for key, value in weights(trained_run / "last.pt").items():
        assert torch.equal(weights(run / "last.pt")[key], value), key


def test_a_full_disk_while_writing_metrics_is_one_warning_and_the_run_goes_on_to_whole_records(
        synthetic_root, trained_run, tmp_path, monkeypatch, capsys):
    real_open, failed = open, []

    def fills_the_disk_on_the_first_metrics_csv(file, *args, **kwargs):
        if str(file).endswith(".metrics.csv.tmp") and not failed:
            failed.append(file)
            with real_open(file, "w") as partial:  # a half-written file, as a full disk leaves it
                partial.write("epoch,lr")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(records, "open", fills_the_disk_on_the_first_metrics_csv, raising=False)
    run = tmp_path / "run"
    main.main(train_argv(synthetic_root, run, "--arch", "fcn16"))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(failed) == 1 and len(warnings) == 1
    assert "No space left on device; free space on that disk; the run goes on" in warnings[0]
    assert [row["epoch"] for row in csv.DictReader(open(run / "metrics.csv"))] == ["1", "2"]
    assert [row["epoch"] for row in csv.DictReader(open(run / "class_iou.csv"))] == ["1", "2"]
    assert not list(run.glob(".*.tmp"))
    for key, value in weights(trained_run / "last.pt").items():
        assert torch.equal(weights(run / "last.pt")[key], value), key


def test_a_refused_start_leaves_no_folder_and_the_same_command_runs_once_the_data_is_fixed(writable_tree, tmp_path):
    label = writable_tree / "training" / "semantic" / "000003_10.png"
    original = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(label), np.dstack([original] * 3))  # a colour picture given as labels
    argv = train_argv(writable_tree, tmp_path / "run", "--epochs", "1", "--arch", "fcn32")
    assert "000003_10.png: label must be a single-channel" in one_line_error(main.main, argv)
    assert not (tmp_path / "run").exists()
    cv2.imwrite(str(label), original)
    main.main(argv)
    assert (tmp_path / "run" / "last.pt").is_file()


def test_a_folder_left_by_a_run_killed_before_its_first_checkpoint_is_reused_and_a_kept_one_is_not(
        synthetic_root, trained_run, tmp_path):
    started = tmp_path / "started"
    started.mkdir()
    for name in ("train.txt", "val.txt", ".lock", "metrics.csv", ".last.pt.tmp"):  # killed while saving epoch 1
        (started / name).write_text("")
    main.main(train_argv(synthetic_root, started, "--epochs", "1", "--arch", "fcn32"))
    assert (started / "last.pt").is_file()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("a user's file")
    message = one_line_error(main.main, train_argv(synthetic_root, tmp_path / "notes"))
    assert "holds no checkpoint" in message and "--resume" not in message
    assert (tmp_path / "notes" / "mine.txt").read_text() == "a user's file"


def test_two_runs_started_together_in_one_folder_one_is_refused(synthetic_root, tmp_path):
    argv = [sys.executable, str(ROOT / "main.py"), *train_argv(synthetic_root, tmp_path / "run", "--epochs", "1",
                                                               "--arch", "fcn32")]
    processes = [subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    results = sorted((p.wait(timeout=300), p.stderr.read()) for p in processes)
    assert [code for code, _ in results] == [0, 1], results
    assert results[1][1].startswith("error: run folder") and ("in use by another main.py" in results[1][1] or
                                                                "already exists" in results[1][1])
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1


def test_a_run_folder_the_user_may_not_write_is_one_line(synthetic_root, tmp_path):
    """Run as another user where the tests run as root (root may write anywhere)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    tmp_path.chmod(0o755)
    command = [sys.executable, str(ROOT / "main.py"), *train_argv(synthetic_root, locked / "run")]
    extra = {}
    if os.geteuid() == 0:
        try:
            probe = subprocess.run([sys.executable, "-c", "import main"], cwd=ROOT, user=65534, group=65534,
                                   capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        except PermissionError:
            probe = None
        if probe is None or probe.returncode:
            pytest.skip("root may write anywhere, and the unprivileged user cannot run this checkout's Python")
        extra = dict(user=65534, group=65534)
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HOME": str(tmp_path)}, **extra)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: cannot write {locked / 'run'}: {locked} is not a folder this user")
    assert not (locked / "run").exists()


def read_only(folder: Path) -> list[str]:
    """A command prefix that runs its command with ``folder`` bind-mounted read-only in a private mount namespace:
    a real read-only file system, which even root cannot write. Skips where this machine may not mount."""
    prefix = ["unshare", "--mount", "sh", "-c",
              'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"', str(folder)]
    try:
        probe = subprocess.run([*prefix, sys.executable, "-c", f"import os; assert not os.access({str(folder)!r}, "
                                "os.W_OK)"], capture_output=True, timeout=60)
    except OSError:
        probe = None
    if probe is None or probe.returncode:
        pytest.skip("this machine does not let the tests mount a folder read-only (needs unshare and mount)")
    return prefix


def test_a_read_only_file_system_is_one_line_before_any_work_for_every_command(synthetic_root, trained_run,
                                                                             tmp_path):
    """New run, --resume of an unfinished run, test.py and export.py, all writing into a read-only folder."""
    disk = tmp_path / "disk"
    (disk / "run").mkdir(parents=True)
    state = torch.load(trained_run / "last.pt", weights_only=True)
    state["config"]["epochs"] = state["epoch"] + 1  # one epoch still to train
    torch.save(state, disk / "run" / "last.pt")
    for split in ("train.txt", "val.txt"):
        shutil.copy(trained_run / split, disk / "run" / split)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (disk / "run").iterdir())
    prefix, python = read_only(disk), [sys.executable]
    commands = {
        "new run": ([*python, str(ROOT / "main.py"), *train_argv(synthetic_root, disk / "new")],
                    f"cannot write {disk / 'new'}: {disk} is not a folder this user may write; choose another --out"),
        "resume": ([*python, str(ROOT / "main.py"), "--resume", str(disk / "run" / "last.pt")],
                   f"cannot write {disk / 'run'}: {disk / 'run'} is not a folder this user may write; copy that "
                   "folder somewhere writable and --resume from the copy's last.pt"),
        "test.py": ([*python, str(ROOT / "test.py"), "--checkpoint", str(trained_run / "best.pt"), "--data-root",
                     str(synthetic_root), "--out", str(disk / "eval")],
                    f"cannot write {disk / 'eval'}: {disk} is not a folder this user may write"),
        "export.py": ([*python, str(ROOT / "export.py"), "--checkpoint", str(trained_run / "best.pt"), "--out",
                       str(disk / "model.onnx")], f"cannot write {disk / 'model.onnx'}: folder {disk} is not writable"),
    }
    for name, (command, expected) in commands.items():
        result = subprocess.run([*prefix, *command], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, (name, result.stderr)
        assert result.stderr.startswith(f"error: {expected}"), (name, result.stderr)
        assert "parameters" not in result.stdout, (name, "refused only after loading data and model")
    assert sorted(p.name for p in disk.iterdir()) == ["run"]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (disk / "run").iterdir()) == before


@pytest.mark.parametrize("kind", ["resnet34", "fcn checkpoint", "a list"])
def test_backbone_weights_of_another_network_are_named_before_loading(synthetic_root, trained_run, tmp_path, kind):
    path = {"fcn checkpoint": trained_run / "best.pt"}.get(kind, tmp_path / "weights.pt")
    if kind == "resnet34":
        torch.save(resnet34().state_dict(), path)
    elif kind == "a list":
        torch.save([torch.zeros(1)], path)
    argv = train_argv(synthetic_root, tmp_path / "run", "--pretrained", "--backbone-weights", str(path))
    message = one_line_error(main.main, argv)
    expected = {"resnet34": "not ResNet18 ImageNet weights (", "fcn checkpoint": "holds a checkpoint of this project "
                "(fcn16), not ResNet18 weights; start from it with --init-from", "a list": "holds a list, not a"}
    assert expected[kind] in message and str(path) in message
    assert not (tmp_path / "run").exists()


def test_a_diverging_run_keeps_only_finite_checkpoints_and_names_them(synthetic_root, tmp_path):
    run = tmp_path / "run"
    message = one_line_error(main.main, train_argv(synthetic_root, run, "--epochs", "4", "--lr", "2"))
    assert "NaN or infinite" in message or "loss became" in message
    if (run / "last.pt").is_file():
        state = load_checkpoint(run / "last.pt")
        assert f"{run / 'last.pt'} keeps epoch {state['epoch']}, the last whose weights were finite" in message
        assert non_finite(state["model"]) is None and non_finite(load_checkpoint(run / "best.pt")["model"]) is None
    else:
        assert "no checkpoint was saved before it" in message


def test_test_py_and_export_py_refuse_a_checkpoint_with_infinite_statistics(trained_run, tmp_path):
    import export
    import test as evaluation
    state = torch.load(trained_run / "best.pt", weights_only=True)
    state["model"]["trunk.layer4.1.bn2.running_var"][3] = float("inf")
    torch.save(state, tmp_path / "broken.pt")
    for entry_point, argv in ((evaluation.main, ["--checkpoint", str(tmp_path / "broken.pt"), "--device", "cpu"]),
                              (export.main, ["--checkpoint", str(tmp_path / "broken.pt")])):
        message = one_line_error(entry_point, argv)
        assert "broken.pt: trunk.layer4.1.bn2.running_var holds NaN or infinite values" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pt"]


def test_evaluation_into_a_run_folder_is_refused_and_the_runs_metrics_stay(trained_run):
    import test as evaluation
    before = (trained_run / "metrics.csv").read_bytes()
    message = one_line_error(evaluation.main, ["--checkpoint", str(trained_run / "best.pt"), "--out", str(trained_run),
                                               "--device", "cpu"])
    assert "is a training run's folder" in message and (trained_run / "metrics.csv").read_bytes() == before


@pytest.mark.parametrize("out, fmt, expected", [("model.pt2", None, None), ("model.pt2", "onnx", "names a .pt2 file"),
                                                ("model.txt", None, "no format is named .txt"),
                                                ("last.pt", "onnx", "names a .pt file")])
def test_the_exported_files_name_says_what_it_holds(trained_run, tmp_path, out, fmt, expected):
    import export
    argv = ["--checkpoint", str(trained_run / "best.pt"), "--out", str(tmp_path / out)] + (["--format", fmt] if fmt
                                                                                             else [])
    if expected:
        assert expected in one_line_error(export.main, argv)
        assert not (tmp_path / out).exists()
    else:
        export.main(argv)
        program = torch.export.load(tmp_path / out)
        assert program.module()(torch.zeros(1, 3, 64, 96, dtype=torch.uint8)).shape == (1, 64, 96)


def test_export_never_writes_over_a_training_runs_file(trained_run):
    import export
    before = (trained_run / "last.pt").read_bytes()
    message = one_line_error(export.main, ["--checkpoint", str(trained_run / "best.pt"), "--out",
                                           str(trained_run / "last.pt"), "--format", "pt2", "--force"])
    assert "names a .pt file" in message or "is a file of the training run" in message
    message = one_line_error(export.main, ["--checkpoint", str(trained_run / "best.pt"), "--out",
                                           str(trained_run / "metrics.csv"), "--force"])
    assert (trained_run / "last.pt").read_bytes() == before and "no format is named .csv" in message


def test_synthetic_scenes_never_land_in_a_folder_that_holds_files(tmp_path):
    import data_preprocessing
    (tmp_path / "training" / "image_2").mkdir(parents=True)
    (tmp_path / "training" / "image_2" / "000000_10.png").write_bytes(b"a user's image")
    message = one_line_error(data_preprocessing.main, ["--make-synthetic", str(tmp_path), "--num", "2"])
    assert f"{tmp_path} already holds files" in message
    assert (tmp_path / "training" / "image_2" / "000000_10.png").read_bytes() == b"a user's image"


def checkpoint_stamp(path: Path) -> int:
    return path.stat().st_mtime_ns if path.is_file() else 0


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_a_checkpoint_and_resume_ends_as_an_unbroken_run(synthetic_root,
                                                                                                tmp_path):
    """20 kills, each at a random moment of start-up, training or validation, or right after a checkpoint lands
    (whichever comes first), so that no life trains more than about one epoch and 25 epochs outlast the kills.
    A kill that lands while the first checkpoint is written leaves a folder that the same command takes up."""
    run, rng = tmp_path / "killed", random.Random(0)
    argv = train_argv(synthetic_root, run, "--arch", "fcn32", "--epochs", "25")
    for kill in range(20):
        command = ["--resume", str(run / "last.pt")] if (run / "last.pt").is_file() else argv
        process = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *command], cwd=tmp_path,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # every fourth life runs until a checkpoint lands, so that the run moves on however slow the machine
        stamp, deadline = checkpoint_stamp(run / "last.pt"), time.monotonic() + (rng.uniform(0.5, 8.0) if kill % 4
                                                                                 else 600)
        while time.monotonic() < deadline and checkpoint_stamp(run / "last.pt") == stamp and process.poll() is None:
            time.sleep(0.01)
        assert process.poll() is None, process.stderr.read()[-2000:]  # neither finished nor failed
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        if (run / "last.pt").is_file():
            assert non_finite(load_checkpoint(run / "last.pt")["model"]) is None
    assert load_checkpoint(run / "last.pt")["epoch"] < 25
    subprocess.run([sys.executable, str(ROOT / "main.py"), "--resume", str(run / "last.pt")], cwd=tmp_path,
                   check=True, capture_output=True)
    main.train(main.parse_args(train_argv(synthetic_root, tmp_path / "straight", "--arch", "fcn32", "--epochs", "25")))
    resumed = load_checkpoint(run / "last.pt")
    assert resumed["epoch"] == 25 and [r["epoch"] for r in resumed["history"]] == list(range(1, 26))
    scores = [row["val_mIoU"] for row in resumed["history"]]
    assert load_checkpoint(run / "best.pt")["epoch"] == 1 + scores.index(max(scores))
    for key, value in weights(tmp_path / "straight" / "last.pt").items():
        assert torch.equal(resumed["model"][key], value), key


@pytest.mark.parametrize("final_fit", [False, True])
def test_a_run_killed_between_last_pt_and_best_pt_publishes_best_pt_on_resume(synthetic_root, tmp_path, final_fit):
    """best.pt follows last.pt: a SIGKILL between the two, after the run's last epoch, leaves best.pt an epoch
    behind (a validated run whose last epoch was its best) or missing (a final fit, whose best is its last).
    --resume refuses the finished run in one line, pointing to best.pt, which it has published."""
    from segmentation.layouts import resolve_split, write_split
    split = resolve_split("kitti", synthetic_root, ("train", "val")).names
    write_split({"train": split["train"], "val": [] if final_fit else split["val"]}, tmp_path / "split")
    run = tmp_path / "run"
    argv = train_argv(synthetic_root, run, "--arch", "fcn32", "--epochs", "1", "--split-dir", str(tmp_path / "split"))
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_probe.py"), *argv], cwd=tmp_path,
                            capture_output=True, env={**os.environ, "KILL_AFTER_SAVE": "1"}, timeout=300)
    assert killed.returncode == -signal.SIGKILL and not (run / "best.pt").exists(), killed.stderr[-2000:]
    assert "already finished its 1 epochs" in one_line_error(main.main, ["--resume", str(run / "last.pt")])
    assert load_checkpoint(run / "best.pt")["epoch"] == 1
