"""Your own classes: a hand-made tree of JPEG images whose class table is non-contiguous (0, 5, 200) with a declared
void value (77) trains, evaluates by the official rules, writes and exports the table's values, all without the
table file once the checkpoint holds it; cross-table fine-tuning; colour labels; checks against the table."""
import json
import logging

import cv2
import numpy as np
import onnxruntime
import pytest
import torch
from conftest import train_argv

import data_preprocessing
import export
import main
import test as evaluation
from labels import get_label_set, read_class_table
from segmentation import UserError, runtime

TABLE = "value,name,r,g,b,void\n# a comment line\n200,car,0,0,142,\n0,sky,70,130,180,\n5,road,128,64,128,\n" \
        "77,unlabelled,0,0,0,yes\n"
VALUES = np.array([200, 0, 5])  # class index -> value, in the table's row order


def write_tree(root, num: int = 10, size=(64, 96)):
    """Sky above, road below, a car box; a void (77) band and a few 255 pixels. Images are JPEG."""
    rng = np.random.default_rng(0)
    for folder in ("image_2", "semantic"):
        (root / "training" / folder).mkdir(parents=True)
    colours = {0: (70, 130, 180), 5: (128, 64, 128), 200: (0, 0, 142), 77: (0, 0, 0), 255: (0, 0, 0)}
    for i in range(num):
        label = np.zeros(size, np.uint8)
        label[size[0] // 2:] = 5
        y, x = rng.integers(size[0] // 2 - 8, size[0] - 16), rng.integers(0, size[1] - 24)
        label[y:y + 14, x:x + 24] = 200
        label[:3] = 77
        label[-1, :5] = 255
        image = np.zeros((*size, 3))
        for value, colour in colours.items():
            image[label == value] = colour
        image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(root / "training" / "image_2" / f"{i:04d}.jpg"), image[..., ::-1])
        cv2.imwrite(str(root / "training" / "semantic" / f"{i:04d}.png"), label)
    (root / "table.csv").write_text(TABLE)
    return root


@pytest.fixture(scope="module")
def table_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("table")
    root = write_tree(tmp / "tree")
    main.train(main.parse_args(train_argv(root, tmp / "run", "--arch", "fcn16", "--epochs", "3", "--lr", "0.02",
                                          "--crop-size", "64", "--base-size", "64", "--label-set",
                                          str(root / "table.csv"))))
    (root / "table.csv").unlink()  # from here on the checkpoint carries the table
    return {"root": root, "run": tmp / "run"}


def test_a_class_table_maps_non_contiguous_values_and_ignores_its_void_rows(tmp_path):
    (tmp_path / "t.csv").write_text(TABLE)
    table = read_class_table(tmp_path / "t.csv")
    assert table.class_names == ("car", "sky", "road") and table.class_to_id.tolist() == VALUES.tolist()
    assert [table.id_to_class[v] for v in (200, 0, 5, 77, 255, 9)] == [0, 1, 2, 255, 255, 255]
    assert table.known[[0, 5, 77, 200, 255]].all() and table.known.sum() == 5
    assert table.class_to_train_id is None and table.colors[0].tolist() == [0, 0, 142]


@pytest.mark.parametrize("text, message", [("value,name\n1,a\n", "line 1: the header must name each of"),
                                           ("value,name,r,g,b\n1,a,0,0,0\n1,b,1,1,1\n", "value 1 is on lines 2, 3"),
                                           ("value,name,r,g,b\n255,a,0,0,0\n", "in 0..254"),
                                           ("value,name,r,g,b\nx,a,0,0,0\n", "line 2: value, r, g and b must be whole"),
                                           ("value,name,r,g,b,void\n3,a,0,0,0,yes\n", "every row is void")])
def test_a_mistake_in_a_class_table_is_one_line_naming_the_row(tmp_path, text, message):
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(UserError, match=message):
        get_label_set(str(tmp_path / "t.csv"))


SHEET = [("value", "name", "r", "g", "b", "void"), ("200", "car", "0", "0", "142", ""),
         ("0", "sky", "70", "130", "180", ""), ("77", "unlabelled", "1", "2", "3", "yes"),
         ("5", "Straße", "128", "64", "128", "")]  # a class named outside ASCII: each encoding must decode it


@pytest.mark.parametrize("written_as", ["excel utf-8", "excel unicode text", "excel western", "libreoffice german",
                                        "hand edit"])
def test_a_class_table_reads_as_meant_however_a_spreadsheet_or_editor_wrote_it(tmp_path, written_as):
    """The same table as Excel's "CSV UTF-8" (byte-order mark, CRLF, trailing empty rows), its "Unicode Text" (UTF-16,
    tabs), its plain "CSV" (Windows-1252), LibreOffice in a decimal-comma locale (semicolons, quoted text) and a
    hand edit (capitalised header, spaces after commas, a comment)."""
    if written_as == "excel utf-8":
        raw = "\r\n".join(",".join(row + ("", "")) for row in SHEET + [("",) * 6] * 2).encode("utf-8-sig") + b"\r\n"
    elif written_as == "excel unicode text":
        raw = "\r\n".join("\t".join(row) for row in SHEET).encode("utf-16")
    elif written_as == "excel western":
        raw = "\r\n".join(",".join(row) for row in SHEET).encode("cp1252")
    elif written_as == "libreoffice german":
        raw = "\n".join(";".join(f'"{c}"' if not c.isdigit() else c for c in row) for row in SHEET).encode()
    else:
        rows = [", ".join(c.capitalize() if i == 0 else c for c in row) for i, row in enumerate(SHEET)]
        raw = ("# my classes\n" + "\n".join(rows) + "\n").encode()
    (tmp_path / "t.csv").write_bytes(raw)
    table = read_class_table(tmp_path / "t.csv")
    assert table.class_names == ("car", "sky", "Straße") and table.class_to_id.tolist() == VALUES.tolist()
    assert table.known[77] and table.id_to_class[77] == 255
    assert table.colors[0].tolist() == [0, 0, 142]


def test_a_row_that_leaves_out_its_empty_void_cell_reads_as_a_class_row(tmp_path):
    """Hand-written tables read before void became a column's sixth cell: "0,sky,70,130,180" under a header
    with void is a class row (void empty), as it was at 5167cb6."""
    (tmp_path / "t.csv").write_text("value,name,r,g,b,void\n0,sky,70,130,180\n5,road,128,64,128,\n77,x,0,0,0,yes\n")
    table = read_class_table(tmp_path / "t.csv")
    assert table.class_names == ("sky", "road") and table.id_to_class[77] == 255


@pytest.mark.parametrize("file_name", ["classes.txt", "CLASSES.CSV", "classes"])
def test_main_takes_a_class_table_by_its_content_whatever_its_file_is_called(tmp_path, file_name):
    """Excel's "Unicode Text" saves .txt, some tools write .CSV: main.py reads what the reader reads."""
    root = write_tree(tmp_path / "tree", num=4)
    table = tmp_path / file_name
    table.write_bytes("\r\n".join("\t".join(row) for row in (
        ("value", "name", "r", "g", "b", "void"), ("200", "car", "0", "0", "142", ""), ("0", "sky", "70", "130", "180", ""),
        ("5", "road", "128", "64", "128", ""), ("77", "unlabelled", "0", "0", "0", "yes"))).encode("utf-16"))
    main.train(main.parse_args(train_argv(root, tmp_path / "run", "--arch", "fcn32", "--epochs", "1", "--crop-size",
                                          "64", "--base-size", "64", "--label-set", str(table))))
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert tuple(state["label_table"]["class_names"]) == ("car", "sky", "road")


@pytest.mark.parametrize("text, message", [
    ("value,name,r,g,b,viod\n1,a,0,0,0,yes\n", "column 'viod' is not one of"),  # void misspelt: no row would be void
    ("value,name,r,g,b,void\n1,a,0,0,0,maybe\n", "line 2: void is 'maybe'"),
    ("value,name,r,g,b\n1,a,0,0\n", "line 2: 4 cells where the header has 5"),
    ("value,name,r,g,b\n1,a,b,0,0,0\n", "line 2: 6 cells where the header has 5"),  # a name with a comma, unquoted
    ("value,name,r,g,b\n1,a,0,0,0\n2,a,1,1,1\n", "class name 'a' is on lines 2, 3"),
    ("value;name;r;g;b\n1;a;0;0;0\n\n# two\n1;b;0;0;0\n", "value 1 is on lines 2, 5"),
    ("value,name,value,r,g,b\n1,a,1,0,0,0\n", "line 1: the header must name each of"),
    ("", "the file is empty")])
def test_what_a_class_table_cannot_mean_exactly_is_refused_naming_the_line_or_column(tmp_path, text, message):
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(UserError, match=message):
        read_class_table(tmp_path / "t.csv")


def direct_miou(root, names, predictions) -> float:
    """IoU per class counted pixel by pixel from the label and prediction PNGs, void and 255 left out, classes
    with no pixel in either left out of the mean: the official rules, without the project's metrics code."""
    tp, fp, fn = np.zeros(3), np.zeros(3), np.zeros(3)
    for name in names:
        truth = cv2.imread(str(root / "training" / "semantic" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        predicted = cv2.imread(str(predictions / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        scored = np.isin(truth, VALUES)
        for c, value in enumerate(VALUES):
            tp[c] += ((truth == value) & (predicted == value)).sum()
            fp[c] += ((truth != value) & (predicted == value) & scored).sum()
            fn[c] += ((truth == value) & (predicted != value)).sum()
    present = tp + fp + fn > 0
    return float((tp[present] / (tp + fp + fn)[present]).mean())


@pytest.mark.slow
def test_own_table_trains_evaluates_by_the_official_rules_and_writes_its_values(table_run):
    root, run = table_run["root"], table_run["run"]
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["num_classes"] == 3 and tuple(state["label_table"]["class_names"]) == ("car", "sky", "road")
    iou_rows = (run / "class_iou.csv").read_text().splitlines()
    assert iou_rows[0] == "epoch,car,sky,road" and len(iou_rows) == 4
    evaluation.main(["--checkpoint", str(run / "best.pt"), "--device", "cpu", "--workers", "0", "--out",
                     str(run / "eval")])
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert list(metrics["class_iou"]) == ["car", "sky", "road"] and metrics["category_iou"] == {}
    assert metrics["benchmark_mIoU"] == metrics["mIoU"] > 0.3
    names = (run / "val.txt").read_text().split()
    predictions = run / "eval" / "pred_labelIds"
    assert metrics["mIoU"] == pytest.approx(direct_miou(root, names, predictions), abs=1e-9)
    written = np.unique(np.concatenate([cv2.imread(str(p), cv2.IMREAD_UNCHANGED).ravel()
                                        for p in predictions.glob("*.png")]))
    assert set(written.tolist()) <= set(VALUES.tolist())


@pytest.mark.slow
def test_exported_file_outputs_the_tables_values_as_test_py_does(table_run, tmp_path):
    root, run = table_run["root"], table_run["run"]
    export.export(run / "best.pt", tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    images = tmp_path / "images"
    images.mkdir()
    name = (run / "val.txt").read_text().split()[0]
    image = cv2.imread(str(root / "training" / "image_2" / f"{name}.jpg"))
    cv2.imwrite(str(images / f"{name}.png"), image)  # lossless from here on: both sides read the same pixels
    evaluation.main(["--checkpoint", str(run / "best.pt"), "--images", str(images), "--out", str(tmp_path / "out"),
                     "--device", "cpu", "--workers", "0"])
    rgb = np.ascontiguousarray(image[..., ::-1].transpose(2, 0, 1))[None]
    (label_ids,) = session.run(["label_ids"], {"image": rgb})
    expected = cv2.imread(str(tmp_path / "out" / "pred_labelIds" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
    assert set(np.unique(label_ids).tolist()) <= set(VALUES.tolist())
    assert (label_ids[0] == expected).mean() > 0.999  # argmax ties aside, the same map


def test_init_from_a_model_of_other_classes_loads_the_trunk_and_renews_the_heads(trained_run, tmp_path, capsys):
    write_tree(tmp_path / "tree", num=4)
    table = str(tmp_path / "tree" / "table.csv")
    args = main.parse_args(train_argv(tmp_path / "tree", tmp_path / "run", "--arch", "fcn16", "--init-from",
                                      str(trained_run / "last.pt"), "--label-set", table))
    torch.manual_seed(0)
    model = main.make_model(args, runtime.Context(0, 1, torch.device("cpu")), get_label_set(args.label_set), None)
    source = torch.load(trained_run / "last.pt", weights_only=True)["model"]
    for key, value in model.state_dict().items():
        if key.startswith("trunk."):
            assert torch.equal(value, source[key]), key
    assert model.score32.weight.shape[0] == 3 and model.score16.weight.abs().sum() == 0
    out = capsys.readouterr().out
    assert "its 19 classes" in out and "only the trunk is loaded; fresh: score16, score32, up32to16" in out


def test_colour_labels_become_the_tables_values_and_unknown_colours_are_counted(tmp_path):
    (tmp_path / "t.csv").write_text(TABLE)
    table = get_label_set(str(tmp_path / "t.csv"))
    label = np.array([[200, 0, 5, 77], [5, 5, 0, 200]], np.uint8)
    (tmp_path / "colour").mkdir()
    cv2.imwrite(str(tmp_path / "colour" / "a.png"), table.value_colors[label][..., ::-1])
    odd = table.value_colors[label].copy()
    odd[0, :2] = (1, 2, 3)  # a colour no row has
    cv2.imwrite(str(tmp_path / "colour" / "b.png"), odd[..., ::-1])
    line = data_preprocessing.colour_labels_to_values(tmp_path / "colour", tmp_path / "labels", table)
    assert (cv2.imread(str(tmp_path / "labels" / "a.png"), cv2.IMREAD_UNCHANGED) == label).all()
    converted = cv2.imread(str(tmp_path / "labels" / "b.png"), cv2.IMREAD_UNCHANGED)
    assert (converted[0, :2] == 255).all() and (converted[:, 2:] == label[:, 2:]).all()
    assert "in 1 file(s): b.png (2 pixels)" in line
    with pytest.raises(UserError, match="already holds files"):
        data_preprocessing.colour_labels_to_values(tmp_path / "colour", tmp_path / "labels", table)


def test_check_names_every_file_with_values_not_in_the_table_and_skipped_files(tmp_path, caplog):
    root = write_tree(tmp_path / "tree", num=6)
    for name in ("0001", "0004"):
        path = root / "training" / "semantic" / f"{name}.png"
        label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        label[5, 5] = 9
        cv2.imwrite(str(path), label)
    (root / "training" / "image_2" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING), pytest.raises(UserError) as error:
        data_preprocessing.check_tree(root, "kitti", get_label_set(str(root / "table.csv")))
    assert "2 of 6 labelled pairs have problems" in str(error.value)
    assert "0001.png: label values [9] are not in class table" in str(error.value) and "0004.png" in str(error.value)
    assert "skipped 1 file(s) that are not .png/.jpg/.jpeg: notes.txt" in caplog.text
