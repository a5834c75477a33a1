"""Base class of every dataset: a list of samples of one split, read as numpy arrays.

A dataset knows where its files are, its class names and how to read one (image, mask)
pair. It does no augmentation: the views in `src/datasets/views.py` apply the
albumentations pipelines and turn arrays into tensors.

Conventions shared by the whole suite:
- images are ``uint8`` arrays of shape (H, W, 3), RGB;
- masks are ``uint8`` arrays of shape (H, W) holding class indices in ``[0, C)`` or
  ``IGNORE_INDEX`` (255) for pixels without a label;
- an image without any mask (an unlabeled image) has ``load_mask(i) is None``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

IGNORE_INDEX = 255


class DatasetError(ValueError):
    """Bad data on disk or a bad dataset option; the message names the file or option."""


class SegmentationDataset(Dataset, ABC):
    """Samples of one split: ``ids`` names them, subclasses say how to read them.

    Subclasses set ``self.classes`` and ``self.ids`` in ``__init__`` and implement
    ``load_image`` and ``load_mask``; ``describe`` names a sample in error messages.

    Args:
        split: Which split to list (``train``, ``val`` or ``test``).
    """

    name = "base"
    ignore_index = IGNORE_INDEX

    def __init__(self, split: str) -> None:
        self.split = split
        self.classes: tuple[str, ...] = ()
        self.ids: list[str] = []

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.ids)

    @abstractmethod
    def load_image(self, index: int) -> np.ndarray:
        """The RGB image of sample ``index`` as uint8 (H, W, 3)."""

    @abstractmethod
    def load_mask(self, index: int) -> np.ndarray | None:
        """The class-index mask of sample ``index`` as uint8 (H, W), or None if unlabeled."""

    def has_mask(self, index: int) -> bool:
        return self.load_mask(index) is not None

    def describe(self, index: int) -> str:
        """How error messages name sample ``index`` (a file path where there is one)."""
        return f"{self.name}/{self.split} sample {self.ids[index]!r}"

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        image = self.load_image(index)
        mask = self.load_mask(index)
        if mask is not None:
            self.check_mask(mask, index)
            if mask.shape != image.shape[:2]:
                raise DatasetError(
                    f"{self.describe(index)}: label is {mask.shape[1]}x{mask.shape[0]} but the image is "
                    f"{image.shape[1]}x{image.shape[0]} (expected the same size)"
                )
        return image, mask

    def check_mask(self, mask: np.ndarray, index: int) -> None:
        """Raise if the mask holds a value outside ``[0, C)`` that is not the ignore index."""
        bad = (mask >= self.num_classes) & (mask != self.ignore_index)
        if bad.any():
            values = sorted(int(v) for v in np.unique(mask[bad]))[:5]
            raise DatasetError(
                f"{self.describe(index)}: label values {values} are outside [0, {self.num_classes}) "
                f"and not the ignore index {self.ignore_index}"
            )

    def class_sets(self) -> list[set[int]]:
        """For every sample, the set of classes in its mask (ignore removed); empty if unlabeled.

        Used by the class-balanced label-budget sampler. Subclasses with a faster way (the
        synthetic dataset knows its scenes) may override it.
        """
        sets = []
        for i in range(len(self)):
            mask = self.load_mask(i)
            if mask is None:
                sets.append(set())
                continue
            self.check_mask(mask, i)
            present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256)[: self.num_classes])
            sets.append(set(int(c) for c in present))
        return sets


def read_image(path: Path) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3); a clear DatasetError if it cannot be read."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except Exception as exc:  # PIL raises several types for broken files
        raise DatasetError(f"{path}: cannot read image ({exc.__class__.__name__}: {exc})") from None


def read_mask(path: Path) -> np.ndarray:
    """Read a single-channel label PNG as uint8 class indices (palette PNGs keep their indices)."""
    try:
        with Image.open(path) as im:
            if im.mode in ("P", "L"):
                return np.asarray(im, dtype=np.uint8)
            if im.mode in ("I", "I;16"):
                arr = np.asarray(im)
                if arr.max(initial=0) > 255:
                    raise DatasetError(f"{path}: label values up to {int(arr.max())} do not fit uint8 class indices")
                return arr.astype(np.uint8)
            raise DatasetError(
                f"{path}: label image has mode {im.mode!r}; expected a single-channel PNG of class indices (mode L or P)"
            )
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(f"{path}: label file not found") from None
    except Exception as exc:
        raise DatasetError(f"{path}: cannot read label ({exc.__class__.__name__}: {exc})") from None
