"""Export a trained FCN as one self-contained file: ONNX (onnxruntime, TensorRT, ...) or a torch.export program.

    python export.py --checkpoint runs/x/best.pt --out fcn16.onnx
    python export.py --checkpoint runs/x/best.pt --format pt2 --out fcn16.pt2 --with-logits

The file's contract, the one fact a consumer needs: input ``image``, a (1, 3, H, W) uint8 RGB image of any height
and width from 33 up (KITTI alone has 375x1242, 370x1224, ...); output ``label_ids``, the (1, H, W) uint8 map of
Cityscapes label ids, the same values as test.py's pred_labelIds PNGs; with --with-logits also ``logits``, the
(1, C, H, W) float32 class scores before softmax. ImageNet normalisation, the FCN, the argmax and the class ->
label-id table are all inside the file, so running it needs nothing from this repository.

Both formats come from one ``torch.export`` trace with dynamic height and width; the ONNX file is its translation
by torch.onnx's exporter (which needs the onnxscript package, in requirements.txt).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from data_preprocessing import normalize
from labels import LabelSet
from segmentation import UserError, error_line, runtime
from segmentation.checkpoint import load_model

FORMATS = ("onnx", "pt2")
EXAMPLE_SIZE = (375, 1242)  # a KITTI frame; the trace is dynamic in both, so any size would do
OLD_EXPORT = torch.__version__ < "2.13"  # see ExportableMaxPool; a TorchVersion: 2.9 < 2.13, 2.13 pre-releases too


class ExportableMaxPool(nn.Module):
    """The ResNet stem's ``nn.MaxPool2d(3, stride=2, padding=1)`` as the same pooling at stride 1, every second
    row and column kept: the same values (a maximum is exact). torch.export before 2.13 specialises a stride-2
    max_pool2d's output size on the parity of (H - 1) // 2 (its shape function's ``div_rtn``), so a program
    traced on a 375-row frame refused 370 rows; at stride 1 every size stays symbolic. Used only there
    (``OLD_EXPORT``): it costs onnxruntime a little time (docs/results.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, 3, stride=1, padding=1)[..., ::2, ::2]


