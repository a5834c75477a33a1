"""PascalVOC: both root forms, palette indices as class ids, train_aug labels and list places, bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from src.datasets.base import IGNORE_INDEX, DatasetError
from src.datasets.pascal_voc import CLASSES, PascalVOC
from tests.datasets.fixtures import VOC_SBD_ONLY, VOC_TRAIN, VOC_VAL, label_pattern, make_voc


@pytest.mark.parametrize("nested", [True, False])
def test_root_forms_and_samples(tmp_path: Path, nested: bool) -> None:
    make_voc(tmp_path, nested=nested)
    train = PascalVOC(str(tmp_path), "train")
    assert train.ids == list(VOC_TRAIN) and len(PascalVOC(str(tmp_path), "val")) == len(VOC_VAL)
    assert len(PascalVOC(str(tmp_path), "trainval")) == 4
    assert train.num_classes == 21 == len(CLASSES) and train.classes[15] == "person"
    image, mask = train[0]
    assert image.dtype == np.uint8 and image.shape == (18, 24, 3)
    assert mask.dtype == np.uint8 and mask.shape == (18, 24)
    assert ((mask < 21) | (mask == IGNORE_INDEX)).all()


def test_palette_indices_are_class_ids(tmp_path: Path) -> None:
    make_voc(tmp_path)
    mask = PascalVOC(str(tmp_path), "train").load_mask(1)
    # The file is a palette PNG (index 15 is drawn as (192, 128, 128)); the index is the class id.
    np.testing.assert_array_equal(mask, label_pattern(18, 24, 21, 3))
    assert 15 in mask and IGNORE_INDEX in mask


@pytest.mark.parametrize("aug_list", ["imagesets", "voc_root"])
def test_train_aug_reads_sbd_labels(tmp_path: Path, aug_list: str) -> None:
    make_voc(tmp_path, aug_list=aug_list)
    dataset = PascalVOC(str(tmp_path), "train_aug")
    assert dataset.ids == sorted(VOC_TRAIN + VOC_SBD_ONLY)
    # Every id, also one with a SegmentationClass label, is read from SegmentationClassAug.
    index = dataset.ids.index(VOC_TRAIN[0])
    np.testing.assert_array_equal(dataset.load_mask(index), (label_pattern(18, 24, 21, 0) + 1) % 21)
    assert dataset.describe(index).endswith(f"SegmentationClassAug/{VOC_TRAIN[0]}.png")


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nope: folder not found"):
        PascalVOC(str(tmp_path / "nope"))


def test_root_without_jpeg_images(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no JPEGImages/"):
        PascalVOC(str(tmp_path))


def test_unknown_split(tmp_path: Path) -> None:
    make_voc(tmp_path)
    with pytest.raises(DatasetError, match=r"unknown split 'test'.*'train_aug'"):
        PascalVOC(str(tmp_path), "test")


def test_missing_train_aug_list(tmp_path: Path) -> None:
    make_voc(tmp_path, aug_list=None)
    with pytest.raises(DatasetError, match=r"'train_aug': no list file.*ImageSets/Segmentation/train_aug\.txt"):
        PascalVOC(str(tmp_path), "train_aug")


def test_listed_id_without_image(tmp_path: Path) -> None:
    voc = make_voc(tmp_path)
    (voc / "JPEGImages" / f"{VOC_VAL[1]}.jpg").unlink()
    with pytest.raises(DatasetError, match=rf"val\.txt:2: '{VOC_VAL[1]}' has no image"):
        PascalVOC(str(tmp_path), "val")


def test_listed_id_without_label(tmp_path: Path) -> None:
    voc = make_voc(tmp_path)
    (voc / "SegmentationClass" / f"{VOC_TRAIN[0]}.png").unlink()
    with pytest.raises(DatasetError, match=rf"train\.txt:1: '{VOC_TRAIN[0]}' has no label"):
        PascalVOC(str(tmp_path), "train")
