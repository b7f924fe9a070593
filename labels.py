"""The label tables: which value in a label PNG is which class. The Cityscapes table, as KITTI's semantic
benchmark uses it, is written once here (same rows as cityscapesScripts' ``helpers/labels.py``); another
vocabulary comes as a class table file (``read_class_table``). Every lookup is computed from a table, so
changing a class means editing one row.

A ``LabelSet`` is what a model predicts, chosen in one place (``get_label_set``) from --label-set:
- ``train``: the 19 Cityscapes benchmark classes (``trainId`` 0..18); every other id maps to 255 and is ignored.
- ``full``: every Cityscapes label id 0..33 is its own class, as the original assignment's 35-way head did. Id -1
  (license plate) cannot occur in an 8-bit label PNG; ids 34..254 are not in the table and are rejected
  by the data loader; 255 is ignored.
- a class table file, a CSV a person writes by hand, one row per label value (any values 0..254, in any order,
  with gaps); rows marked void are ignored like 255. It may come from a spreadsheet: UTF-8 (with a byte-order
  mark or without), UTF-16 or Windows-1252, separated by commas, semicolons or tabs, headers in any case::

      value,name,r,g,b,void
      0,sky,128,128,128,
      5,road,128,64,128,
      200,unlabelled,0,0,0,yes
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from segmentation import UserError

IGNORE_INDEX = 255


class Label(NamedTuple):
    name: str
    id: int
    trainId: int
    category: str
    categoryId: int
    hasInstances: bool
    ignoreInEval: bool
    color: tuple[int, int, int]


LABELS: tuple[Label, ...] = (
    #     name                    id  trainId  category        catId  hasInst ignoreEval  color
    Label("unlabeled",             0,   255,   "void",           0,   False,  True,  (0, 0, 0)),
    Label("ego vehicle",           1,   255,   "void",           0,   False,  True,  (0, 0, 0)),
    Label("rectification border",  2,   255,   "void",           0,   False,  True,  (0, 0, 0)),
    Label("out of roi",            3,   255,   "void",           0,   False,  True,  (0, 0, 0)),
    Label("static",                4,   255,   "void",           0,   False,  True,  (0, 0, 0)),
    Label("dynamic",               5,   255,   "void",           0,   False,  True,  (111, 74, 0)),
    Label("ground",                6,   255,   "void",           0,   False,  True,  (81, 0, 81)),
    Label("road",                  7,     0,   "flat",           1,   False,  False, (128, 64, 128)),
    Label("sidewalk",              8,     1,   "flat",           1,   False,  False, (244, 35, 232)),
    Label("parking",               9,   255,   "flat",           1,   False,  True,  (250, 170, 160)),
    Label("rail track",           10,   255,   "flat",           1,   False,  True,  (230, 150, 140)),
    Label("building",             11,     2,   "construction",   2,   False,  False, (70, 70, 70)),
    Label("wall",                 12,     3,   "construction",   2,   False,  False, (102, 102, 156)),
    Label("fence",                13,     4,   "construction",   2,   False,  False, (190, 153, 153)),
    Label("guard rail",           14,   255,   "construction",   2,   False,  True,  (180, 165, 180)),
    Label("bridge",               15,   255,   "construction",   2,   False,  True,  (150, 100, 100)),
    Label("tunnel",               16,   255,   "construction",   2,   False,  True,  (150, 120, 90)),
    Label("pole",                 17,     5,   "object",         3,   False,  False, (153, 153, 153)),
    Label("polegroup",            18,   255,   "object",         3,   False,  True,  (153, 153, 153)),
    Label("traffic light",        19,     6,   "object",         3,   False,  False, (250, 170, 30)),
    Label("traffic sign",         20,     7,   "object",         3,   False,  False, (220, 220, 0)),
    Label("vegetation",           21,     8,   "nature",         4,   False,  False, (107, 142, 35)),
    Label("terrain",              22,     9,   "nature",         4,   False,  False, (152, 251, 152)),
    Label("sky",                  23,    10,   "sky",            5,   False,  False, (70, 130, 180)),
    Label("person",               24,    11,   "human",          6,   True,   False, (220, 20, 60)),
    Label("rider",                25,    12,   "human",          6,   True,   False, (255, 0, 0)),
    Label("car",                  26,    13,   "vehicle",        7,   True,   False, (0, 0, 142)),
    Label("truck",                27,    14,   "vehicle",        7,   True,   False, (0, 0, 70)),
    Label("bus",                  28,    15,   "vehicle",        7,   True,   False, (0, 60, 100)),
    Label("caravan",              29,   255,   "vehicle",        7,   True,   True,  (0, 0, 90)),
    Label("trailer",              30,   255,   "vehicle",        7,   True,   True,  (0, 0, 110)),
    Label("train",                31,    16,   "vehicle",        7,   True,   False, (0, 80, 100)),
    Label("motorcycle",           32,    17,   "vehicle",        7,   True,   False, (0, 0, 230)),
    Label("bicycle",              33,    18,   "vehicle",        7,   True,   False, (119, 11, 32)),
    Label("license plate",        -1,    -1,   "vehicle",        7,   False,  True,  (0, 0, 142)),
)

ID_TO_LABEL = {label.id: label for label in LABELS}
TRAIN_LABELS = tuple(sorted((l for l in LABELS if 0 <= l.trainId < IGNORE_INDEX), key=lambda l: l.trainId))
CATEGORIES = tuple(dict.fromkeys(l.category for l in LABELS if not l.ignoreInEval))
VALID_IDS = np.array(sorted(l.id for l in LABELS if l.id >= 0), dtype=np.uint8)

ID_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, dtype=np.uint8)  # index it with a uint8 label map; other ids give 255
ID_TO_TRAIN_ID[VALID_IDS] = [ID_TO_LABEL[i].trainId for i in VALID_IDS]
ID_TO_COLOR = np.zeros((256, 3), dtype=np.uint8)  # the RGB palette of label ids; other ids are black
ID_TO_COLOR[VALID_IDS] = [ID_TO_LABEL[i].color for i in VALID_IDS]


@dataclass(frozen=True)
class LabelSet:
    """The classes a model predicts, and how they relate to the values in label files.

    ``id_to_class`` (256,) maps a label value to a class index, 255 meaning ignore (void values and 255
    itself); ``class_to_id`` (C,) maps a class back to the value written in prediction PNGs; ``known`` (256,)
    marks the values a label file may hold; ``colors`` (C, 3) uint8 RGB of each class, ``value_colors`` (256, 3)
    of each label value, void ones included (for colour label images). ``class_to_train_id`` (C,) is the
    Cityscapes benchmark trainId of each class (255 where unscored) for the Cityscapes sets, and None for a
    table of another vocabulary, whose own classes are then its benchmark. ``source`` names the table.
    """

    name: str
    class_names: tuple[str, ...]
    class_to_id: np.ndarray
    id_to_class: np.ndarray
    known: np.ndarray
    colors: np.ndarray
    value_colors: np.ndarray
    class_to_train_id: np.ndarray | None
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict:
        """Plain lists and strings, for a checkpoint loaded with ``weights_only=True``."""
        return {key: value.tolist() if isinstance(value, np.ndarray) else value for key, value in vars(self).items()}

    @classmethod
    def from_dict(cls, table: dict) -> LabelSet:
        arrays = {key: None if table.get(key) is None else np.array(table[key], dtype=np.uint8)
                  for key in ("class_to_id", "id_to_class", "colors", "value_colors", "class_to_train_id")}
        if arrays["value_colors"] is None:  # tables saved before it was kept: the classes' colours, void black
            arrays["value_colors"] = np.zeros((256, 3), np.uint8)
            arrays["value_colors"][arrays["class_to_id"]] = arrays["colors"]
        return cls(table["name"], tuple(table["class_names"]), known=np.array(table["known"], dtype=bool),
                   source=table["source"], **arrays)


def _make_label_set(name: str, labels: tuple[Label, ...]) -> LabelSet:
    class_to_id = np.array([l.id for l in labels], dtype=np.uint8)
    id_to_class = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    id_to_class[class_to_id] = np.arange(len(labels), dtype=np.uint8)
    known = np.zeros(256, bool)
    known[VALID_IDS] = known[IGNORE_INDEX] = True
    return LabelSet(name, tuple(l.name for l in labels), class_to_id, id_to_class, known, ID_TO_COLOR[class_to_id],
                    ID_TO_COLOR, ID_TO_TRAIN_ID[class_to_id], "the Cityscapes table (ids 0..33, 255 = ignore)")


LABEL_SETS = {
    "train": _make_label_set("train", TRAIN_LABELS),
    "full": _make_label_set("full", tuple(ID_TO_LABEL[i] for i in VALID_IDS)),
}
TABLE_HELP = "a CSV file with the header value,name,r,g,b[,void] and one row per label value"
TABLE_COLUMNS = ("value", "name", "r", "g", "b", "void")
VOID_YES, VOID_NO = {"yes", "y", "true", "1", "void", "x"}, {"", "no", "n", "false", "0"}


def table_text(path: Path) -> str:
    """A class table's text as spreadsheets and editors save it: UTF-8 with or without a byte-order mark, UTF-16
    with one (Excel's "Unicode Text"), else Windows-1252 (Excel's plain "CSV" on Western systems)."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise UserError(f"--label-set {path}: cannot be read ({error.strerror}); give {TABLE_HELP}") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16", errors="replace")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def table_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """``(line number, {column: stripped cell})`` of each row. The separator is the header's: comma, semicolon
    (spreadsheets in locales with a decimal comma) or tab; header names are matched without case or spaces; blank,
    comment (#) and all-empty rows (a spreadsheet's ",,,,") are skipped; a row that stops before the optional void
    column has it empty; every other mismatch is refused."""
    lines = [(number, line) for number, line in enumerate(table_text(path).splitlines(), 1)
             if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise UserError(f"--label-set {path}: the file is empty; give {TABLE_HELP}")
    delimiter = max(",;\t", key=lines[0][1].count)  # the header line's
    parsed = csv.reader([line for _, line in lines], delimiter=delimiter)
    header = [cell.strip().lower() for cell in next(parsed)]
    while header and not header[-1]:  # a spreadsheet's empty columns after the last one: "value,...,void,,"
        header.pop()
    unknown = [name for name in header if name not in TABLE_COLUMNS]
    if unknown or not set(TABLE_COLUMNS[:5]) <= set(header) or len(set(header)) < len(header):
        problem = f"column {unknown[0]!r} is not one of" if unknown else "the header must name each of"
        raise UserError(f"--label-set {path}, line {lines[0][0]}: {problem} {','.join(TABLE_COLUMNS)} once "
                        f"(void optional); give {TABLE_HELP}")
    rows = []
    for (number, _), cells in zip(lines[1:], parsed):
        if not any(cell.strip() for cell in cells):
            continue
        while len(cells) > len(header) and not cells[-1].strip():
            cells.pop()
        if len(cells) < len(header) and set(header[len(cells):]).isdisjoint(TABLE_COLUMNS[:5]):
            cells += [""] * (len(header) - len(cells))  # a hand-written row that leaves its empty void cell out
        if len(cells) != len(header):
            raise UserError(f"{path}, line {number}: {len(cells)} cells where the header has {len(header)}; a name "
                            f"that holds a {delimiter!r} needs quotes")
        rows.append((number, {name: cell.strip() for name, cell in zip(header, cells)}))
    return rows


def table_row(path: Path, number: int, row: dict[str, str]) -> tuple[int, str, tuple[int, int, int], bool]:
    """(value, name, (r, g, b), void) of one row, each checked."""
    try:
        value, color = int(row["value"]), tuple(int(row[c]) for c in "rgb")
    except ValueError:
        raise UserError(f"{path}, line {number}: value, r, g and b must be whole numbers") from None
    if not 0 <= value < IGNORE_INDEX or not all(0 <= c <= 255 for c in color):
        raise UserError(f"{path}, line {number}: value {value} must be in 0..254 (255 is always ignored), and r, g, "
                        "b in 0..255")
    void = row.get("void", "").lower()
    if void not in VOID_YES | VOID_NO:
        raise UserError(f"{path}, line {number}: void is {row['void']!r}; write yes for a void row, or leave it empty")
    if not row["name"]:
        raise UserError(f"{path}, line {number}: the name is empty; every row needs one")
    return value, row["name"], color, void in VOID_YES


def refuse_repeats(path: Path, what: str, keys_and_lines: list[tuple[object, int]]) -> None:
    """Refuse a value or name that more than one row holds, naming its lines."""
    lines_of = {}
    for key, number in keys_and_lines:
        lines_of.setdefault(key, []).append(number)
    for key, lines in lines_of.items():
        if len(lines) > 1:
            raise UserError(f"{path}: {what} {key} is on lines {', '.join(map(str, lines))}; keep one row for each")


def read_class_table(path: Path) -> LabelSet:
    """A class table file (see the module docstring) as a LabelSet; it reads as meant or is refused in one line
    naming the line or column (``table_rows``, ``table_row``)."""
    path = Path(path)
    rows = [(number, *table_row(path, number, row)) for number, row in table_rows(path)]
    refuse_repeats(path, "value", [(value, number) for number, value, *_ in rows])
    refuse_repeats(path, "class name", [(repr(name), number) for number, _, name, _, void in rows if not void])
    classes = [(value, name, color) for _, value, name, color, void in rows if not void]
    if not classes:
        raise UserError(f"{path}: every row is void; a table needs at least one class to learn")
    value_colors, known = np.zeros((256, 3), np.uint8), np.zeros(256, bool)
    known[IGNORE_INDEX] = True
    for _, value, _, color, _ in rows:
        known[value], value_colors[value] = True, color
    class_to_id = np.array([value for value, _, _ in classes], np.uint8)
    id_to_class = np.full(256, IGNORE_INDEX, np.uint8)
    id_to_class[class_to_id] = np.arange(len(classes), dtype=np.uint8)
    return LabelSet(path.name, tuple(name for _, name, _ in classes), class_to_id, id_to_class, known,
                    value_colors[class_to_id], value_colors, None, f"class table {path}")


def get_label_set(name: str | Path) -> LabelSet:
    """The one place where --label-set picks the classes: ``train``, ``full``, or a class table file."""
    if name in LABEL_SETS:
        return LABEL_SETS[name]
    if not Path(name).is_file():
        raise UserError(f"--label-set {name}: use train, full, or {TABLE_HELP}")
    return read_class_table(Path(name))


def colorize(label_map: np.ndarray, label_set: LabelSet | None = None) -> np.ndarray:
    """(H, W) integer map -> (H, W, 3) uint8 RGB image.

    With ``label_set`` the map holds that set's class indices; without, it holds Cityscapes label ids.
    Ignored pixels (255) are black.
    """
    palette = ID_TO_COLOR if label_set is None else np.vstack(
        [label_set.colors, np.zeros((256 - label_set.num_classes, 3), np.uint8)])
    return palette[np.asarray(label_map, dtype=np.uint8)]
