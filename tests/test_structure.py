"""What the package's docstring promises about its shape, checked: one registration per dataset, and no module of
the package importing a command."""
from __future__ import annotations

import argparse
import ast
from pathlib import Path

from segmentation.layouts import LAYOUTS, KittiLayout
from segmentation.loading import crop_and_base_size

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"main", "test", "export", "bench"}


def test_no_module_of_the_package_imports_a_command():
    for path in sorted((ROOT / "segmentation").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            assert not {name.split(".")[0] for name in names} & COMMANDS, (path.name, names)


def test_a_dataset_is_registered_once_by_its_layout(monkeypatch):
    class WideKitti(KittiLayout):
        base_size, crop_size = 200, (96, 192)
    monkeypatch.setitem(LAYOUTS, "wide", WideKitti())
    args = argparse.Namespace(dataset="wide", crop_size=None, base_size=None)
    assert crop_and_base_size(args) == ((96, 192), 200)
