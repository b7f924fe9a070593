import csv
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import one_line_error, stopped_after_first_epoch, train_argv

import main
from labels import get_label_set
from model import build_model
from segmentation import UserError, runtime
from segmentation.engine import parameter_groups, warmup_poly
from segmentation.records import HISTORY_FIELDS, plan_run_dir

ROOT = Path(__file__).resolve().parents[1]


def final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.pt", weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_small_model_overfits_one_synthetic_batch(synthetic_root):
    from data_preprocessing import KittiSemantics, normalize
    from segmentation.layouts import list_labelled
    dataset = KittiSemantics(synthetic_root, list_labelled(synthetic_root)[:2])
    images = normalize(torch.stack([dataset[i][0] for i in range(2)]))
    target = torch.stack([dataset[i][1] for i in range(2)]).long()
    torch.manual_seed(0)
    net = build_model("fcn32", 19, pretrained=False).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(net(images), target, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]


def test_two_epoch_run_writes_checkpoints_metrics_and_split(trained_run):
    for name in ("last.pt", "best.pt", "metrics.csv", "curves.png", "train.txt", "val.txt"):
        assert (trained_run / name).is_file(), name
    rows = list(csv.DictReader(open(trained_run / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"] and set(HISTORY_FIELDS) == set(rows[0])
    state = torch.load(trained_run / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["arch"] == "fcn16" and state["num_classes"] == 19
    for key in ("optimizer", "scheduler", "scaler", "rng_cpu", "config", "history", "best_miou"):
        assert key in state
    assert state["best_miou"] == max(float(r["val_mIoU"]) for r in rows)


def test_same_seed_gives_identical_losses_and_weights(synthetic_root, trained_run, tmp_path):
    main.train(main.parse_args(train_argv(synthetic_root, tmp_path / "again", "--arch", "fcn16")))
    first = torch.load(trained_run / "last.pt", weights_only=True)
    second = torch.load(tmp_path / "again" / "last.pt", weights_only=True)
    assert [r["train_loss"] for r in first["history"]] == [r["train_loss"] for r in second["history"]]
    assert_same_weights(first["model"], second["model"])


def test_existing_run_folder_is_never_overwritten(synthetic_root, trained_run):
    before = (trained_run / "last.pt").stat().st_mtime_ns
    with pytest.raises(UserError, match="already exists.*--resume"):
        main.train(main.parse_args(train_argv(synthetic_root, trained_run)))
    assert (trained_run / "last.pt").stat().st_mtime_ns == before


def history_without_timings(run_dir: Path) -> list[dict]:
    """The history's rows without their timings, an unscored epoch's NaN as None (NaN equals nothing)."""
    rows = torch.load(run_dir / "last.pt", weights_only=True)["history"]
    return [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()
             if k not in ("seconds", "data_wait", "val_seconds")} for row in rows]


def assert_same_history(resumed: list[dict], straight: list[dict]) -> None:
    """Same epochs and validation; train_loss to rounding (the interrupt splits one log window's float sum)."""
    assert [r["epoch"] for r in resumed] == [r["epoch"] for r in straight]
    for a, b in zip(resumed, straight):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9)
        assert {k: v for k, v in a.items() if k != "train_loss"} == {k: v for k, v in b.items() if k != "train_loss"}


def test_ctrl_c_inside_an_optimizer_step_mid_log_window_resumes_to_the_same_weights_and_history(
        synthetic_root, trained_run, tmp_path, monkeypatch):
    real_step, calls = torch.optim.SGD.step, []
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN where pytest runs as a background job

    def step_interrupted_on_its_seventh_call(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # epoch 2, step 3 of 4: inside a log window of 2 steps
            signal.raise_signal(signal.SIGINT)
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.SGD, "step", step_interrupted_on_its_seventh_call)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        main.train(main.parse_args(train_argv(synthetic_root, run, "--arch", "fcn16")))
    assert stop.value.code == 130
    saved = torch.load(run / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["progress"]["step"] == 3  # the interrupted step finished and counts
    monkeypatch.setattr(torch.optim.SGD, "step", real_step)
    # settings of where and how it runs may change on resume (a machine with less memory): results do not
    main.train(main.parse_args(["--resume", str(run / "last.pt"), "--workers", "0", "--cache-gb", "0", "--log-every",
                                "1"]))
    assert_same_weights(final_weights(run), final_weights(trained_run))
    assert_same_history(history_without_timings(run), history_without_timings(trained_run))
    resumed, straight = (torch.load(r / "last.pt", weights_only=True)["rng_cpu"] for r in (run, trained_run))
    assert torch.equal(resumed, straight)  # the global generator too: nothing drew from it out of step
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers restored after the run


def test_ctrl_c_during_validation_saves_the_finished_epoch_and_resumes_exactly_on_the_runs_own_split(
        writable_tree, trained_run, tmp_path, monkeypatch):
    real_evaluate = main.evaluate

    def evaluate_interrupted(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return real_evaluate(*args, **kwargs)
    monkeypatch.setattr(main, "evaluate", evaluate_interrupted)
    run = tmp_path / "run"
    with pytest.raises(SystemExit):
        main.train(main.parse_args(train_argv(writable_tree, run, "--arch", "fcn16")))
    saved = torch.load(run / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["progress"]["step"] == 0 and len(saved["history"]) == 1
    monkeypatch.setattr(main, "evaluate", real_evaluate)
    for folder in ("image_2", "semantic"):  # the data folder gains an image: the default split would change
        folder = writable_tree / "training" / folder
        shutil.copy(folder / "000000_10.png", folder / "new.png")
    main.train(main.parse_args(["--resume", str(run / "last.pt")]))
    assert_same_weights(final_weights(run), final_weights(trained_run))
    assert_same_history(history_without_timings(run), history_without_timings(trained_run))


@pytest.mark.slow
def test_sigkill_then_resume_completes_with_the_same_weights_as_an_uninterrupted_run(synthetic_root, tmp_path):
    argv = train_argv(synthetic_root, tmp_path / "killed", "--arch", "fcn32", "--epochs", "4")
    process = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *argv], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    epochs_done = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["epoch"]
    assert epochs_done < 4
    subprocess.run([sys.executable, str(ROOT / "main.py"), "--resume", str(tmp_path / "killed" / "last.pt"),
                    "--workers", "0"], cwd=tmp_path, check=True, capture_output=True)
    main.train(main.parse_args(train_argv(synthetic_root, tmp_path / "straight", "--arch", "fcn32", "--epochs", "4")))
    resumed = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    assert resumed["epoch"] == 4 and len(resumed["history"]) == 4
    assert_same_weights(resumed["model"], final_weights(tmp_path / "straight"))


def test_non_finite_loss_stops_with_a_message(synthetic_root, tmp_path):
    with pytest.raises(UserError, match="loss became NaN or infinite.*lower --lr"):
        main.train(main.parse_args(train_argv(synthetic_root, tmp_path / "nan", "--lr", "1e12", "--epochs", "1")))


def test_init_from_a_coarser_run_keeps_its_weights(synthetic_root, tmp_path):
    coarse = tmp_path / "fcn32"
    main.train(main.parse_args(train_argv(synthetic_root, coarse, "--arch", "fcn32", "--epochs", "1")))
    args = main.parse_args(train_argv(synthetic_root, tmp_path / "fine", "--arch", "fcn8", "--init-from",
                                      str(coarse / "last.pt")))
    net = main.make_model(args, runtime.Context(0, 1, torch.device("cpu")), get_label_set(args.label_set), None)
    assert torch.equal(net.score32.weight, final_weights(coarse)["score32.weight"])
    assert net.score16.weight.abs().sum() == 0  # new skip layers start at zero


@pytest.mark.slow
def test_demo_runs_the_whole_loop_offline_and_learns(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), "--demo", str(tmp_path / "data"),
                             "--out", str(tmp_path / "run")], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "TORCH_HOME": str(tmp_path / "torch")})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "SYNTHETIC" in result.stdout and "random initialisation" in result.stdout
    history = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert max(float(row["val_mIoU"]) for row in history) > 0.4  # chance is a few percent
    assert (tmp_path / "run" / "test_val" / "metrics.json").is_file()


def test_full_label_set_trains_34_classes_and_reports_the_19_class_benchmark(synthetic_root, tmp_path):
    import json

    import test as evaluation
    main.train(main.parse_args(train_argv(synthetic_root, tmp_path / "full", "--label-set", "full", "--epochs", "1",
                                          "--arch", "fcn32")))
    evaluation.main(["--checkpoint", str(tmp_path / "full" / "last.pt"), "--device", "cpu", "--workers", "0"])
    metrics = json.loads((tmp_path / "full" / "test_val" / "metrics.json").read_text())
    assert len(metrics["class_iou"]) == 34 and metrics["label_set"] == "full"
    state = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    assert metrics["mIoU"] != metrics["benchmark_mIoU"]  # 34 classes with voids vs the 19 benchmark classes
    assert state["best_miou"] == pytest.approx(metrics["benchmark_mIoU"])  # best.pt is chosen on the benchmark


def test_training_split_smaller_than_one_batch_is_reported(synthetic_root, tmp_path):
    with pytest.raises(UserError, match="fewer than one batch.*--batch-size"):
        main.train(main.parse_args(train_argv(synthetic_root, tmp_path / "run", "--batch-size", "64")))


def test_init_from_a_finer_model_is_refused(synthetic_root, trained_run, tmp_path):
    args = main.parse_args(train_argv(synthetic_root, tmp_path / "run", "--arch", "fcn32", "--init-from",
                                      str(trained_run / "best.pt")))
    with pytest.raises(UserError, match="a fcn16 cannot initialise a coarser fcn32"):
        main.make_model(args, runtime.Context(0, 1, torch.device("cpu")), get_label_set(args.label_set), None)


def test_learning_rate_warms_up_linearly_then_decays_polynomially_to_zero():
    assert warmup_poly(0, warmup=10, total=110, power=0.9) == pytest.approx(0.1)
    assert warmup_poly(5, warmup=10, total=110, power=0.9) == pytest.approx(0.55)
    assert warmup_poly(10, warmup=10, total=110, power=0.9) == pytest.approx(1.0)
    assert warmup_poly(60, warmup=10, total=110, power=0.9) == pytest.approx(0.5 ** 0.9)
    assert warmup_poly(110, warmup=10, total=110, power=0.9) == 0.0


def run_dir_on_two_ranks(rank: int, port: int, cwd: Path, out, results: Path) -> None:
    import torch.distributed as dist
    os.chdir(cwd)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    args = main.parse_args(["--arch", "fcn32"] + (["--out", str(out)] if out else []))
    try:
        ctx = runtime.Context(rank, 2, torch.device("cpu"))
        outcome = str(runtime.on_main_rank(ctx, lambda: plan_run_dir(args.out, args.arch)))
    except UserError as error:
        outcome = f"UserError: {error}"
    (results / f"rank{rank}.txt").write_text(outcome)
    dist.destroy_process_group()


@pytest.mark.parametrize("existing", [False, True])
def test_every_ddp_rank_gets_rank_0s_run_folder_or_its_error(tmp_path, existing):
    import torch.multiprocessing as mp
    from test_distributed import free_port
    out = None
    if existing:
        out = tmp_path / "taken"
        out.mkdir()
        (out / "last.pt").write_bytes(b"")
    mp.spawn(run_dir_on_two_ranks, args=(free_port(), tmp_path, out, tmp_path), nprocs=2)
    rank0, rank1 = (tmp_path / "rank0.txt").read_text(), (tmp_path / "rank1.txt").read_text()
    assert rank0 == rank1
    if existing:
        assert rank0.startswith("UserError: run folder") and "already exists" in rank0
    else:
        assert rank0.startswith("runs/fcn32-") and not (tmp_path / rank0).exists()  # made once all is checked


def test_weight_decay_applies_to_convolution_weights_only():
    net = build_model("fcn16", 19, pretrained=False)
    decay, no_decay = parameter_groups(net, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in net.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "trunk.stem.0.weight" in decayed and "score16.weight" in decayed
    assert not any(n.endswith("bias") or ".bn" in n or "up32to16" in n or n.startswith("trunk.stem.1") for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))


def test_another_seed_keeps_the_split_and_moves_the_sample_order(synthetic_root, tmp_path, monkeypatch):
    from data_preprocessing import SegmentationDataset
    real_getitem, drawn = SegmentationDataset.__getitem__, {}

    def recording_getitem(self, key):
        if isinstance(key, tuple):  # a training sample: (index, augmentation seed, stage scale)
            drawn[seed].append(key)
        return real_getitem(self, key)
    monkeypatch.setattr(SegmentationDataset, "__getitem__", recording_getitem)
    for seed in (0, 1):
        drawn[seed] = []
        main.train(main.parse_args(train_argv(synthetic_root, tmp_path / f"seed{seed}", "--arch", "fcn32",
                                              "--epochs", "1", "--seed", str(seed))))
    for name in ("train.txt", "val.txt"):
        assert (tmp_path / "seed0" / name).read_text() == (tmp_path / "seed1" / name).read_text()
    orders = {seed: [index for index, *_ in keys] for seed, keys in drawn.items()}
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]
    assert {s for _, s, _ in drawn[0]}.isdisjoint({s for _, s, _ in drawn[1]})  # other crops, flips and jitter too


