"""Mistaken inputs, tried as a new user would: each ends in one line `error: ...` naming the value or file
and the fix, a non-zero exit, and nothing written that looks like a result."""
import shutil

import pytest
import torch
from conftest import one_line_error, train_argv

import main
import test as evaluation
from segmentation import settings


@pytest.mark.parametrize("flag,value,expected", [("--lr", "-1", "LR = -1.0 (--lr) is not valid"),
                                                 ("--epochs", "0", "EPOCHS = 0 (--epochs) is not valid: use a whole"),
                                                 ("--batch-size", "0", "BATCH_SIZE = 0 (--batch-size) is not valid"),
                                                 ("--crop-size", "0", "CROP_SIZE = (0, 0) (--crop-size) is not valid"),
                                                 ("--workers", "-1", "WORKERS = -1 (--workers) is not valid: use auto"),
                                                 ("--arch", "fcn64", "ARCH = 'fcn64' (--arch) is not valid")])
def test_meaningless_training_values_are_refused_before_anything_is_written(synthetic_root, tmp_path, flag, value,
                                                                            expected):
    argv = train_argv(synthetic_root, tmp_path / "run", flag, value)
    assert expected in one_line_error(main.main, argv)
    assert not (tmp_path / "run").exists()


def test_resume_with_a_flag_that_would_change_the_run_names_the_flag(trained_run, tmp_path):
    before = (trained_run / "last.pt").read_bytes()
    message = one_line_error(main.main, ["--resume", str(trained_run / "last.pt"), "--epochs", "99", "--lr", "0.1"])
    assert "--epochs, --lr cannot change" in message and "--init-from" in message
    assert (trained_run / "last.pt").read_bytes() == before


@pytest.mark.parametrize("flag, value", [("--deterministic", True), ("--no-deterministic", False)])
def test_resume_may_turn_deterministic_on_and_off(trained_run, flag, value):
    state = torch.load(trained_run / "last.pt", weights_only=True)
    state["config"].update(deterministic=not value)
    cli = main.parse_args(["--resume", str(trained_run / "last.pt"), flag])
    args = settings.args_from_checkpoint(state, cli, defaults=main.parse_args([]))
    assert getattr(args, flag.removeprefix("--").removeprefix("no-")) is value


def test_resume_of_a_finished_run_says_so_and_how_to_train_on(trained_run):
    message = one_line_error(main.main, ["--resume", str(trained_run / "last.pt"), "--device", "cpu"])
    assert "already finished its 2 epochs" in message and "--init-from" in message


def test_resume_from_weights_without_training_state_is_refused(trained_run, tmp_path):
    state = torch.load(trained_run / "last.pt", weights_only=True)
    torch.save({k: state[k] for k in ("model", "arch", "num_classes", "label_set")}, tmp_path / "weights.pt")
    assert "no training state" in one_line_error(main.main, ["--resume", str(tmp_path / "weights.pt")])


def test_resume_from_a_checkpoint_without_its_best_score_names_what_is_missing(trained_run, tmp_path):
    state = torch.load(trained_run / "last.pt", weights_only=True)
    del state["best_miou"]
    (tmp_path / "run").mkdir()
    torch.save(state, tmp_path / "run" / "last.pt")
    message = one_line_error(main.main, ["--resume", str(tmp_path / "run" / "last.pt")])
    assert "no training state (best_miou missing)" in message


