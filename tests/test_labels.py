import numpy as np
import pytest
from cityscapesscripts.helpers import labels as reference

import labels
from segmentation import UserError


def test_table_matches_cityscapesscripts_row_by_row():
    assert len(labels.LABELS) == len(reference.labels) == 35
    for ours, theirs in zip(labels.LABELS, reference.labels):
        assert tuple(ours) == tuple(theirs)


def test_id_to_train_id_lut_matches_reference_and_ignores_unknown_ids():
    assert labels.ID_TO_TRAIN_ID.dtype == np.uint8 and labels.ID_TO_TRAIN_ID.shape == (256,)
    for label in reference.labels:
        if label.id >= 0:
            expected = label.trainId if label.trainId not in (-1, 255) else 255
            assert labels.ID_TO_TRAIN_ID[label.id] == expected, label.name
    assert (labels.ID_TO_TRAIN_ID[34:] == 255).all()


def test_train_label_set_has_the_19_benchmark_classes_in_train_id_order():
    train = labels.get_label_set("train")
    assert train.class_names == tuple(reference.trainId2label[i].name for i in range(19))
    assert train.id_to_class[7] == 0 and train.id_to_class[33] == 18 and train.id_to_class[0] == 255


def test_full_label_set_maps_every_id_0_to_33_to_itself_and_rejects_the_rest():
    full = labels.get_label_set("full")
    assert full.num_classes == 34
    assert (full.id_to_class[:34] == np.arange(34)).all() and (full.id_to_class[34:] == 255).all()
    assert (full.class_to_train_id == labels.ID_TO_TRAIN_ID[:34]).all()


def test_colorize_uses_label_ids_or_class_indices():
    ids = np.array([[7, 26], [23, 0]], np.uint8)
    assert colorize_equals(labels.colorize(ids), [[(128, 64, 128), (0, 0, 142)], [(70, 130, 180), (0, 0, 0)]])
    train = labels.get_label_set("train")
    classes = train.id_to_class[ids]
    assert colorize_equals(labels.colorize(classes, train),
                           [[(128, 64, 128), (0, 0, 142)], [(70, 130, 180), (0, 0, 0)]])


def colorize_equals(image, expected):
    return image.dtype == np.uint8 and (image == np.array(expected, np.uint8)).all()


def test_unknown_label_set_is_rejected():
    with pytest.raises(UserError, match="--label-set coco: use train, full, or a CSV"):
        labels.get_label_set("coco")
