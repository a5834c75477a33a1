"""Mean teacher as used by ReCo (Liu et al., ICLR 2022, arXiv:2104.04465, METHODS.md sections 3-4).

An EMA copy of the student labels the raw unlabeled crops; the crops, pseudo-labels and
confidences are rescaled, optionally mixed (CutOut / CutMix / ClassMix) and photometrically
augmented together, and the student learns them with the confidence-weighted
cross-entropy of METHODS.md section 3 step 5. CutOut, CutMix and ClassMix are this method
with another mixing mode (the three subclasses below only rename it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from src.pl_modules.base import SemiSupervisedModule, check_fractions, check_non_negative
from src.pl_modules.ops import (MIX_MODES, confidence_weighted_ce, mix_unlabeled, overwrite_given, random_rescale_crop,
                                 strong_augment)
from src.pl_modules.timing import StepFloor


class MeanTeacher(SemiSupervisedModule):
    """Teacher-student training on augmented (and optionally mixed) unlabeled images.

    Args:
        unsup_weight: Weight of the unlabeled loss.
        strong_threshold: delta_s of METHODS.md 3: the per-image weight eta is the fraction of valid
            pixels whose teacher confidence reaches it.
        mix_mode: ``none``, ``cutout``, ``cutmix`` or ``classmix`` (METHODS.md section 4).
        **kwargs: Shared options of `SemiSupervisedModule`.
    """

    name = "mean_teacher"
    uses_teacher = True
    uses_unlabeled = True
    default_mix_mode = "none"
    # Two passes with gradient (labeled, then unlabeled: BatchNorm statistics per stream); the teacher's forward.
    step_floor = StepFloor(passes=(1, 1), eval_forwards=1)

    def __init__(
        self,
        unsup_weight: float = 1.0,
        strong_threshold: float = 0.97,
        mix_mode: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        mix_mode = self.default_mix_mode if mix_mode is None else mix_mode
        if mix_mode not in MIX_MODES:
            raise ValueError(f"model.mix_mode={mix_mode!r}; expected one of {MIX_MODES}")
        check_fractions(strong_threshold=strong_threshold)
        check_non_negative(unsup_weight=unsup_weight)
        self.mix_mode = mix_mode

    @torch.no_grad()
    def pseudo_labels(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The teacher's argmax (in its ``teacher_bn`` mode), confident from ``strong_threshold`` on.

        The confident pixels are those the per-image weight eta counts (METHODS.md 3 step 5).
        """
        _, confidences, pseudo_labels = self.teacher_predict(images)
        return pseudo_labels, confidences >= self.hparams.strong_threshold

    @torch.no_grad()
    def make_unlabeled_targets(self, unlabeled: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Teacher pseudo-labels on the raw crops, then rescale, mix and strong augmentation (no grad).

        Returns the augmented images (B, 3, H, W), pseudo-labels (B, H, W) with ``ignore_index``
        where invalid, and confidences (B, H, W) with 0 where invalid.
        """
        images_u = unlabeled["image"]
        _, confidences, pseudo_labels = self.teacher_predict(images_u)
        if "mask" in unlabeled:  # partial labels
            pseudo_labels, confidences = overwrite_given(pseudo_labels, confidences, unlabeled["mask"], self.ignore_index)
        with self.phase("mix+aug"):
            images_u, pseudo_labels, confidences = random_rescale_crop(images_u, pseudo_labels, confidences,
                                                                       self.scale_range)
            images_u, pseudo_labels, confidences = mix_unlabeled(self.mix_mode, images_u, pseudo_labels, confidences)
            return strong_augment(images_u, pseudo_labels, confidences)

    def compute_losses(self, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        images_l, masks_l = batch["labeled"]["image"], batch["labeled"]["mask"]
        images_u, pseudo_labels, confidences = self.make_unlabeled_targets(batch["unlabeled"])
        # Two forward calls: BatchNorm statistics stay per stream, as in the reference.
        logits_l = self.student(images_l)
        logits_u = self.student(images_u)
        loss_sup = self.supervised_loss(logits_l, masks_l)
        loss_unsup, confident = confidence_weighted_ce(
            logits_u, pseudo_labels, confidences, self.hparams.strong_threshold, self.ignore_index
        )
        loss = loss_sup + self.hparams.unsup_weight * loss_unsup
        self.remember_unlabeled(images_u, pseudo_labels, logits_u)
        return {
            "loss": loss,
            "loss_sup": loss_sup.detach(),
            "loss_unsup": loss_unsup.detach(),
            "mask_ratio": confident,
        }


class CutOut(MeanTeacher):
    """Mean teacher whose unlabeled images lose a half-area box (ignored in the loss), METHODS.md 4."""

    name = "cutout"
    default_mix_mode = "cutout"


class CutMix(MeanTeacher):
    """Mean teacher whose unlabeled images get a half-area box from their batch neighbour, METHODS.md 4."""

    name = "cutmix"
    default_mix_mode = "cutmix"


class ClassMix(MeanTeacher):
    """Mean teacher that pastes half of the predicted classes of one image onto the next, METHODS.md 4."""

    name = "classmix"
    default_mix_mode = "classmix"
