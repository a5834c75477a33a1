"""Pseudo-label diagnostics: how good are the labels a method trains its student on?

At every validation, a method with an unlabeled loss labels a fixed subset of the unlabeled
pool that has ground truth (the datamodule's ``num_diagnostic_images``; their centre crops at the
training size, batched as in training, `src.datamodules.transforms.diagnostic_transform`) with its
own rule (`SemiSupervisedModule.pseudo_labels`). Against the ground truth, which serves nothing
else, these counts give (logged as ``diag/<name>``):

- ``pseudo_acc``: pixel accuracy of the pseudo-labels (fraction of labelled pixels);
- ``pseudo_miou``: their mIoU (percent, as every mIoU of the suite);
- ``mask_ratio``: the fraction of image pixels that pass the method's confidence rule;
- ``mask_acc``: the pixel accuracy inside that mask (NaN when no labelled pixel passes).

A weak method has a low ``pseudo_acc`` that its mask barely improves; a broken one shows a mask
that never fires (``mask_ratio`` 0) or always fires with a low ``mask_acc``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from src.datasets.base import IGNORE_INDEX

DIAGNOSTICS = ("pseudo_acc", "pseudo_miou", "mask_ratio", "mask_acc")


def pseudo_label_counts(
    pseudo_labels: Tensor,
    confidence_mask: Tensor,
    targets: Tensor,
    valid: Tensor,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, Tensor]:
    """Counts of one batch; the counts of several batches add up.

    Args:
        pseudo_labels: (B, H, W) long, the method's pseudo-labels.
        confidence_mask: (B, H, W) bool, pixels that pass the method's confidence rule.
        targets: (B, H, W) long ground truth, ``ignore_index`` where unknown.
        valid: (B, H, W) bool, image pixels (False on batch padding).
        num_classes: C.
        ignore_index: Label of pixels without ground truth.

    Returns:
        ``confusion`` (C, C) over labelled pixels (rows: truth, columns: pseudo-label),
        ``confusion_confident`` (C, C) over labelled pixels inside the mask, and the numbers of
        ``confident`` and of ``pixels`` (image pixels), all int64 on the inputs' device.
    """
    labelled = valid & (targets != ignore_index)
    confident = valid & confidence_mask

    def confusion(where: Tensor) -> Tensor:
        pairs = targets[where] * num_classes + pseudo_labels[where]  # (N,): row-major (truth, pseudo) index
        return torch.bincount(pairs, minlength=num_classes * num_classes).view(num_classes, num_classes)

    return {
        "confusion": confusion(labelled),
        "confusion_confident": confusion(labelled & confident),
        "confident": confident.sum(),
        "pixels": valid.sum(),
    }


@contextmanager
def training_state_kept(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Run a block, then put back every buffer and module mode of ``module`` and torch's RNG.

    A teacher in train-mode BatchNorm updates its running statistics on every forward, and its
    dropout draws random numbers; an extra forward for diagnostics must leave the training run
    exactly as it would have been without it.
    """
    modes = [(m, m.training) for m in module.modules()]
    saved = [(buffer, buffer.clone()) for buffer in module.buffers()]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            for buffer, value in saved:
                buffer.copy_(value)
            for m, training in modes:
                m.training = training
