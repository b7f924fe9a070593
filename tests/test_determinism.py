"""--deterministic: the cross-entropy without atomics equals the usual one, the flag leaves CPU training unchanged,
and on CUDA a killed and resumed run ends bit-identical to an uninterrupted one (run on a GPU machine)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import main
from conftest import train_argv
from determinism import deterministic_algorithms
from engine import nll_sum
from errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("weighted", [False, True])
def test_elementwise_cross_entropy_equals_nll_loss_in_value_and_gradient(weighted):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 19, 12, 16, generator=generator, requires_grad=True)
    target = torch.randint(0, 19, (2, 12, 16), generator=generator)
    target[:, :3] = 255  # ignored rows
    weight = torch.rand(19, generator=generator) + 0.5 if weighted else None
    results = []
    for elementwise in (False, True):
        loss = nll_sum(F.log_softmax(logits, 1), target, weight, elementwise=elementwise)
        gradient, = torch.autograd.grad(loss, logits)
        results.append((loss, gradient))
    (loss, gradient), (loss_elementwise, gradient_elementwise) = results
    torch.testing.assert_close(loss_elementwise, loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(gradient_elementwise, gradient, rtol=1e-5, atol=1e-7)
    wrong_class = nll_sum(F.log_softmax(logits, 1), (target + 1) % 19, weight, elementwise=True)
    assert not torch.isclose(wrong_class, loss)


def test_elementwise_cross_entropy_stays_finite_where_a_probability_underflowed():
    log_probabilities = torch.tensor([0.0, -float("inf")]).view(1, 2, 1, 1)
    assert nll_sum(log_probabilities, torch.zeros(1, 1, 1, dtype=torch.long), elementwise=True).item() == 0.0


def test_deterministic_mode_is_on_inside_the_block_and_restored_after():
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")  # the two deterministic settings
    assert not torch.are_deterministic_algorithms_enabled()


def test_an_operation_without_a_deterministic_kernel_stops_with_one_line():
    with pytest.raises(UserError, match="^--deterministic: put_ does not have a deterministic implementation.*"
                                        "--no-deterministic"):
        with deterministic_algorithms(True):
            torch.zeros(3).put_(torch.tensor([0]), torch.tensor([1.0]))  # no deterministic kernel, even on the CPU
    assert not torch.are_deterministic_algorithms_enabled()


def test_deterministic_flag_leaves_cpu_training_bit_identical(synthetic_root, trained_run, tmp_path):
    main.train(main.parse_args(train_argv(synthetic_root, tmp_path / "run", "--arch", "fcn16", "--deterministic")))
    reference = torch.load(trained_run / "last.pt", weights_only=True)["model"]
    for key, value in torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"].items():
        assert torch.equal(value, reference[key]), key
    assert not torch.are_deterministic_algorithms_enabled()


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
