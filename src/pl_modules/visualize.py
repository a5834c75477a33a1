"""Colour masks and grids of an image beside its masks, for TensorBoard and the CLIs.

Validation shows image | ground truth | prediction; the pseudo-label diagnostics show
image | pseudo-label | confidence mask | ground truth. The class-relation figure of methods with a
representation head is `src.pl_modules.relations`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from src.datasets.base import IGNORE_INDEX


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


def upscale_factor(height: int, width: int, min_size: int) -> int:
    """The smallest integer factor that brings the shorter side of a tile to ``min_size`` (at least 1)."""
    return max(1, math.ceil(min_size / max(1, min(height, width))))


def prediction_grid(
    rows: list[tuple[Tensor, ...]], num_classes: int, ignore_index: int = IGNORE_INDEX, min_size: int = 128
) -> Tensor:
    """Stack ``(images, *maps)`` groups into a (3, H', W') grid: one row per image.

    Each row shows the image, then each map beside it: class-index maps (ground truth, pseudo-label,
    prediction) in the palette with ``ignore_index`` white, bool maps (a confidence mask) white where
    True and black elsewhere. Every tile is enlarged by an integer factor, nearest-neighbour for the
    image too so that its pixels line up with the masks', until its shorter side is at least
    ``min_size``; groups of different sizes are padded to the widest.
    """
    tiles = []
    for images, *maps in rows:
        for image, *sample_maps in zip(images, *maps):
            parts = [image.float().clamp(0, 1)]
            for values in sample_maps:
                if values.dtype == torch.bool:
                    parts.append(values.float().expand(3, *values.shape))
                else:
                    values = torch.where(values == ignore_index, torch.full_like(values, 255), values)
                    parts.append(colourise(values[None], num_classes)[0])
            tile = torch.cat(parts, dim=2)
            factor = upscale_factor(*image.shape[-2:], min_size)
            tiles.append(F.interpolate(tile[None], scale_factor=factor, mode="nearest")[0])
    height = max(t.shape[1] for t in tiles)
    width = max(t.shape[2] for t in tiles)
    padded = [F.pad(t, (0, width - t.shape[2], 0, height - t.shape[1])) for t in tiles]
    return torch.cat(padded, dim=1)