@pytest.mark.slow
@pytest.mark.parametrize("label_set", ["train", "full"])
def test_best_checkpoint_holds_the_epoch_with_the_highest_benchmark_miou(synthetic_root, tmp_path, label_set):
    main.train(main.parse_args(train_argv(synthetic_root, tmp_path / "run", "--arch", "fcn32", "--epochs", "5",
                                          "--lr", "0.05", "--label-set", label_set)))
    scores = [float(row["val_mIoU"]) for row in csv.DictReader(open(tmp_path / "run" / "metrics.csv"))]
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["epoch"] == 1 + scores.index(max(scores)) and best["best_miou"] == max(scores)
    assert best["history"][-1]["val_mIoU"] == max(scores)


def test_the_evaluate_hint_can_be_pasted_when_the_run_folder_has_a_space(synthetic_root, tmp_path, capsys):
    import shlex
    out = tmp_path / "my runs" / "fcn32 a"
    main.train(main.parse_args(train_argv(synthetic_root, out, "--arch", "fcn32", "--epochs", "1")))
    hint = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("evaluate with:"))
    assert shlex.split(hint.removeprefix("evaluate with:")) == ["python", "test.py", "--checkpoint",
                                                                str(out / "best.pt")]


def test_tensorboard_event_files_hold_each_epochs_scalars_and_overlays_as_metrics_csv(trained_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(trained_run), size_guidance={"images": 0, "scalars": 0}).Reload()
    rows = list(csv.DictReader(open(trained_run / "metrics.csv")))
    for tag, column in (("loss/train", "train_loss"), ("loss/val", "val_loss"), ("lr", "lr"), ("val/mIoU", "val_mIoU"),
                        ("val/pixel_acc", "pixel_acc")):
        logged = events.Scalars(tag)
        assert [event.step for event in logged] == [int(row["epoch"]) for row in rows]
        assert [event.value for event in logged] == pytest.approx([float(row[column]) for row in rows], rel=1e-6)
    ious = list(csv.DictReader(open(trained_run / "class_iou.csv")))
    road = [event.value for event in events.Scalars("val_iou/road")]
    assert road == pytest.approx([float(row["road"]) for row in ious], rel=1e-6)
    overlays = events.Images("val_overlay/0")
    assert [image.step for image in overlays] == [1, 2] and overlays[0].width == 320  # a whole val frame


