"""DDP: validation over 2 gloo processes on the CPU must equal one process, image for image."""
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from data_preprocessing import KittiSemantics, list_labelled
from engine import evaluate
from model import build_model
from samplers import ShardSampler

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def validation(root: Path, rank: int, world_size: int):
    names = list_labelled(root)[:5]  # odd: a padding DistributedSampler would count one image twice
    dataset = KittiSemantics(root, names)
    loader = DataLoader(dataset, 1, sampler=ShardSampler(len(dataset), rank, world_size))
    torch.manual_seed(0)
    net = build_model("fcn16", 19, pretrained=False)
    confusion, loss = evaluate(net, loader, 19, torch.device("cpu"), show=False)
    return confusion.matrix, loss


def worker(rank: int, world_size: int, port: int, root: Path, out: Path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    matrix, loss = validation(root, rank, world_size)
    if rank == 0:
        np.save(out / "matrix.npy", matrix)
        np.save(out / "loss.npy", np.array(loss))
    dist.destroy_process_group()


def test_two_process_validation_equals_one_process_on_an_odd_split(synthetic_root, tmp_path):
    mp.spawn(worker, args=(2, free_port(), synthetic_root, tmp_path), nprocs=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same float rounding, so no argmax can flip
    try:
        single_matrix, single_loss = validation(synthetic_root, 0, 1)
    finally:
        torch.set_num_threads(threads)
    assert (np.load(tmp_path / "matrix.npy") == single_matrix).all()
    assert np.load(tmp_path / "loss.npy") == pytest.approx(single_loss, rel=1e-9)


@pytest.mark.slow
def test_torchrun_trains_with_two_processes(synthetic_root, tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_port", str(free_port()), str(ROOT / "main.py"), "--no-pretrained",
                             "--device", "cpu", "--epochs", "1", "--batch-size", "2", "--crop-size", "64",
                             "--workers", "0", "--data-root", str(synthetic_root), "--out", str(tmp_path / "ddp")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    state = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and not any(k.startswith("module.") for k in state["model"])
    assert "x 2" in result.stdout
