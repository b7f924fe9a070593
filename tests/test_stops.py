"""Stop signals as launchers and terminals send them: to a whole process group (``timeout``, SLURM, systemd,
``kill -TERM -PGID``, Ctrl-C in a terminal) and through torchrun, with DataLoader workers alive. Every command
ends in one line and status 130; training saves where it stands and resumes to an unbroken run's weights."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import train_argv
from test_distributed import free_port
from test_main import assert_same_weights, final_weights

ROOT = Path(__file__).resolve().parents[1]


def default_interrupt() -> None:
    """SIGINT back to its default in the child: a shell starts background jobs (pytest run with ``&``) with it
    ignored, which their children inherit, and a Python started so keeps ignoring Ctrl-C, as nohup intends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(argv: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """A command in a process group of its own (as a shell job or a batch job is), output merged and piped."""
    return subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})}, preexec_fn=default_interrupt)


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, from /proc."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:  # it has exited
        return []
    return [pid] + [p for child in children for p in process_tree(int(child))]


def signal_group_when(process: subprocess.Popen, marker: str, signum: int, whole_tree: bool = False,
                      timeout: float = 240) -> str:
    """Send ``signum`` to the process's whole group once a line containing ``marker`` is printed, and with
    ``whole_tree`` to every process it started as well (torchrun starts each rank in a session of its own; SLURM
    signals every process of a job step); returns all that the process printed until it exited."""
    printed, deadline = [], time.time() + timeout
    for line in process.stdout:
        printed.append(line)
        if marker in line:
            tree = process_tree(process.pid) if whole_tree else []
            os.killpg(process.pid, signum)
            for pid in tree[1:]:
                os.kill(pid, signum)
            break
        assert time.time() < deadline, "".join(printed)
    printed += process.stdout.readlines()
    process.wait(timeout=120)
    return "".join(printed)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_group_signal_with_loader_workers_saves_the_epoch_and_resumes_to_the_unbroken_weights(
        synthetic_root, trained_run, tmp_path, signum):
    run = tmp_path / "run"
    argv = train_argv(synthetic_root, run, "--arch", "fcn16", "--workers", "2", "--log-every", "1")
    process = start([sys.executable, str(ROOT / "main.py"), *argv], tmp_path)
    printed = signal_group_when(process, "epoch 1/2 1/", signum)
    assert process.returncode == 130, printed[-3000:]
    assert "Traceback" not in printed and "interrupted: saved" in printed and "--resume" in printed
    saved = torch.load(run / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["progress"]["step"]) != (2, 0)  # stopped before the run's end
    resumed = subprocess.run([sys.executable, str(ROOT / "main.py"), "--resume", str(run / "last.pt")], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(final_weights(run), final_weights(trained_run))


@pytest.mark.slow
def test_sigterm_to_every_process_of_a_torchrun_job_saves_and_resumes_to_the_unbroken_weights(synthetic_root,
                                                                                             tmp_path):
    """As SLURM stops a job step: torchrun, both ranks and their loader workers get SIGTERM at once, and each rank
    gets it again from torchrun, which passes on what it received."""
    names = sorted(p.stem for p in (synthetic_root / "training" / "semantic").glob("*.png"))
    (tmp_path / "split").mkdir()
    (tmp_path / "split" / "train.txt").write_text("\n".join(names[:8]) + "\n")
    (tmp_path / "split" / "val.txt").write_text("\n".join(names[8:]) + "\n")

    def torchrun(*flags: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                str(free_port()), str(ROOT / "main.py"), *flags]

    def flags(out: Path) -> list[str]:
        return train_argv(synthetic_root, out, "--arch", "fcn16", "--workers", "1", "--log-every", "1",
                          "--split-dir", str(tmp_path / "split"))
    process = start(torchrun(*flags(tmp_path / "run")), tmp_path, {"OMP_NUM_THREADS": "1"})
    printed = signal_group_when(process, "epoch 1/2 1/", signal.SIGTERM, whole_tree=True)
    assert "interrupted: saved" in printed and "Traceback" not in printed.split("interrupted: saved")[0], printed
    assert (tmp_path / "run" / "last.pt").is_file()
    for command in (torchrun("--resume", str(tmp_path / "run" / "last.pt")), torchrun(*flags(tmp_path / "straight"))):
        finished = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert finished.returncode == 0, finished.stderr[-3000:]
    assert_same_weights(final_weights(tmp_path / "run"), final_weights(tmp_path / "straight"))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_group_signal_during_test_py_predictions_is_one_line_and_status_130(trained_run, synthetic_root, tmp_path,
                                                                             signum):
    images = tmp_path / "images"
    images.mkdir()
    frame = next((synthetic_root / "training" / "image_2").glob("*.png"))
    for index in range(60):
        (images / f"{index:03d}.png").write_bytes(frame.read_bytes())
    out = tmp_path / "predictions"
    process = start([sys.executable, str(ROOT / "test.py"), "--checkpoint", str(trained_run / "best.pt"), "--images",
                     str(images), "--out", str(out), "--save-all", "--workers", "2", "--flip", "--scales", "1", "2"],
                    tmp_path)
    deadline, staging = time.time() + 120, tmp_path / ".predictions.partial"  # where test.py writes until it ends
    while not (staging.is_dir() and any(staging.rglob("*.png"))) and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signum)
    printed = process.communicate(timeout=120)[0]
    assert process.returncode == 130, printed[-3000:]
    assert "Traceback" not in printed and printed.strip().splitlines()[-1].startswith("interrupted; ")
    assert not out.exists() and not staging.exists()  # nothing of the interrupted run is left


