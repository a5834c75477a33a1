"""Colour masks and image | ground truth | prediction grids for TensorBoard and `src.predict`."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def palette(num_classes: int) -> np.ndarray:
    """(256, 3) uint8 colours: the Pascal VOC bit-interleaved palette; index 255 (ignore) is white."""
    colours = np.zeros((256, 3), np.uint8)
    for index in range(256):
        c, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours[index] = (r, g, b)
    colours[255] = (255, 255, 255)
    return colours


def colourise(masks: Tensor, num_classes: int) -> Tensor:
    """(B, H, W) class indices -> (B, 3, H, W) float colours in [0, 1]."""
    lut = torch.from_numpy(palette(num_classes)).to(masks.device)
    return lut[masks.clamp(0, 255).long()].permute(0, 3, 1, 2).float() / 255


def prediction_grid(rows: list[tuple[Tensor, Tensor, Tensor]], num_classes: int, ignore_index: int = 255) -> Tensor:
    """Stack ``(images, targets, predictions)`` groups into a (3, H', W') grid: one row per image.

    Each row shows the image, the ground truth (or pseudo-label) and the prediction side by side;
    groups of different sizes are padded to the widest.
    """
    tiles = []
    for images, targets, predictions in rows:
        for image, target, prediction in zip(images, targets, predictions):
            target = torch.where(target == ignore_index, torch.full_like(target, 255), target)
            tiles.append(
                torch.cat(
                    [image.float().clamp(0, 1), colourise(target[None], num_classes)[0],
                     colourise(prediction[None], num_classes)[0]],
                    dim=2,
                )
            )
    height = max(t.shape[1] for t in tiles)
    width = max(t.shape[2] for t in tiles)
    padded = [torch.nn.functional.pad(t, (0, width - t.shape[2], 0, height - t.shape[1])) for t in tiles]
    return torch.cat(padded, dim=1)
