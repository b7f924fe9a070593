"""export.py: the ONNX and torch.export files give the label ids test.py predicts, at any image size.

Tolerance for logits. The exported graph runs the same float32 operations as PyTorch in another order (onnxruntime's
convolutions, contiguous instead of channels_last weights), so logits differ by rounding: 0.6e-6 to 2e-6 of the
logit scale on these frames (convolutions sum up to 4608 float32 products; float32's epsilon is 1.2e-7). The bound
1e-4 x max|logit| leaves a factor of 50 for other CPUs, while a real mistake fails it by far (scaling the
normalised input by 1.01 gives 0.017 x max|logit|; a shifted upsampling or a swapped axis, more). The label maps may then differ
only where two classes' logits are closer than that rounding, hence 99.9% agreement, not 100%.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from conftest import KITTI_SAMPLE

import export
from data_preprocessing import read_image
from segmentation import UserError
from segmentation.checkpoint import load_model
from segmentation.engine import predict

ROOT = Path(__file__).resolve().parents[1]
FRAMES = sorted((KITTI_SAMPLE / "testing" / "image_2").glob("*.png"))[:2]
LOGIT_TOLERANCE = 1e-4  # of max |logit|; see the module docstring
MIN_AGREEMENT = 0.999


def kitti_image(path: Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(1, 3, H, W) uint8 RGB of a real frame, cropped from the top-left to ``size`` (a smaller real KITTI size)."""
    image = torch.from_numpy(read_image(path)).permute(2, 0, 1)[None]
    return image if size is None else image[..., : size[0], : size[1]].contiguous()


# Real frames at KITTI's two common sizes, and the smallest size the exported files accept.
IMAGES = [(FRAMES[0], None), (FRAMES[1], None), (FRAMES[0], (370, 1224)), (FRAMES[1], (33, 33))]
IMAGE_IDS = ["375x1242-a", "375x1242-b", "370x1224", "33x33"]


@pytest.fixture(scope="module")
def reference_model(trained_run):
    model, _, label_set = load_model(trained_run / "best.pt", torch.device("cpu"))
    return model, label_set


