"""ReCo: regional contrast (Liu et al., ICLR 2022, arXiv:2104.04465, METHODS.md sections 2-5).

A representation head on the decoder features learns pixel embeddings with a contrastive
loss: hard queries (pixels whose own-class probability is under the strong threshold) are
pulled to their class prototype and pushed from keys of classes sampled through the
semantic class-relation graph (`src.losses.reco`). The default is ClassMix + ReCo, as in the
paper; unlabeled pixels enter the loss only where the teacher's confidence reaches the weak
threshold.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from src.losses.reco import reco_from_features
from src.pl_modules.base import check_fractions
from src.pl_modules.mean_teacher import MeanTeacher
from src.pl_modules.ops import confidence_weighted_ce
from src.pl_modules.timing import StepFloor


class ReCo(MeanTeacher):
    """ClassMix (by default) mean teacher plus the ReCo loss on labeled and confident unlabeled pixels.

    Args:
        reco_weight: Weight of the ReCo loss.
        weak_threshold: delta_w: unlabeled pixels enter the ReCo loss when the teacher's confidence reaches it.
        reco_strong_threshold: delta_s of the ReCo loss: a valid pixel is a hard query when the student's
            probability of its own class is under it.
        temperature: tau, used in the class-relation graph and in the InfoNCE logits.
        num_queries: Queries per class per mini-batch.
        num_negatives: Negative keys per query.
        **kwargs: Options of `MeanTeacher` (``mix_mode`` defaults to ``classmix``) and of the base.
    """

    name = "reco"
    uses_representation = True
    default_mix_mode = "classmix"
    step_floor = StepFloor(passes=(1, 1), eval_forwards=1, variant="head")

    def __init__(
        self,
        reco_weight: float = 1.0,
        weak_threshold: float = 0.7,
        reco_strong_threshold: float = 0.97,
        temperature: float = 0.5,
        num_queries: int = 256,
        num_negatives: int = 512,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_fractions(weak_threshold=weak_threshold)

    def reco_term(self, logits: Tensor, features: Tensor, labels: Tensor, valid: Tensor) -> Tensor:
        hp = self.hparams
        with self.phase("contrast"):
            return reco_from_features(
                self.rep_head,
                logits,
                features,
                labels,
                valid,
                strong_threshold=hp.reco_strong_threshold,
                temperature=hp.temperature,
                num_queries=hp.num_queries,
                num_negatives=hp.num_negatives,
            )

    def compute_losses(self, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        hp = self.hparams
        images_l, masks_l = batch["labeled"]["image"], batch["labeled"]["mask"]
        images_u, pseudo_labels, confidences = self.make_unlabeled_targets(batch["unlabeled"])
        logits_l, features_l = self.student.forward_features(images_l)
        logits_u, features_u = self.student.forward_features(images_u)
        loss_sup = self.supervised_loss(logits_l, masks_l)
        loss_unsup, confident = confidence_weighted_ce(
            logits_u, pseudo_labels, confidences, hp.strong_threshold, self.ignore_index
        )
        # In partial-label mode the unlabeled stream carries the sparse labels too.
        partial = "mask" in batch["unlabeled"]
        labels_l, valid_l = labeled_reco_targets(logits_l, masks_l, self.ignore_index, hp.reco_strong_threshold, partial)
        valid_u = (confidences >= hp.weak_threshold) & (pseudo_labels != self.ignore_index)
        loss_reco = self.reco_term(
            torch.cat([logits_l, logits_u]),
            torch.cat([features_l, features_u]),
            torch.cat([labels_l, pseudo_labels]),
            torch.cat([valid_l, valid_u]),
        )
        loss = loss_sup + hp.unsup_weight * loss_unsup + hp.reco_weight * loss_reco
        self.remember_unlabeled(images_u, pseudo_labels, logits_u)
        valid_pixels = (pseudo_labels != self.ignore_index).sum().clamp(min=1)
        return {
            "loss": loss,
            "loss_sup": loss_sup.detach(),
            "loss_unsup": loss_unsup.detach(),
            "loss_reco": loss_reco.detach(),
            "mask_ratio": confident,
            "weak_ratio": valid_u.sum() / valid_pixels,
        }


def labeled_reco_targets(
    logits: Tensor, masks: Tensor, ignore_index: int, strong_threshold: float, partial: bool
) -> tuple[Tensor, Tensor]:
    """Labels (N, H, W) and validity (N, H, W) of labeled images for the ReCo loss.

    Fully labeled images: the ground truth where it is given. With sparse (partial) labels the
    reference fills the rest with the student's own prediction and keeps it where the student is
    confident (METHODS.md 5, partial mode).
    """
    given = masks != ignore_index
    if not partial:
        return masks, given
    with torch.no_grad():
        confidences, predictions = logits.detach().float().softmax(dim=1).max(dim=1)
    labels = torch.where(given, masks, predictions)
    return labels, given | (confidences >= strong_threshold)
