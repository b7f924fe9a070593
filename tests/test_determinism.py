"""--deterministic: an operation without a deterministic kernel is one line, the flag leaves CPU training
unchanged, and on CUDA a killed and resumed run ends bit-identical to an uninterrupted one (run on a GPU machine)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import train_argv

import main

ROOT = Path(__file__).resolve().parents[1]


def test_an_operation_without_a_deterministic_kernel_stops_with_one_line(monkeypatch):
    def train_with_put(args):
        torch.use_deterministic_algorithms(True)
        torch.zeros(3).put_(torch.tensor([0]), torch.tensor([1.0]))  # no deterministic kernel, even on the CPU
    monkeypatch.setattr(main, "train", train_with_put)
    try:
        with pytest.raises(SystemExit) as stop:
            main.main(["--deterministic"])
    finally:
        torch.use_deterministic_algorithms(False)
    message = str(stop.value.code)
    assert message.startswith("error: --deterministic: put_ does not have a deterministic implementation")
    assert "--no-deterministic" in message and "\n" not in message


def test_deterministic_flag_leaves_cpu_training_bit_identical(synthetic_root, trained_run, tmp_path):
    main.train(main.parse_args(train_argv(synthetic_root, tmp_path / "run", "--arch", "fcn16", "--deterministic")))
    reference = torch.load(trained_run / "last.pt", weights_only=True)["model"]
    for key, value in torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"].items():
        assert torch.equal(value, reference[key]), key
    torch.use_deterministic_algorithms(False)  # the flag sets the process's mode, as a command's run does


def run_to_completion(command: list[str], cwd: Path) -> None:
    """Run a main.py process; on failure show the end of its output rather than only the exit status."""
    finished = subprocess.run(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert finished.returncode == 0, finished.stdout[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_resume_after_sigkill_is_bit_identical_with_deterministic(synthetic_root, tmp_path):
    """Each run is its own process, so the killed run, its resume and the straight run each pick their kernels."""
    def argv(out: str) -> list[str]:
        flags = train_argv(synthetic_root, tmp_path / out, "--arch", "fcn16", "--epochs", "20", "--deterministic")
        flags[flags.index("--device") + 1] = "cuda"
        return [sys.executable, str(ROOT / "main.py"), *flags]
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(argv("killed"), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not (tmp_path / "killed" / "last.pt").exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        running = process.poll() is None
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    # it stopped by itself, or never saved an epoch: show why
    assert running and (tmp_path / "killed" / "last.pt").exists(), (tmp_path / "killed.log").read_text()[-3000:]
    assert torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["epoch"] < 20
    run_to_completion([sys.executable, str(ROOT / "main.py"), "--resume", str(tmp_path / "killed" / "last.pt")],
                      tmp_path)
    run_to_completion(argv("straight"), tmp_path)
    resumed = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    assert resumed["epoch"] == 20 and resumed["config"]["deterministic"]
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
