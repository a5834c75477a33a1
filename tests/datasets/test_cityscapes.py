"""Cityscapes: file pairing across cities, the labelId -> trainId table, bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from src.datasets.base import IGNORE_INDEX, DatasetError
from src.datasets.cityscapes import CLASSES, LABEL_ID_TO_TRAIN_ID, Cityscapes
from tests.datasets.fixtures import (
    CITYSCAPES_LABEL_IDS,
    CITYSCAPES_SAMPLES,
    CITYSCAPES_TRAIN_IDS,
    make_cityscapes,
    write_label,
)


def test_samples(tmp_path: Path) -> None:
    make_cityscapes(tmp_path)
    train = Cityscapes(str(tmp_path), "train")
    assert train.ids == [name for _, name in CITYSCAPES_SAMPLES["train"]]
    assert len(Cityscapes(str(tmp_path), "val")) == 1
    assert train.num_classes == 19 == len(CLASSES)
    for i in range(len(train)):
        image, mask = train[i]
        assert image.dtype == np.uint8 and image.shape == (18, 24, 3)
        assert mask.dtype == np.uint8 and mask.shape == (18, 24)
        assert ((mask < 19) | (mask == IGNORE_INDEX)).all()


def test_label_ids_map_to_train_ids(tmp_path: Path) -> None:
    make_cityscapes(tmp_path)
    mask = Cityscapes(str(tmp_path), "train").load_mask(2)
    assert tuple(mask[0, : len(CITYSCAPES_LABEL_IDS)]) == CITYSCAPES_TRAIN_IDS
    assert mask[5, 5] == 0 and mask[15, 20] == 13  # road, car
    # The whole table: 19 ids map to 0..18 once each, everything else to ignore.
    assert sorted(LABEL_ID_TO_TRAIN_ID[LABEL_ID_TO_TRAIN_ID != IGNORE_INDEX]) == list(range(19))


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nope: folder not found"):
        Cityscapes(str(tmp_path / "nope"))


def test_image_without_label(tmp_path: Path) -> None:
    make_cityscapes(tmp_path)
    city, name = CITYSCAPES_SAMPLES["val"][0]
    (tmp_path / "gtFine" / "val" / city / f"{name}_gtFine_labelIds.png").unlink()
    with pytest.raises(DatasetError, match=rf"{name}_leftImg8bit\.png: image without a label"):
        Cityscapes(str(tmp_path), "val")


def test_label_without_image(tmp_path: Path) -> None:
    make_cityscapes(tmp_path)
    city, name = CITYSCAPES_SAMPLES["train"][1]
    (tmp_path / "leftImg8bit" / "train" / city / f"{name}_leftImg8bit.png").unlink()
    with pytest.raises(DatasetError, match=rf"{name}_gtFine_labelIds\.png: label without an image"):
        Cityscapes(str(tmp_path), "train")


def test_values_that_are_not_label_ids(tmp_path: Path) -> None:
    make_cityscapes(tmp_path)
    city, name = CITYSCAPES_SAMPLES["train"][0]
    label = np.full((18, 24), 7, np.uint8)
    label[0, 0] = 40  # labelIds stop at 33
    write_label(tmp_path / "gtFine" / "train" / city / f"{name}_gtFine_labelIds.png", label)
    dataset = Cityscapes(str(tmp_path), "train")
    with pytest.raises(DatasetError, match=rf"{name}_gtFine_labelIds\.png: values \[40\] are not Cityscapes labelIds"):
        dataset[0]
