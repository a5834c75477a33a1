"""Cityscapes fine annotations: raw labelIds mapped to the 19 evaluation train ids, the rest ignored.

Layout (as downloaded, ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip``)::

    root/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png
    root/gtFine/<split>/<city>/<name>_gtFine_labelIds.png

The raw ``*_labelIds.png`` files are read (not ``*_labelTrainIds.png``, which needs a
preprocessing script) and mapped with the official table; void ids and license plate (-1,
stored as 255) become the ignore index (METHODS.md 1.1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from src.datasets.base import IGNORE_INDEX, DatasetError, SegmentationDataset, read_image, read_mask

CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
SPLITS = ("train", "val", "test")
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"

# labelId -> trainId of the official table (cityscapesScripts, helpers/labels.py); every other
# labelId is void or excluded from evaluation.
_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
LABEL_ID_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, dtype=np.uint8)
LABEL_ID_TO_TRAIN_ID[list(_TRAIN_IDS)] = list(_TRAIN_IDS.values())
# labelIds run 0..33; license plate (-1) is stored as 255. Anything else means the file is not
# a labelIds PNG (a colour or instance image, say) and would otherwise be silently ignored.
VALID_LABEL_IDS = np.zeros(256, dtype=bool)
VALID_LABEL_IDS[:34] = True
VALID_LABEL_IDS[255] = True


class Cityscapes(SegmentationDataset):
    """Cityscapes with the 19 evaluation classes.

    Args:
        root: The Cityscapes folder, holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``train``, ``val`` or ``test``.
    """

    name = "cityscapes"

    def __init__(self, root: str, split: str = "train") -> None:
        super().__init__(split)
        if split not in SPLITS:
            raise DatasetError(f"cityscapes: unknown split {split!r}; expected one of {SPLITS}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(
                f"data.root {self.root}: folder not found (expected a folder with leftImg8bit/ and gtFine/)"
            )
        image_dir, label_dir = self.root / "leftImg8bit" / split, self.root / "gtFine" / split
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise DatasetError(f"{folder}: folder not found (expected <city>/ subfolders of split {split!r})")
        self.classes = CLASSES
        self.image_files = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
        if not self.image_files:
            raise DatasetError(f"{image_dir}: no <city>/<name>{IMAGE_SUFFIX} images")
        self.ids = [p.name[: -len(IMAGE_SUFFIX)] for p in self.image_files]
        self.label_files = [
            label_dir / image.parent.name / f"{name}{LABEL_SUFFIX}" for image, name in zip(self.image_files, self.ids)
        ]

        labels = set(label_dir.glob(f"*/*{LABEL_SUFFIX}"))
        for image, label in zip(self.image_files, self.label_files):
            if label not in labels:
                raise DatasetError(f"{image}: image without a label (expected {label})")
        orphans = sorted(labels - set(self.label_files))
        if orphans:
            city, name = orphans[0].parent.name, orphans[0].name[: -len(LABEL_SUFFIX)]
            raise DatasetError(
                f"{orphans[0]}: label without an image (expected {image_dir / city / (name + IMAGE_SUFFIX)}; "
                f"{len(orphans)} such labels)"
            )

    def load_image(self, index: int) -> np.ndarray:
        return read_image(self.image_files[index])

    def load_mask(self, index: int) -> np.ndarray:
        label_ids = read_mask(self.label_files[index])
        invalid = ~VALID_LABEL_IDS[label_ids]
        if invalid.any():
            values = sorted(int(v) for v in np.unique(label_ids[invalid]))[:5]
            raise DatasetError(
                f"{self.label_files[index]}: values {values} are not Cityscapes labelIds "
                "(expected 0..33, or 255 for license plate)"
            )
        return LABEL_ID_TO_TRAIN_ID[label_ids]

    def has_mask(self, index: int) -> bool:
        return True

    def describe(self, index: int) -> str:
        return str(self.label_files[index])