def test_resume_with_another_process_count_is_refused(trained_run, tmp_path):
    shutil.copytree(trained_run, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    state["epoch"], state["world_size"] = 1, 2
    torch.save(state, tmp_path / "run" / "last.pt")
    assert "--nproc_per_node=2" in one_line_error(main.main, ["--resume", str(tmp_path / "run" / "last.pt"),
                                                              "--device", "cpu"])


def test_a_text_file_given_as_checkpoint_is_called_what_it_is(tmp_path):
    (tmp_path / "notes.pt").write_text("hello, this is not a checkpoint\n")
    message = one_line_error(evaluation.main, ["--checkpoint", str(tmp_path / "notes.pt")])
    assert "not a PyTorch checkpoint file" in message


def test_an_unreadable_image_read_inside_a_loader_worker_is_still_one_line(trained_run, synthetic_root, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(synthetic_root / "testing" / "image_2", folder)
    data = (folder / "000001_10.png").read_bytes()
    (folder / "000001_10.png").write_bytes(data[: len(data) // 3])  # truncated
    message = one_line_error(evaluation.main, ["--checkpoint", str(trained_run / "last.pt"), "--images", str(folder),
                                               "--device", "cpu", "--workers", "1", "--out", str(tmp_path / "out")])
    assert "000001_10.png: cannot be read as an image" in message


def test_a_file_that_is_not_a_video_is_named(trained_run, tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 1000)
    message = one_line_error(evaluation.main, ["--checkpoint", str(trained_run / "last.pt"), "--images",
                                               str(tmp_path / "clip.mp4"), "--device", "cpu"])
    assert "clip.mp4: cannot be decoded as a video" in message


def test_resume_from_best_pt_is_refused_because_it_would_rewind_the_run(trained_run):
    message = one_line_error(main.main, ["--resume", str(trained_run / "best.pt")])
    assert "resume with --resume" in message and "last.pt" in message and "--init-from" in message


def test_a_device_this_machine_lacks_is_one_line(synthetic_root, tmp_path):
    assert "--device gpu is not a device name" in one_line_error(main.main, train_argv(synthetic_root, tmp_path / "r",
                                                                                       "--device", "gpu"))
    assert not (tmp_path / "r").exists()
    if not torch.cuda.is_available():
        assert "--device cuda: this machine has 0 usable" in one_line_error(
            main.main, train_argv(synthetic_root, tmp_path / "r", "--device", "cuda"))


def test_split_files_with_a_repeated_or_shared_name_are_refused(synthetic_root, tmp_path):
    from segmentation.layouts import default_split
    split = default_split(sorted(p.stem for p in (synthetic_root / "training" / "semantic").glob("*.png")))
    (tmp_path / "split").mkdir()
    (tmp_path / "split" / "train.txt").write_text("\n".join(split["train"]) + "\n")
    (tmp_path / "split" / "val.txt").write_text("\n".join(split["val"] + split["val"][:1]) + "\n")
    argv = train_argv(synthetic_root, tmp_path / "run", "--split-dir", str(tmp_path / "split"))
    assert "listed more than once" in one_line_error(main.main, argv)
    (tmp_path / "split" / "val.txt").write_text("\n".join(split["val"] + split["train"][:1]) + "\n")
    assert "in both train.txt and val.txt" in one_line_error(main.main, argv)


def test_validation_labels_without_a_scored_pixel_are_named(writable_tree, tmp_path):
    import cv2
    import numpy as np
    for path in (writable_tree / "training" / "semantic").glob("*.png"):
        cv2.imwrite(str(path), np.zeros(cv2.imread(str(path), cv2.IMREAD_UNCHANGED).shape, np.uint8))  # all void
    message = one_line_error(main.main, train_argv(writable_tree, tmp_path / "run", "--epochs", "1"))
    assert "hold no pixel of a scored class" in message


def test_two_images_of_the_same_name_are_refused_before_one_overwrites_the_other(trained_run, tmp_path):
    import cv2
    import numpy as np
    for name in ("a.png", "a.jpg"):
        cv2.imwrite(str(tmp_path / name), np.zeros((40, 40, 3), np.uint8))
    message = one_line_error(evaluation.main, ["--checkpoint", str(trained_run / "last.pt"), "--images", str(tmp_path),
                                               "--device", "cpu"])
    assert "a.jpg, a.png share a name" in message


def mistaken_inputs(root, run, tmp):
    """(command, argv, what the line says): each a mistake a new user makes, across every entry point."""
    import bench
    import data_preprocessing
    import export
    (tmp / "not_a_folder.txt").write_text("x")
    (tmp / "bad.csv").write_text("id;label\n1;car\n")
    (tmp / "weights.pt").write_text("not weights")
    (tmp / "empty").mkdir()
    (tmp / "model.onnx").write_text("a deployed model")
    checkpoint = str(run / "best.pt")
    return [
        (main.main, train_argv(root, tmp / "not_a_folder.txt" / "run"), "is not a folder this user may write"),
        (main.main, train_argv(root, tmp / "out", "--label-set", str(tmp / "no.csv")), "use train, full, or a CSV"),
        (main.main, train_argv(root, tmp / "out", "--label-set", str(tmp / "bad.csv")),
         "bad.csv, line 1: column 'id' is not one of value,name,r,g,b,void"),
        (main.main, train_argv(tmp / "nowhere", tmp / "out"), "does not exist"),
        (main.main, train_argv(root, tmp / "out", "--init-from", str(tmp / "missing.pt")), "missing.pt does not exist"),
        (main.main, train_argv(root, tmp / "out", "--backbone-weights", str(tmp / "weights.pt")),
         "weights.pt: cannot load ResNet18 weights"),
        (main.main, train_argv(root, tmp / "out", "--split-dir", str(tmp / "empty")), "train.txt is missing"),
        (main.main, train_argv(root, tmp / "out", "--class-weights", "inverse"), "CLASS_WEIGHTS = 'inverse'"),
        (main.main, train_argv(root, tmp / "out", "--dataset", "coco"), "DATASET = 'coco' (--dataset) is not valid"),
        (main.main, train_argv(root, tmp / "out", "--momentum", "1.5"), "MOMENTUM = 1.5 (--momentum)"),
        (main.main, train_argv(root, tmp / "out", "--cache-gb", "-1"), "CACHE_GB = -1.0 (--cache-gb)"),
        (main.main, train_argv(root, tmp / "out", "--lr", "fast"), "LR = 'fast' (--lr) is not valid"),
        (evaluation.main, ["--checkpoint", checkpoint, "--images", str(tmp / "photos")], "is not a folder of images"),
        (evaluation.main, ["--checkpoint", str(tmp / "empty")], "does not exist"),
        (evaluation.main, ["--checkpoint", checkpoint, "--scales", "0"], "--scales 0.0 is not valid"),
        (export.main, ["--checkpoint", str(tmp / "missing.pt")], "missing.pt does not exist"),
        (export.main, ["--checkpoint", checkpoint, "--out", str(tmp / "empty")], "is a folder"),
        (export.main, ["--checkpoint", checkpoint, "--out", str(tmp / "model.onnx")], "already exists; pass --force"),
        (data_preprocessing.main, ["--check", str(tmp / "nowhere")], "does not exist"),
        (data_preprocessing.main, ["--colour-labels", str(tmp / "empty"), str(tmp / "labels")], "holds no PNG files"),
        (data_preprocessing.main, ["--check", str(root), "--label-set", str(tmp / "bad.csv")], "column 'id'"),
        # numbers out of range, in every command, before anything is allocated or written
        (main.main, train_argv(root, tmp / "out", "--crop-size", "32000"), "CROP_SIZE = (32000, 32000) (--crop-size)"),
        (main.main, train_argv(root, tmp / "out", "--base-size", "37500"), "BASE_SIZE = 37500 (--base-size)"),
        (evaluation.main, ["--checkpoint", checkpoint, "--scales", "75", "100"], "--scales 75.0 100.0 is not valid"),
        (evaluation.main, ["--checkpoint", checkpoint, "--workers", "-1"], "--workers -1 is not valid"),
        (data_preprocessing.main, ["--make-synthetic", str(tmp / "syn"), "--num", "-1"], "--num -1 is not valid"),
        (data_preprocessing.main, ["--make-synthetic", str(tmp / "syn"), "--num-test", "-2"], "--num-test -2 is not"),
        (data_preprocessing.main, ["--make-synthetic", str(tmp / "syn"), "--size", "100000", "100000"],
         "--size 100000 100000 is not valid: use H W, each 60 to 8192"),
        (bench.main, ["--batch-size", "0"], "--batch-size 0 is not valid"),
        (bench.main, ["--crop-size", "320", "0"], "--crop-size 320 0 is not valid"),
        (bench.main, ["--steps", "1"], "--steps 1 is not valid"),
        (bench.main, ["--device", "cuda:7"], "--device cuda:7"),
    ]


def test_every_mistaken_input_is_one_line_and_writes_nothing(synthetic_root, trained_run, tmp_path):
    cases = mistaken_inputs(synthetic_root, trained_run, tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    run_files = {p.name: p.stat().st_mtime_ns for p in trained_run.iterdir()}
    for entry_point, argv, expected in cases:
        message = one_line_error(entry_point, argv)
        assert expected in message, (argv, message)
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, argv
    assert {p.name: p.stat().st_mtime_ns for p in trained_run.iterdir()} == run_files
    assert len(cases) >= 21