def test_a_stop_signal_taken_by_another_thread_while_workers_start_is_raised_once_they_are_registered():
    """The kernel hands a process-directed signal to any thread that has it unblocked (here a timer's, in training
    OpenMP's or the checkpoint writer's); Python raises it in the main thread, which was then inside the loader's
    start with its workers running and not yet registered to be killed at exit."""
    import multiprocessing
    import threading

    from torch.utils.data import Sampler, TensorDataset

    from segmentation import runtime

    class SlowSampler(Sampler):  # the loader asks it for indices after starting the workers
        def __iter__(self):
            started.update(set(multiprocessing.active_children()) - before)
            time.sleep(1.0)
            yield from range(4)

        def __len__(self):
            return 4
    loader = runtime.StopSafeLoader(TensorDataset(torch.arange(4)), batch_size=1, sampler=SlowSampler(), num_workers=2,
                                    multiprocessing_context="fork")
    before, started = set(multiprocessing.active_children()), set()
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            iter(loader)
        assert len(started) == 2 and started <= set(runtime._WORKERS)
    finally:
        for worker in set(multiprocessing.active_children()) - before:
            worker.kill()
            worker.join()


@pytest.mark.slow
def test_a_stop_during_a_validation_longer_than_torchruns_shutdown_timeout_still_saves_the_epoch(tmp_path):
    """torchrun forwards SIGTERM to its ranks and kills them --shutdown-timeout seconds later (30 by default, 6
    here), while this validation would take 12 s more: the ranks end it early and save the trained epoch."""
    from segmentation.synthetic import write_synthetic_kitti
    root = write_synthetic_kitti(tmp_path / "tree", num_train=20, num_test=0, seed=0, size=(96, 320))
    names = sorted(p.stem for p in (root / "training" / "semantic").glob("*.png"))
    (tmp_path / "split").mkdir()
    (tmp_path / "split" / "train.txt").write_text("\n".join(names[:8]) + "\n")
    (tmp_path / "split" / "val.txt").write_text("\n".join(names[8:]) + "\n")  # 6 images a rank, 2 s each
    process = start([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--shutdown-timeout", "6",
                     "--master_port", str(free_port()), str(ROOT / "tests" / "slow_validation_probe.py"),
                     *train_argv(root, tmp_path / "run", "--arch", "fcn32", "--split-dir", str(tmp_path / "split"))],
                    tmp_path, {"OMP_NUM_THREADS": "1", "SLOW_VALIDATION_S": "2"})
    printed = signal_group_when(process, "validating", signal.SIGTERM)  # torchrun alone: it forwards the signal
    assert "interrupted: saved" in printed and "after epoch 1" in printed, printed[-3000:]
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["progress"]["step"] == 0
    assert saved["history"][0]["val_mIoU"] != saved["history"][0]["val_mIoU"]  # NaN: the cut validation is no score
