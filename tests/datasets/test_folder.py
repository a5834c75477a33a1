"""FolderDataset: both layouts, unlabeled train images, one test per bad input, the real msrc21 data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from src.datasets import DATASETS, get_dataset
from src.datasets.base import IGNORE_INDEX, DatasetError
from src.datasets.folder import FolderDataset
from src.datasets.splits import select_labeled
from tests.datasets.fixtures import FOLDER_CLASSES, make_folder_dataset, write_label, write_rgb


def check_samples(dataset: FolderDataset) -> None:
    for i in range(len(dataset)):
        image, mask = dataset[i]
        assert image.dtype == np.uint8 and image.shape == (16, 20, 3)
        if mask is not None:
            assert mask.dtype == np.uint8 and mask.shape == (16, 20)
            valid = (mask < dataset.num_classes) | (mask == IGNORE_INDEX)
            assert valid.all()


@pytest.mark.parametrize("layout", ["subfolders", "lists", "both"])
def test_layouts(tmp_path: Path, layout: str) -> None:
    root = make_folder_dataset(tmp_path, layout=layout)
    train, val = FolderDataset(str(root), "train"), FolderDataset(str(root), "val")
    assert (len(train), len(val)) == (3, 2)
    assert train.classes == FOLDER_CLASSES and train.num_classes == 3
    # Sorted, although the fixture writes its lists in reverse.
    assert train.ids == ["train_0", "train_1", "train_2"]
    assert all(train.has_mask(i) for i in range(len(train)))
    check_samples(train)
    check_samples(val)


def test_unlabeled_train_images_join_unlabeled_pool(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path, num_unlabeled_train=2)
    train = FolderDataset(str(root), "train")
    assert len(train) == 5
    unlabeled = [i for i in range(len(train)) if not train.has_mask(i)]
    assert [train.ids[i] for i in unlabeled] == ["train_u0", "train_u1"]
    image, mask = train[unlabeled[0]]
    assert mask is None and image.shape == (16, 20, 3)
    labeled, pool = select_labeled(train, 2, seed=0)
    assert set(labeled).isdisjoint(unlabeled) and set(unlabeled) <= set(pool)


def test_image_suffix_any_case(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path)
    (root / "images" / "train" / "train_0.png").unlink()
    pixels = write_rgb(root / "images" / "train" / "train_0.JPG", 16, 20, seed=0)
    dataset = FolderDataset(str(root), "train")
    assert dataset.image_files[0].name == "train_0.JPG"
    # JPEG is lossy: only the shape and a rough match are stable.
    assert np.abs(dataset.load_image(0).astype(int) - pixels).mean() < 80


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nope.*folder not found"):
        FolderDataset(str(tmp_path / "nope"))


def test_missing_classes_file(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path)
    (root / "classes.txt").unlink()
    with pytest.raises(DatasetError, match=r"classes\.txt: not found"):
        FolderDataset(str(root))


def test_missing_split_lists_found_splits(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path)
    with pytest.raises(DatasetError, match=r"no split 'test'.*splits/test\.txt.*found \['train', 'val'\]"):
        FolderDataset(str(root), "test")


def test_val_image_without_label(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path)
    (root / "labels" / "val" / "val_1.png").unlink()
    with pytest.raises(DatasetError, match=r"images/val/val_1\.png: image without a label"):
        FolderDataset(str(root), "val")


def test_label_without_image(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path)
    (root / "images" / "train" / "train_2.png").unlink()
    with pytest.raises(DatasetError, match=r"labels/train/train_2\.png: label without an image"):
        FolderDataset(str(root), "train")


def test_listed_id_without_image(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path, layout="lists")
    with (root / "splits" / "val.txt").open("a") as f:
        f.write("ghost\n")
    with pytest.raises(DatasetError, match=r"splits/val\.txt: 'ghost' has no image"):
        FolderDataset(str(root), "val")


def test_label_values_out_of_range_raise_on_load(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path)
    label = np.zeros((16, 20), np.uint8)
    label[3, 4] = 7  # 3 classes: 7 is neither a class nor the ignore index
    write_label(root / "labels" / "train" / "train_1.png", label)
    dataset = FolderDataset(str(root), "train")  # listing reads no pixels
    dataset[0]
    with pytest.raises(DatasetError, match=r"labels/train/train_1\.png: label values \[7\] are outside \[0, 3\)"):
        dataset[1]


def test_unreadable_image(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path)
    (root / "images" / "train" / "train_0.png").write_bytes(b"this is not a png")
    dataset = FolderDataset(str(root), "train")
    with pytest.raises(DatasetError, match=r"images/train/train_0\.png: cannot read image"):
        dataset[0]


def test_jpeg_labels_refused(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path)
    (root / "labels" / "train" / "train_0.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"train_0\.jpg: labels must be PNG"):
        FolderDataset(str(root), "train")


def test_get_dataset_unknown_name() -> None:
    assert {"folder", "pascal_voc", "cityscapes"} <= set(DATASETS)
    with pytest.raises(DatasetError, match=r"unknown dataset 'kitti'.*'folder'"):
        get_dataset("kitti", root="x")


def test_get_dataset_builds_folder(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path)
    dataset = get_dataset("folder", root=str(root), split="val")
    assert isinstance(dataset, FolderDataset) and len(dataset) == 2


def test_real_msrc21(msrc21: Path) -> None:
    splits = {split: FolderDataset(str(msrc21), split) for split in ("train", "val", "test")}
    assert {split: len(d) for split, d in splits.items()} == {"train": 277, "val": 58, "test": 256}
    train = splits["train"]
    assert train.num_classes == 21 and train.classes[:2] == ("building", "grass")
    assert all(train.has_mask(i) for i in range(len(train)))
    image, mask = train[0]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert mask.dtype == np.uint8 and mask.shape == image.shape[:2]
    assert ((mask < 21) | (mask == IGNORE_INDEX)).all() and (mask < 21).any()
