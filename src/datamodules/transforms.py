"""Albumentations pipelines by role: labeled training, unlabeled crops, diagnostic crops, evaluation.

Follows the ReCo protocol (METHODS.md section 1.5): labeled images get random scale,
pad (image black, label ignore), random crop, colour jitter (p 0.8), Gaussian blur
(p 0.5) and a horizontal flip; unlabeled images get a plain random crop at scale 1,
because mean-teacher methods augment them after the teacher has seen them (on the
batch, in `src/pl_modules/ops.py`). Images stay uint8; the network normalises.
"""

from __future__ import annotations

import albumentations as A
import cv2

from src.datasets.base import IGNORE_INDEX


def _pad_and_crop(crop_size: int, crop: type[A.BasicTransform] = A.RandomCrop) -> list[A.BasicTransform]:
    return [
        A.PadIfNeeded(
            min_height=crop_size,
            min_width=crop_size,
            position="top_left",
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=IGNORE_INDEX,
        ),
        crop(crop_size, crop_size),
    ]


def _resize(longest_side: int | None) -> list[A.BasicTransform]:
    """Resize so the longest side is ``longest_side`` (masks nearest); nothing for None."""
    return [] if longest_side is None else [A.LongestMaxSize(max_size=longest_side)]


def labeled_transform(
    crop_size: int,
    scale_range: tuple[float, float] = (0.5, 1.5),
    photometric: bool = True,
    resize_to: int | None = None,
) -> A.Compose:
    """(Resize,) scale, pad, crop, (colour jitter, blur,) flip: the labeled-image pipeline.

    Args:
        crop_size: Side of the square training crop.
        scale_range: Range of the random rescale factor applied before cropping.
        photometric: Whether to apply colour jitter and blur.
        resize_to: None, or the longest side every image is first resized to (Cityscapes: 1024).
    """
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
    steps: list[A.BasicTransform] = _resize(resize_to)
    if (lo, hi) != (1.0, 1.0):
        steps.append(A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), p=1.0))
    steps += _pad_and_crop(crop_size)
    if photometric:
        steps += [
            A.ColorJitter(brightness=(0.75, 1.25), contrast=(0.75, 1.25), saturation=(0.75, 1.25), hue=(-0.25, 0.25), p=0.8),
            A.GaussianBlur(sigma_limit=(0.15, 1.15), p=0.5),
        ]
    steps.append(A.HorizontalFlip(p=0.5))
    return A.Compose(steps)


def unlabeled_transform(crop_size: int, resize_to: int | None = None) -> A.Compose:
    """(Resize,) a plain random crop at scale 1 (padded with black / ignore where the image is smaller)."""
    return A.Compose(_resize(resize_to) + _pad_and_crop(crop_size))


def diagnostic_transform(crop_size: int, resize_to: int | None = None) -> A.Compose:
    """`unlabeled_transform` with the crop at the centre: the same crop of an image on every call.

    Pseudo-label diagnostics label these: a teacher whose BatchNorm runs in train mode normalises
    with its batch's statistics, so it is scored on crops like those it labels in training, not on
    whole images padded to the largest of their batch.
    """
    return A.Compose(_resize(resize_to) + _pad_and_crop(crop_size, A.CenterCrop))


def eval_transform(resize_to: int | None = None) -> A.Compose | None:
    """Full-size evaluation, or resize so the longest side is ``resize_to`` (labels nearest)."""
    if resize_to is None:
        return None
    return A.Compose(_resize(resize_to))