@torch.no_grad()
def reference(reference_model, image: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """test.py's way: engine.predict's scores, argmax, class -> label id. (1, H, W) ids, (1, C, H, W) log-probs."""
    model, label_set = reference_model
    scores = predict(model, image, torch.device("cpu"))
    return label_set.class_to_id[scores.argmax(1).numpy()], torch.log_softmax(scores, 1).numpy()


def assert_matches_reference(label_ids: np.ndarray, logits: np.ndarray, reference_model, image: torch.Tensor) -> None:
    expected_ids, expected_log_probabilities = reference(reference_model, image)
    assert label_ids.dtype == np.uint8 and label_ids.shape == (1, *image.shape[-2:])
    log_probabilities = torch.log_softmax(torch.from_numpy(logits), 1).numpy()
    scale = np.abs(logits).max()
    assert np.abs(log_probabilities - expected_log_probabilities).max() <= LOGIT_TOLERANCE * scale
    assert (label_ids == expected_ids).mean() >= MIN_AGREEMENT
    assert set(np.unique(label_ids)) <= set(reference_model[1].class_to_id.tolist())


@pytest.fixture(scope="module")
def onnx_file(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "fcn16.onnx"
    export.export(trained_run / "best.pt", out, "onnx", with_logits=True)
    return out


@pytest.fixture(scope="module")
def pt2_file(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "fcn16.pt2"
    export.export(trained_run / "best.pt", out, "pt2", with_logits=True)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("path, size", IMAGES, ids=IMAGE_IDS)
def test_onnx_file_gives_test_py_label_ids_on_real_frames_of_any_size(onnx_file, reference_model, path, size):
    image = kitti_image(path, size)
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    label_ids, logits = session.run(["label_ids", "logits"], {"image": image.numpy()})
    assert_matches_reference(label_ids, logits, reference_model, image)


@pytest.mark.slow
def test_onnx_file_declares_uint8_image_of_dynamic_height_and_width(onnx_file):
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (image,), outputs = session.get_inputs(), session.get_outputs()
    assert (image.name, image.type, image.shape) == ("image", "tensor(uint8)", [1, 3, "height", "width"])
    assert [(o.name, o.type, o.shape[-2:]) for o in outputs] == [
        ("label_ids", "tensor(uint8)", ["height", "width"]), ("logits", "tensor(float)", ["height", "width"])]


@pytest.mark.slow
@pytest.mark.parametrize("path, size", IMAGES[1:3], ids=IMAGE_IDS[1:3])
def test_pt2_file_gives_test_py_label_ids_at_two_sizes(pt2_file, reference_model, path, size):
    image = kitti_image(path, size)
    with torch.no_grad():
        label_ids, logits = torch.export.load(pt2_file).module()(image)
    assert_matches_reference(label_ids.numpy(), logits.numpy(), reference_model, image)


@pytest.mark.slow
def test_label_ids_alone_without_with_logits(trained_run, tmp_path, reference_model):
    out = tmp_path / "ids.pt2"
    export.export(trained_run / "best.pt", out, "pt2")
    image = kitti_image(FRAMES[0], (96, 320))
    label_ids = torch.export.load(out).module()(image)
    assert isinstance(label_ids, torch.Tensor)
    assert (label_ids.numpy() == reference(reference_model, image)[0]).mean() >= MIN_AGREEMENT


def test_existing_out_is_refused_in_one_line_and_left_untouched(trained_run, tmp_path):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"a deployed model")
    result = subprocess.run([sys.executable, str(ROOT / "export.py"), "--checkpoint", str(trained_run / "best.pt"),
                             "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert str(out) in result.stderr and "--force" in result.stderr
    assert out.read_bytes() == b"a deployed model"


@pytest.mark.slow
def test_force_replaces_an_existing_file(trained_run, tmp_path):
    out = tmp_path / "model.pt2"
    out.write_bytes(b"an older export")
    export.export(trained_run / "best.pt", out, "pt2", force=True)
    assert torch.export.load(out).module()(kitti_image(FRAMES[0], (64, 64))).shape == (1, 64, 64)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]  # no temporary file left beside it


@pytest.mark.parametrize("name, message", [("missing/model.onnx", "does not exist"), (".", "is a folder")])
def test_unusable_out_is_refused_before_loading(tmp_path, name, message):
    with pytest.raises(UserError, match=message):
        export.export(tmp_path / "no-checkpoint.pt", tmp_path / name)


@pytest.mark.parametrize("height, width", [(188, 621), (185, 612), (17, 16), (1, 2)])
def test_exportable_max_pool_equals_the_stems_max_pool(height, width):
    x = torch.randn(2, 4, height, width, generator=torch.Generator().manual_seed(height))
    assert torch.equal(export.ExportableMaxPool()(x), torch.nn.MaxPool2d(3, stride=2, padding=1)(x))


@pytest.mark.slow
def test_program_with_the_exportable_max_pool_gives_test_py_label_ids_at_the_other_parity(reference_model):
    """The program torch < 2.13 exports (export.OLD_EXPORT), traced on 375 rows and run on 370: there, without
    ExportableMaxPool, it refused any height of the other parity of (H - 1) // 2. Here it checks the values."""
    model, label_set = reference_model
    net = export.LabelIdNet(model, label_set, with_logits=True, exportable_max_pool=True)
    assert isinstance(model.trunk.stem[3], torch.nn.MaxPool2d)  # the caller's model is left as it was
    net.fcn.to(memory_format=torch.contiguous_format)  # as export.export does
    image = kitti_image(FRAMES[0], (370, 1224))
    with torch.no_grad():
        label_ids, logits = export.export_program(net).module()(image)
    assert_matches_reference(label_ids.numpy(), logits.numpy(), reference_model, image)
