"""What the package's docstring promises about its shape, checked: one registration per dataset, and no module of
the package importing a command."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import train_argv

import main
from segmentation import UserError
from segmentation.layouts import LAYOUTS, KittiLayout
from segmentation.loading import crop_and_base_size
from segmentation.settings import SETTINGS, Setting, args_from_checkpoint, check_args, readable, real

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"main", "test", "export", "bench"}


def test_no_module_of_the_package_imports_a_command():
    for path in sorted((ROOT / "segmentation").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            assert not {name.split(".")[0] for name in names} & COMMANDS, (path.name, names)


def test_a_dataset_is_registered_once_by_its_layout(monkeypatch):
    """Through main.py's own flags and checks: a second registration place (a list of names) would refuse it."""
    class WideKitti(KittiLayout):
        base_size, crop_size = 200, (96, 192)
    monkeypatch.setitem(LAYOUTS, "wide", WideKitti())
    args = main.parse_args(["--dataset", "wide"])
    check_args(args)
    assert crop_and_base_size(args) == ((96, 192), 200)


def test_a_setting_is_declared_by_its_block_line_and_one_row(monkeypatch, synthetic_root, tmp_path):
    """The flag, its default, its one-line check and the resume contract all follow from the two."""
    monkeypatch.setitem(SETTINGS, "label_smoothing", Setting(lambda v: real(v) and 0 <= v < 1, "a number in [0, 1)",
                                                              "cross-entropy smoothing", {"type": readable(float)}))
    monkeypatch.setattr(main, "LABEL_SMOOTHING", 0.1, raising=False)
    assert main.parse_args([]).label_smoothing == 0.1 and main.parse_args(["--label-smoothing", "0.2"]).label_smoothing \
        == 0.2
    with pytest.raises(UserError, match=r"LABEL_SMOOTHING = 2.0 \(--label-smoothing\) is not valid: use a number in"):
        check_args(main.parse_args(train_argv(synthetic_root, tmp_path / "run", "--label-smoothing", "2")))
    cli = main.parse_args(["--resume", str(tmp_path / "last.pt"), "--label-smoothing", "0.3"])
    with pytest.raises(UserError, match="--label-smoothing cannot change"):  # what a run learns: not resumable
        args_from_checkpoint({"config": {}}, cli, main.build_parser().parse_args([]))
