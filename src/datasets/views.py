"""Torch views over a dataset: labeled pairs, unlabeled images, evaluation pairs.

A view selects samples of a `SegmentationDataset` by index, applies an albumentations
pipeline and returns tensors. Images stay ``uint8`` (3, H, W) so that workers ship a
quarter of the bytes; the LightningModule turns them into floats on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from src.datasets.base import IGNORE_INDEX, SegmentationDataset

Transform = Callable[..., dict]
MaskHook = Callable[[np.ndarray, int], np.ndarray]


def to_tensors(image: np.ndarray, mask: np.ndarray | None) -> dict[str, Tensor]:
    """(H, W, 3) uint8 and (H, W) uint8 arrays -> {"image": (3, H, W) uint8, "mask": (H, W) long}.

    Read-only arrays (PIL's, when no transform copied them) are copied: torch does not share
    memory with a non-writable array.
    """
    out = {"image": torch.from_numpy(np.require(image.transpose(2, 0, 1), requirements="CW"))}
    if mask is not None:
        out["mask"] = torch.from_numpy(np.require(mask, requirements="CW")).long()
    return out


class View(Dataset):
    """Samples of the chosen indices of a dataset, through an albumentations pipeline.

    Args:
        dataset: The dataset to read.
        indices: Which samples of ``dataset`` this view shows.
        transform: An albumentations pipeline called as ``transform(image=..., mask=...)``.
        mask_hook: Optional ``f(mask, index) -> mask`` applied before the transform (partial labels).
    """

    def __init__(
        self,
        dataset: SegmentationDataset,
        indices: Sequence[int],
        transform: Transform | None = None,
        mask_hook: MaskHook | None = None,
    ) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.transform = transform
        self.mask_hook = mask_hook

    def __len__(self) -> int:
        return len(self.indices)

    def sample(self, image: np.ndarray, mask: np.ndarray | None, index: int) -> dict[str, Tensor]:
        """The transformed pair as tensors, with the sample's dataset ``index``."""
        if self.transform is not None:
            out = self.transform(image=image, mask=mask) if mask is not None else self.transform(image=image)
            image, mask = out["image"], out.get("mask")
        sample = to_tensors(image, mask)
        sample["index"] = torch.tensor(index)
        return sample


class LabeledView(View):
    """(image, mask) pairs of the chosen indices, augmented jointly (arguments: `View`)."""

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        index = self.indices[i]
        image, mask = self.dataset[index]
        if mask is None:
            raise ValueError(f"{self.dataset.describe(index)} has no label but was put in a labeled view")
        if self.mask_hook is not None:
            mask = self.mask_hook(mask, index)
        return self.sample(image, mask, index)


class UnlabeledView(View):
    """Images of the chosen indices without their masks (arguments: `View`).

    In partial-label mode (``mask_hook`` given) the sparse labels travel with the image as
    ``"mask"`` (255 elsewhere) so a method can overwrite pseudo-labels with them
    (METHODS.md section 3, partial-label mode). Images without a mask get an all-255 mask then.
    The transform is geometric only for ReCo-style methods.
    """

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        index = self.indices[i]
        if self.mask_hook is None:
            return self.sample(self.dataset.load_image(index), None, index)
        image, mask = self.dataset[index]
        if mask is None:
            mask = np.full(image.shape[:2], IGNORE_INDEX, np.uint8)
        else:
            mask = self.mask_hook(mask, index)
        return self.sample(image, mask, index)


def pad_collate(samples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack samples of different sizes by padding to the largest: image 0, mask 255.

    Evaluation keeps every image at full size; padded pixels carry the ignore label, so
    they never count in the metrics.
    """
    height = max(s["image"].shape[-2] for s in samples)
    width = max(s["image"].shape[-1] for s in samples)
    batch: dict[str, Tensor] = {}
    images = samples[0]["image"].new_zeros(len(samples), 3, height, width)
    for i, s in enumerate(samples):
        images[i, :, : s["image"].shape[-2], : s["image"].shape[-1]] = s["image"]
    batch["image"] = images
    if "mask" in samples[0]:
        masks = torch.full((len(samples), height, width), IGNORE_INDEX, dtype=torch.long)
        for i, s in enumerate(samples):
            masks[i, : s["mask"].shape[-2], : s["mask"].shape[-1]] = s["mask"]
        batch["mask"] = masks
    batch["index"] = torch.stack([s["index"] for s in samples])
    return batch


def pad_collate_with_valid(samples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """`pad_collate`, plus ``"valid"``: (B, H, W) bool, True on image pixels and False on the padding."""
    batch = pad_collate(samples)
    valid = torch.zeros(batch["image"].shape[0], *batch["image"].shape[-2:], dtype=torch.bool)
    for i, s in enumerate(samples):
        valid[i, : s["image"].shape[-2], : s["image"].shape[-1]] = True
    batch["valid"] = valid
    return batch