class LabelIdNet(nn.Module):
    """uint8 RGB image -> Cityscapes label ids: the whole deployed computation as one module to trace."""

    def __init__(self, fcn: nn.Module, label_set: LabelSet, with_logits: bool, exportable_max_pool: bool = OLD_EXPORT):
        super().__init__()
        self.fcn, self.with_logits = fcn, with_logits
        if exportable_max_pool:
            self.fcn = copy.deepcopy(fcn)  # the caller's model keeps its own stem
            self.fcn.trunk.stem[3] = ExportableMaxPool()
        self.register_buffer("class_to_id", torch.from_numpy(label_set.class_to_id.copy()))

    def forward(self, image: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(1, 3, H, W) uint8 RGB -> (1, H, W) uint8 label ids [, (1, C, H, W) float32 logits]."""
        logits = self.fcn(normalize(image))
        label_ids = self.class_to_id[logits.argmax(1)]
        return (label_ids, logits) if self.with_logits else label_ids


def export_program(net: LabelIdNet) -> torch.export.ExportedProgram:
    """Trace ``net`` once with height and width dynamic (Dim.DYNAMIC: the size arithmetic of the trunk and of
    ``model.upsample_aligned`` is kept symbolic, and the program checks its own input range when run)."""
    example = torch.zeros(1, 3, *EXAMPLE_SIZE, dtype=torch.uint8)
    dynamic = {"image": {2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}}
    return torch.export.export(net.eval(), (example,), dynamic_shapes=dynamic, strict=False)


def save_onnx(program: torch.export.ExportedProgram, path: Path, with_logits: bool) -> None:
    """Translate the traced program to ONNX, weights inside the one file, axes named height and width."""
    outputs = ["label_ids", "logits"] if with_logits else ["label_ids"]
    try:
        torch.onnx.export(program, (torch.zeros(1, 3, *EXAMPLE_SIZE, dtype=torch.uint8),), str(path),
                          input_names=["image"], output_names=outputs, external_data=False, verbose=False,
                          dynamic_shapes={"image": {2: "height", 3: "width"}})
    except ImportError as error:
        raise UserError(f"ONNX export needs {error.name or 'onnxscript'}, which is not installed; run "
                        "pip install -r requirements.txt, or use --format pt2") from None


def save_atomically(program: torch.export.ExportedProgram, path: Path, fmt: str, with_logits: bool) -> None:
    """Write beside ``path`` and rename, as checkpoint.py does, so a failed export never leaves half a file."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        if fmt == "onnx":
            save_onnx(program, tmp, with_logits)
        else:
            torch.export.save(program, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


RUN_FILES = ("last.pt", "best.pt", "metrics.csv", "class_iou.csv", "curves.png", "train.txt", "val.txt")


def format_of(out: Path | None, fmt: str | None) -> str:
    """The file's format: --format, else --out's extension; a name that says another format than the content is
    refused (a .pt2 file holding ONNX is unreadable by torch.export.load)."""
    suffix = out.suffix.lower().lstrip(".") if out else None
    if fmt and suffix and suffix != fmt:
        raise UserError(f"--out {out} names a .{suffix} file but --format is {fmt}; make them agree, e.g. --out "
                        f"{out.with_suffix('.' + fmt)}")
    if not fmt and suffix and suffix not in FORMATS:
        raise UserError(f"--out {out}: no format is named .{suffix}; end the name in .onnx or .pt2")
    return fmt or suffix or "onnx"


def check_out(path: Path, force: bool) -> None:
    """Refuse before the slow trace: an existing file (a deployed model, say) is only replaced with --force, and a
    file of a training run never."""
    if path.is_dir():
        raise UserError(f"--out {path} is a folder; give a file name, e.g. {path / 'model.onnx'}")
    if path.name in RUN_FILES and (path.parent / "last.pt").is_file():
        raise UserError(f"--out {path} is a file of the training run in {path.parent}; export to another name, e.g. "
                        f"{path.parent / 'model.onnx'}")
    if path.exists() and not force:
        raise UserError(f"{path} already exists; pass --force to overwrite it, or choose another --out")
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist; create it or choose another --out")
    if not os.access(path.parent, os.W_OK):
        raise UserError(f"cannot write {path}: folder {path.parent} is not writable; choose another --out")


def export(checkpoint: Path, out: Path, fmt: str = "onnx", with_logits: bool = False, force: bool = False) -> None:
    """Load ``checkpoint`` as test.py does and write the deployable file ``out`` in format ``fmt``."""
    check_out(out, force)
    fcn, _, label_set = load_model(checkpoint, torch.device("cpu"))
    fcn = fcn.to(memory_format=torch.contiguous_format)  # torch.export.save expects dense weights, not channels_last
    save_atomically(export_program(LabelIdNet(fcn, label_set, with_logits)), out, fmt, with_logits)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="best.pt or last.pt written by main.py")
    p.add_argument("--format", choices=FORMATS, help="(default: --out's extension, else onnx)")
    p.add_argument("--out", type=Path, help="file to write (default: beside the checkpoint, e.g. best.onnx)")
    p.add_argument("--with-logits", action="store_true", help="also output the (1, C, H, W) float32 logits")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        fmt = format_of(args.out, args.format)
        out = args.out or args.checkpoint.with_suffix(f".{fmt}")
        if not args.checkpoint.is_file():
            raise UserError(f"checkpoint {args.checkpoint} does not exist; pass the best.pt or last.pt of a run")
        with runtime.interrupts_end_in_one_line(f"nothing was written: {out} is written whole or not at all"):
            export(args.checkpoint, out, fmt, args.with_logits, args.force)
    except (UserError, OSError) as error:
        sys.exit(error_line(error))
    print(f"wrote {out}: (1, 3, H, W) uint8 RGB -> (1, H, W) uint8 label ids{' + logits' if args.with_logits else ''}")


if __name__ == "__main__":
    main()
