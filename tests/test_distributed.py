"""DDP on the CPU (gloo): sharded validation equals one process; torchrun training shards and syncs correctly."""
import json
import os
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

from data_preprocessing import KittiSemantics
from model import build_model
from segmentation.engine import evaluate
from segmentation.layouts import list_labelled, resolve_split
from segmentation.loading import ShapeBatchSampler

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def validation(root: Path, rank: int, world_size: int):
    names = list_labelled(root)[:5]  # odd: a padding DistributedSampler would count one image twice
    dataset = KittiSemantics(root, names)
    sizes = [tuple(dataset[i][1].shape) for i in range(len(dataset))]
    loader = DataLoader(dataset, batch_sampler=ShapeBatchSampler(sizes, 1, rank, world_size))
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


@pytest.fixture(scope="module")
def torchrun_probe(synthetic_root, tmp_path_factory):
    """main.py's training under torchrun, 2 gloo processes, on an 8-image training split (even: no padding).

    tests/ddp_probe.py records what each rank's training sampler yielded and each rank's final weights.
    """
    tmp = tmp_path_factory.mktemp("torchrun")
    names = sorted(p.stem for p in (synthetic_root / "training" / "semantic").glob("*.png"))
    assert len(names) == 10
    (tmp / "split").mkdir()
    (tmp / "split" / "train.txt").write_text("\n".join(names[:8]) + "\n")
    (tmp / "split" / "val.txt").write_text("\n".join(names[8:]) + "\n")
    (tmp / "probe").mkdir()
    env = {**os.environ, "DDP_PROBE_OUT": str(tmp / "probe"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_port", str(free_port()), str(ROOT / "tests" / "ddp_probe.py"), "--no-pretrained",
                             "--device", "cpu", "--epochs", "2", "--batch-size", "2", "--crop-size", "64",
                             "--workers", "0", "--data-root", str(synthetic_root), "--split-dir", str(tmp / "split"),
                             "--out", str(tmp / "run")], capture_output=True, text=True, timeout=300, env=env, cwd=tmp)
    assert result.returncode == 0, result.stderr[:3000]
    assert "x 2" in result.stdout  # main saw a world of two processes
    records = [json.loads((tmp / "probe" / f"rank{r}.json").read_text()) for r in range(2)]
    states = [torch.load(tmp / "probe" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return {"yielded": [r["epochs"] for r in records], "states": states, "run": tmp / "run", "num_train": 8,
            "val": names[8:], "root": synthetic_root,
            "wrapper_alive_at_cleanup": [r["wrapper_alive_at_cleanup"] for r in records]}


@pytest.mark.slow
def test_torchrun_ranks_train_on_disjoint_shards_that_cover_every_epoch(torchrun_probe):
    yielded, num_train = torchrun_probe["yielded"], torchrun_probe["num_train"]
    for rank in yielded:
        assert sorted(rank) == ["0", "1"]  # both epochs, each started with set_epoch
    for epoch in ("0", "1"):
        shards = [[index for index, _ in rank[epoch]] for rank in yielded]
        assert [len(shard) for shard in shards] == [num_train // 2] * 2
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(num_train))
    assert [i for i, _ in yielded[0]["0"]] != [i for i, _ in yielded[0]["1"]]  # reshuffled each epoch


@pytest.mark.slow
def test_torchrun_ranks_end_with_identical_parameters_that_rank0_checkpoints(torchrun_probe):
    states = torchrun_probe["states"]
    checkpoint = torch.load(torchrun_probe["run"] / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and set(checkpoint["model"]) == set(states[0]) == set(states[1])
    parameters = [name for name, _ in build_model("fcn16", 19, pretrained=False).named_parameters()]
    assert len(parameters) > 50
    for name in parameters:
        assert torch.equal(states[0][name], states[1][name]), name
        assert torch.equal(checkpoint["model"][name], states[0][name]), name
    initial = build_model("fcn16", 19, pretrained=False).state_dict()
    assert any(not torch.equal(initial[name], states[0][name]) for name in parameters)  # it did train


@pytest.mark.slow
def test_torchrun_validation_scores_on_every_rank_the_model_rank0_checkpoints(torchrun_probe):
    states = torchrun_probe["states"]
    checkpoint = torch.load(torchrun_probe["run"] / "last.pt", weights_only=True)
    differing = [name for name in states[0] if not torch.equal(states[0][name], states[1][name])]
    assert differing == []
    net = build_model("fcn16", 19, pretrained=False)
    net.load_state_dict(checkpoint["model"])
    loader = DataLoader(KittiSemantics(torchrun_probe["root"], torchrun_probe["val"]), 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, loss = evaluate(net, loader, 19, torch.device("cpu"), show=False)
    finally:
        torch.set_num_threads(threads)
    assert checkpoint["history"][-1]["val_loss"] == pytest.approx(loss, rel=1e-6)


@pytest.mark.slow
def test_ddps_wrapper_is_freed_before_the_process_group_is_left(torchrun_probe):
    """Freed after the group, DDP's reducer destroyed it holding the GIL: torchrun runs hung at exit under
    torch 2.11 (gloo)."""
    assert torchrun_probe["wrapper_alive_at_cleanup"] == [False, False]


@pytest.mark.slow
@pytest.mark.parametrize("fault, rank", [("loss", 1), ("disk", 0), ("train image", None), ("val image", None)])
def test_a_failure_one_rank_sees_stops_every_rank_promptly_with_the_same_line(writable_tree, tmp_path, fault, rank):
    """Two gloo ranks started as another launcher (mpirun, srun) starts them: no torchrun to tear the others down, so
    a rank left waiting in a collective would hang until the process group's timeout (the test's timeout here).
    The faults are the ones that really happen on one rank: its loss overflows, its disk is full (rank 0 writes the
    checkpoints), an image in its share of train or val cannot be read (decoded in the loop: --cache-gb 0)."""
    port = free_port()
    flags = ["--no-pretrained", "--device", "cpu", "--epochs", "2", "--batch-size", "2", "--crop-size", "64",
             "--workers", "0", "--log-every", "3", "--cache-gb", "0", "--data-root", str(writable_tree),
             "--out", str(tmp_path / "run")]
    if fault.endswith("image"):
        split = resolve_split("kitti", writable_tree, ("train", "val")).names
        damaged = writable_tree / "training" / "image_2" / f"{split[fault.split()[0]][0]}.png"
        damaged.write_bytes(damaged.read_bytes()[:300])  # a truncated PNG: its header reads, its pixels do not
    processes = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "fault_probe.py"), *flags], cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
                                       "MASTER_PORT": str(port), "RANK": str(r), "LOCAL_RANK": str(r),
                                       "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "FAULT_PROBE": fault,
                                       "FAULT_PROBE_RANK": str(rank)})
                 for r in range(2)]
    try:
        outcomes = [process.communicate(timeout=120) for process in processes]
    finally:
        for process in processes:
            process.kill()
    last_lines = [stderr.strip().splitlines()[-1] if stderr.strip() else "" for _, stderr in outcomes]
    assert [process.returncode for process in processes] == [1, 1], last_lines
    assert last_lines[0] == last_lines[1] and last_lines[0].startswith("error: "), last_lines
    expected = {"loss": "training loss became NaN", "disk": "No space left on device",
                "train image": "cannot be read as an image", "val image": "cannot be read as an image"}[fault]
    assert expected in last_lines[0], last_lines
