"""The hyperparameter block at the top of main.py, edited as a user edits it: in a copy of the file, every
constant set to another natural value, then a short training run through the edited copy."""
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segmentation.synthetic import write_synthetic_cityscapes

ROOT = Path(__file__).resolve().parents[1]


def block_constants(text: str) -> list[str]:
    """The names assigned between the block's two rulers, in order."""
    block = text.split("# ---- Hyperparameters", 1)[1].split("\n# ----", 1)[0]
    return re.findall(r"^([A-Z_]+) = ", block, flags=re.M)


def edited_copy(folder: Path, values: dict[str, str]) -> Path:
    """main.py with each named constant's value replaced by the given source text (its comment kept)."""
    text = (ROOT / "main.py").read_text()
    for name, source in values.items():
        text, count = re.subn(rf"^{name} = .*?(\s+#.*)?$", lambda m: f"{name} = {source}{m.group(1) or ''}", text,
                              count=1, flags=re.M)
        assert count == 1, name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "main.py").write_text(text)
    return folder / "main.py"


def run_copy(script: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=600,
                          cwd=script.parent, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    """Every constant of the block at a value other than its default, in the forms the comments promise."""
    tmp = tmp_path_factory.mktemp("block")
    root = write_synthetic_cityscapes(tmp / "cityscapes", num_train=4, num_val=2, seed=0, size=(96, 192))
    values = {"ARCH": '"fcn8"', "DATASET": '"cityscapes"', "EPOCHS": "2", "STAGES": "((0.5, 1),)", "BATCH_SIZE": "2", "CROP_SIZE": "(64, 96)",
              "BASE_SIZE": "96", "LR": "0.02", "MOMENTUM": "0.8", "WEIGHT_DECAY": "5e-4", "WARMUP_EPOCHS": "0.5",
              "POLY_POWER": "1", "LABEL_SET": '"full"', "CLASS_WEIGHTS": '"log"', "DATA_ROOT": f'"{root}"',
              "OUT": f'"{tmp / "edited run"}"', "SEED": "3", "AMP": "False", "DETERMINISTIC": "True",
              "WORKERS": "1", "PRETRAINED": "False", "CACHE_GB": "0", "LOG_EVERY": "1"}
    assert sorted(values) == sorted(block_constants((ROOT / "main.py").read_text())), "a constant is not edited"
    return {"script": edited_copy(tmp / "copy", values), "run": tmp / "edited run"}


@pytest.mark.slow
def test_every_constant_edited_in_a_copy_of_main_trains_with_those_values(edited):
    result = run_copy(edited["script"], "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(edited["run"] / "last.pt", weights_only=True)
    config = state["config"]
    assert (state["arch"], state["num_classes"], config["dataset"], config["label_set"]) == ("fcn8", 34, "cityscapes",
                                                                                          "full")
    assert (config["epochs"], config["batch_size"], list(config["crop_size"]), config["base_size"]) == (2, 2, [64, 96],
                                                                                                      96)
    assert (config["lr"], config["warmup_epochs"], config["poly_power"], config["seed"]) == (0.02, 0.5, 1, 3)
    assert (config["amp"], config["deterministic"], config["pretrained"]) == (False, True, False)
    assert (config["workers"], config["cache_gb"], config["log_every"], config["class_weights"]) == (1, 0, 1, "log")
    groups = state["optimizer"]["param_groups"]
    assert groups[0]["momentum"] == 0.8 and groups[0]["weight_decay"] == 5e-4 and groups[1]["weight_decay"] == 0
    assert state["class_weights"] is not None and len(state["class_weights"]) == 34
    assert "crop 64x96, first 1 epochs at scale 0.5, 1 loader workers" in result.stdout
    assert "train cached" not in result.stdout and config["stages"] == ((0.5, 1),)
    rows = list(csv.DictReader(open(edited["run"] / "metrics.csv")))
    assert [(row["epoch"], row["scale"]) for row in rows] == [("1", "0.5"), ("2", "1.0")]
    assert state["history"][0]["train_loss"] > 0


def test_help_shows_the_defaults_the_edited_block_set(edited):
    result = run_copy(edited["script"], "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for shown in ("--arch ARCH fcn32 | fcn16 | fcn8 (default fcn8)", "all stages together (default 2)",
                  "--stages [SCALE:EPOCHS ...]", "(default ((0.5, 1),))",
                  "--crop-size H [W] [H [W] ...] training crop (None: the dataset's) (default (64, 96))",
                  "--lr LR peak SGD learning rate (default 0.02)",
                  "--workers WORKERS DataLoader processes per training process, or auto (default 1)",
                  "(default cityscapes)", "(default full)", "--no-amp CUDA: bf16/fp16 autocast; --no-amp: float32 "
                  "(default False)"):
        assert shown in text, shown


@pytest.mark.parametrize("name, source, expected", [
    ("CROP_SIZE", '"big"', "CROP_SIZE = 'big' (--crop-size) is not valid: use None, H or (H, W)"),
    ("EPOCHS", "2.5", "EPOCHS = 2.5 (--epochs) is not valid: use a whole number, at least 1"),
    ("WORKERS", '"many"', "WORKERS = 'many' (--workers) is not valid: use auto or a whole number")])
def test_a_wrong_value_in_the_block_is_one_line_naming_the_constant(tmp_path, name, source, expected):
    result = run_copy(edited_copy(tmp_path / "copy", {name: source, "OUT": f'"{tmp_path / "run"}"'}))
    assert result.returncode == 1 and result.stderr.strip() == f"error: {result.stderr.strip()[7:]}"
    assert expected in result.stderr and "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "run").exists()
