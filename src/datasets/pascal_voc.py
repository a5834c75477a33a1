"""Pascal VOC 2012 semantic segmentation: 21 classes (background = 0), 255 = object border / ignore.

``root`` is ``VOCdevkit/VOC2012`` itself or a folder that contains ``VOCdevkit/VOC2012``.

- Images: ``JPEGImages/<id>.jpg``.
- ``train``, ``val``, ``trainval``: list ``ImageSets/Segmentation/<split>.txt``, labels
  ``SegmentationClass/<id>.png`` (palette PNGs whose palette indices are the class ids).
- ``train_aug`` (the standard 10,582-image VOC + SBD pool, METHODS.md 1.1): labels
  ``SegmentationClassAug/<id>.png`` (grayscale class indices) for every id, also the ones that
  have a ``SegmentationClass`` label. ``SegmentationClassAug/`` is looked for in ``VOC2012/``,
  then in ``root``. The list is the first found of ``VOC2012/ImageSets/Segmentation/train_aug.txt``,
  ``VOC2012/train_aug.txt``, ``SegmentationClassAug/../train_aug.txt`` and ``root/train_aug.txt``.

List lines are ids (``2007_000032``) or the two-path lines of the community lists
(``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``): the first path's stem is the id.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from src.datasets.base import DatasetError, SegmentationDataset, read_image, read_mask

CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
SPLITS = ("train", "val", "trainval", "train_aug")
AUG_SPLIT = "train_aug"


def _unique(paths: list[Path]) -> list[Path]:
    """``paths`` without repeats of the same place (``a/../b`` and ``b`` are one), first kept."""
    unique: dict[Path, Path] = {}
    for path in paths:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


class PascalVOC(SegmentationDataset):
    """Pascal VOC 2012, optionally with the SBD augmented labels (``train_aug``).

    Args:
        root: ``VOCdevkit/VOC2012`` or a folder containing ``VOCdevkit/VOC2012``.
        split: ``train``, ``val``, ``trainval`` or ``train_aug``.
    """

    name = "pascal_voc"

    def __init__(self, root: str, split: str = "train") -> None:
        super().__init__(split)
        if split not in SPLITS:
            raise DatasetError(f"pascal_voc: unknown split {split!r}; expected one of {SPLITS}")
        given = Path(root)
        if not given.is_dir():
            raise DatasetError(
                f"data.root {given}: folder not found (expected VOCdevkit/VOC2012 or a folder holding it)"
            )
        candidates = [given, given / "VOCdevkit" / "VOC2012"]
        base = next((c for c in candidates if (c / "JPEGImages").is_dir()), None)
        if base is None:
            raise DatasetError(
                f"data.root {given}: no JPEGImages/ folder in {candidates[0]} or {candidates[1]} "
                "(expected VOCdevkit/VOC2012 or a folder holding it)"
            )
        self.root = base
        self.classes = CLASSES
        self.image_dir = base / "JPEGImages"

        if split == AUG_SPLIT:
            label_dirs = _unique([base / "SegmentationClassAug", given / "SegmentationClassAug"])
            found = next((d for d in label_dirs if d.is_dir()), None)
            if found is None:
                raise DatasetError(
                    f"pascal_voc split {split!r}: no SegmentationClassAug/ folder in {base} or {given} "
                    "(expected the SBD augmented labels as grayscale PNGs)"
                )
            self.label_dir = found
            lists = _unique([
                base / "ImageSets" / "Segmentation" / f"{split}.txt",
                base / f"{split}.txt",
                found.parent / f"{split}.txt",
                given / f"{split}.txt",
            ])
        else:
            self.label_dir = base / "SegmentationClass"
            lists = [base / "ImageSets" / "Segmentation" / f"{split}.txt"]
        list_file = next((p for p in lists if p.is_file()), None)
        if list_file is None:
            raise DatasetError(f"pascal_voc split {split!r}: no list file (expected one of {[str(p) for p in lists]})")
        if not self.label_dir.is_dir():
            raise DatasetError(f"{self.label_dir}: label folder not found (expected <id>.png per listed id)")
        self.ids = self._read_list(list_file)

    def _read_list(self, list_file: Path) -> list[str]:
        # One directory listing instead of 2 x 10,582 stat calls on network file systems.
        images, labels = set(os.listdir(self.image_dir)), set(os.listdir(self.label_dir))
        seen: dict[str, int] = {}
        for number, line in enumerate(list_file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            name = Path(line.split()[0]).stem
            if f"{name}.jpg" not in images:
                raise DatasetError(f"{list_file}:{number}: {name!r} has no image {self.image_dir / (name + '.jpg')}")
            if f"{name}.png" not in labels:
                raise DatasetError(f"{list_file}:{number}: {name!r} has no label {self.label_dir / (name + '.png')}")
            if name in seen:
                raise DatasetError(f"{list_file}:{number}: {name!r} is already listed on line {seen[name]}")
            seen[name] = number
        if not seen:
            raise DatasetError(f"{list_file}: lists no ids")
        # Sorted: two copies of a list in different orders then give the same split for a seed.
        return sorted(seen)

    def load_image(self, index: int) -> np.ndarray:
        return read_image(self.image_dir / f"{self.ids[index]}.jpg")

    def load_mask(self, index: int) -> np.ndarray:
        # Palette PNGs are read as their palette indices, which are VOC's class ids.
        return read_mask(self.label_dir / f"{self.ids[index]}.png")

    def has_mask(self, index: int) -> bool:
        return True

    def describe(self, index: int) -> str:
        return str(self.label_dir / f"{self.ids[index]}.png")