@pytest.mark.parametrize("key, value, resumes", [("aux_loss", 0.4, False), ("photometric", "strong", False),
                                                 ("aux_loss", 0.0, True), ("photometric", "mild", True)])
def test_a_run_that_trained_with_a_since_removed_setting_resumes_only_where_today_trains_the_same(
        synthetic_root, tmp_path, monkeypatch, key, value, resumes):
    run = tmp_path / "run"
    state = stopped_after_first_epoch(synthetic_root, run, monkeypatch)
    state["config"][key] = value  # as a checkpoint of the version that had the setting holds it
    torch.save(state, run / "last.pt")
    if resumes:
        main.train(main.parse_args(["--resume", str(run / "last.pt")]))
        assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 3
    else:
        line = one_line_error(main.main, ["--resume", str(run / "last.pt")])
        assert f"trained with {key} = {value!r}, a setting this version no longer has" in line, line


def test_tensorboard_shows_each_epoch_once_after_a_kill_and_resume(synthetic_root, tmp_path, monkeypatch):
    """kill -9 after an epoch was logged but before its last.pt landed: the resumed run logs that epoch again, and
    the reader must keep only the resumed run's value."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    first = stopped_after_first_epoch(synthetic_root, run, monkeypatch)
    main.train(main.parse_args(["--resume", str(run / "last.pt")]))
    torch.save(first, run / "last.pt")  # as if the kill came before epochs 2 and 3 were saved, after they were logged
    main.train(main.parse_args(["--resume", str(run / "last.pt")]))
    events = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    logged = events.Scalars("val/mIoU")
    assert [event.step for event in logged] == [1, 2, 3]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [event.value for event in logged] == pytest.approx([float(row["val_mIoU"]) for row in rows], rel=1e-6)


def test_a_run_started_when_zero_warmup_meant_one_step_is_refused_on_resume(synthetic_root, tmp_path, monkeypatch):
    """Its epoch-1 rate was logged by that schedule (one warm-up step): today's schedule would not continue it."""
    run = tmp_path / "run"
    state = stopped_after_first_epoch(synthetic_root, run, monkeypatch, "--warmup-epochs", "0")
    main.train(main.parse_args(["--resume", str(run / "last.pt")]))  # today's own zero warm-up resumes
    state["history"][0]["lr"] *= 0.97  # as the old schedule's first step at 0.1 x LR lowered the epoch's mean rate
    torch.save(state, run / "last.pt")
    line = one_line_error(main.main, ["--resume", str(run / "last.pt")])
    assert "WARMUP_EPOCHS = 0 still meant one warm-up step" in line, line
