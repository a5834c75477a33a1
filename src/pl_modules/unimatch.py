"""UniMatch (Yang et al., CVPR 2023, arXiv:2208.09910), as in UniMatch's code (METHODS.md 8).

FixMatch (`src.pl_modules.fixmatch`) with two strong views, plus a stream decoded from
channel-dropped encoder features of the weak view that learns the weak view's pseudo-labels.
Each unlabeled term is METHODS.md 8 step 5 (`ops.thresholded_ce`); the total is step 6.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from src.networks.segmenter import FP_LEVELS
from src.pl_modules.base import check_fractions
from src.pl_modules.fixmatch import FixMatch
from src.pl_modules.ops import thresholded_ce
from src.pl_modules.timing import StepFloor


class UniMatch(FixMatch):
    """UniMatch: FixMatch with two strong views and a feature-perturbed stream (METHODS.md 8).

    The encoder features of ``[labeled; weak]`` are decoded clean and through ``Dropout2d(fp_dropout)``
    as one doubled batch (`Segmenter.forward_perturbed`); the perturbed weak logits learn the weak
    pseudo-labels. Dropout is on only in that stream. ``L = (L_sup + (1 - fp_weight) * mean(L_s1,
    L_s2) + fp_weight * L_fp) / 2``, i.e. 0.25 / 0.25 / 0.5 with the default ``fp_weight`` (step 6).
    The dropout hits the stride-4 map (ResNet's layer1) and the deepest one, the reference's c1 and
    c4 (LiheYoung/UniMatch model/semseg/deeplabv3plus.py:45), whatever decoder reads the others;
    ``fp_levels="all"`` drops every map a U-Net's skips read instead.

    Args:
        fp_dropout: Channel-dropout probability of the feature-perturbed stream.
        fp_levels: Encoder maps the perturbed stream drops: ``"reference"`` or ``"all"``
            (`Segmenter.forward_perturbed`).
        fp_weight: Share of the feature-perturbed term in the unlabeled loss; the two strong views
            share the rest equally.
        **kwargs: Options of `FixMatch` and `SemiSupervisedModule`.
    """

    name = "unimatch"
    num_strong_views = 2
    # [labeled; weak] (and its perturbed stream), then both strong views; the mixing view's labels.
    step_floor = StepFloor(passes=(2, 2), eval_forwards=1, variant="fp")

    def __init__(
        self, fp_dropout: float = 0.5, fp_weight: float = 0.5, fp_levels: str = "reference", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= fp_dropout < 1.0:
            raise ValueError(f"model.fp_dropout must be in [0, 1), got {fp_dropout}")
        if fp_levels not in FP_LEVELS:
            raise ValueError(f"model.fp_levels must be one of {FP_LEVELS}, got {fp_levels!r}")
        check_fractions(fp_weight=fp_weight)

    def forward_labeled_and_weak(self, images_l: Tensor, images_w: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        clean, perturbed = self.student.forward_perturbed(
            torch.cat([images_l, images_w]), self.hparams.fp_dropout, self.hparams.fp_levels
        )
        logits_l, logits_w = clean.split([len(images_l), len(images_w)])
        return logits_l, logits_w, perturbed[len(images_l):]

    def unlabeled_loss(
        self, loss_strong: Tensor, logits_fp: Tensor | None, targets_w: tuple[Tensor, Tensor, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(1 - fp_weight) * loss_strong + fp_weight * L_fp``, L_fp the perturbed stream's term on the weak targets."""
        labels_w, confidences_w, valid_w = targets_w
        loss_fp = thresholded_ce(
            logits_fp, labels_w, confidences_w, valid_w, self.hparams.confidence_threshold, self.ignore_index
        )
        loss_unsup = (1 - self.hparams.fp_weight) * loss_strong + self.hparams.fp_weight * loss_fp
        return loss_unsup, {"loss_strong": loss_strong.detach(), "loss_fp": loss_fp.detach()}
