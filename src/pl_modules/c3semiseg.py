"""C3-SemiSeg (Zhou et al., ICCV 2021; code github.com/Amandaynzhou/C3-SemiSeg), as that code does it (METHODS.md 6).

A teacher labels a weak view of each unlabeled crop (step 1); the student learns the labeled crops and a strong view
in one cross-set CutMixed batch (2): CE (3), soft consistency on pixels above dynamic class-balanced thresholds (4-5)
and a labeled/unlabeled pixel contrast (6), ramped up (7). `src.losses.c3`: losses, options, reference notes.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from src.losses.c3 import C3Consistency, C3Contrast, C3Thresholds
from src.networks import projection_head
from src.pl_modules.base import SemiSupervisedModule, check_non_negative
from src.pl_modules.ops import (colour_jitter, copy_buffers, cross_set_cutmix_forward, ema_decay, ema_update,
                                 overwrite_given, sigmoid_rampup_from, weak_view)
from src.pl_modules.timing import StepFloor


class C3SemiSeg(SemiSupervisedModule):
    """Consistency with class-balanced thresholds plus cross-set pixel contrast (METHODS.md 6).

    Args:
        unlabeled_start_step: First step that uses unlabeled images (and updates the EMA teacher).
        consistency: The consistency loss: its weight and ramp-up from ``unlabeled_start_step`` (`C3Consistency`).
        thresholds: The dynamic class-balanced thresholds that choose its pixels (`C3Thresholds`).
        contrast: The pixel contrastive loss: weight, start, ramp-up, anchors, embedding grid (`C3Contrast`).
        ema_teacher: An EMA teacher (the script's ``--ema``), or the student labels for itself (the README's).
        cross_set_cutmix: CutMix the permuted labeled + unlabeled batch in pairs and un-mix the outputs.
        teacher_bn: The teacher's BatchNorm mode; ``eval``: the reference's teacher uses running statistics.
        eval_teacher: Report the teacher as ``val/miou``; False: the reference validates the student.
        **kwargs: Shared options of `SemiSupervisedModule` (``representation_dim``: D, ``ema_decay``: alpha).
    """

    name = "c3semiseg"
    uses_unlabeled = True
    teacher_update_before_step = True  # as the reference, at the start of each iteration
    step_floor = StepFloor(passes=(2,), eval_forwards=1, variant="c3head")  # one pass with the head; the teacher's
    steady_state = {"unlabeled_start_step": 0}  # no supervised phase

    def __init__(
        self,
        unlabeled_start_step: int = 2250,
        consistency: C3Consistency = C3Consistency(),
        thresholds: C3Thresholds = C3Thresholds(),
        contrast: C3Contrast = C3Contrast(),
        ema_teacher: bool = True,
        cross_set_cutmix: bool = True,
        teacher_bn: str = "eval",
        eval_teacher: bool = False,
        **kwargs: Any,
    ) -> None:
        check_non_negative(unlabeled_start_step=unlabeled_start_step)
        self.uses_teacher = ema_teacher  # read by the base to build the EMA teacher
        super().__init__(teacher_bn=teacher_bn, eval_teacher=eval_teacher, **kwargs)
        self.rep_head = projection_head(self.student.feature_channels, self.hparams.representation_dim)
        self.teacher_head = copy.deepcopy(self.rep_head).requires_grad_(False) if self.teacher is not None else None
        self.consistency, self.thresholds, self.contrast = consistency, thresholds, contrast  # hparams: the CLI's dicts
        self.register_buffer("class_thresholds", thresholds.initial(self.num_classes))

    def loss_weights(self, step: int) -> tuple[float, float]:
        """``(w_ctr * r(t - t_ctr0), w_con * r(t - t_u0))`` at ``step`` (METHODS.md 6 step 7); 0 before a start."""
        contrast, consistency, ramp = self.contrast, self.consistency, sigmoid_rampup_from
        return (contrast.weight * ramp(step, contrast.start_step, contrast.ramp_up_steps),
                consistency.weight * ramp(step, self.hparams.unlabeled_start_step, consistency.ramp_up_steps))

    def update_teacher(self, step: int) -> None:
        """Before ``step``, from the unlabeled phase on: an EMA of network and head (step 8; `src.losses.c3`)."""
        since = step - self.hparams.unlabeled_start_step
        if since >= 0:
            for teacher, student in ((self.teacher, self.student), (self.teacher_head, self.rep_head)):
                ema_update(teacher, student, ema_decay(since, self.hparams.ema_decay))
                copy_buffers(teacher, student)

    @torch.no_grad()
    def teacher_outputs(self, images: Tensor, with_embeddings: bool) -> tuple[Tensor, Tensor | None]:
        """Teacher (or, without one, student) probabilities (B, C, H, W) and embeddings or None (step 1)."""
        network, head = (self.teacher, self.teacher_head) if self.teacher is not None else (self.student, self.rep_head)
        with self.phase("teacher"):
            logits, features = self.forward_in_mode(network, images, self.hparams.teacher_bn == "train",
                                                    with_features=True)
            embeddings = self.contrast.embed(head, features, images.shape[-1]) if with_embeddings else None
            return logits.float().softmax(dim=1), embeddings

    def forward_student(self, images: Tensor, with_embeddings: bool, mix: bool = True) -> tuple[Tensor, Tensor | None]:
        """Logits (N, C, H, W) and embeddings or None, through `cross_set_cutmix_forward` if ``mix`` (step 2)."""

        def forward(batch: Tensor) -> tuple[Tensor, Tensor | None]:
            logits, features = self.student.forward_features(batch)
            return logits, self.contrast.embed(self.rep_head, features, images.shape[-1]) if with_embeddings else None

        if not mix:
            return forward(images)
        return cross_set_cutmix_forward(forward, images, self.hparams.cross_set_cutmix, lambda: self.phase("mix+aug"))

    @torch.no_grad()
    def pseudo_labels(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The teacher's argmax (`teacher_outputs`) and the pixels its current thresholds keep (not updated)."""
        confidences, pseudo_labels = self.teacher_outputs(images, with_embeddings=False)[0].max(dim=1)
        return pseudo_labels, self.thresholds.keep(confidences, pseudo_labels, self.class_thresholds)

    @torch.no_grad()
    def unlabeled_targets(self, unlabeled: dict[str, Tensor], with_embeddings: bool) -> dict[str, Tensor | None]:
        """Steps 1 and 4: the ``strong`` view; of the weak one the teacher's ``probs`` and ``embeddings`` (or None),
        the kept pixels ``kept``, their share of the valid ones ``mask_ratio``, and ``shown``, ignore where not kept."""
        images_u, thresholds = unlabeled["image"], self.thresholds
        given = self.given_labels(unlabeled)
        with self.phase("mix+aug"):  # NOTE: the strong view has no RandAugment or rotation (`src.losses.c3`)
            weak, given, valid = weak_view(images_u, given, self.scale_range)
            strong = colour_jitter(weak, p=1.0, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.25)
        probs, embeddings = self.teacher_outputs(weak, with_embeddings)
        confidences, pseudo_labels = probs.max(dim=1)
        if thresholds.dynamic_threshold:
            with self.phase("teacher"):  # one update from the teacher outputs of every rank
                thresholds.update_(self.class_thresholds, *self.gather_ranks(confidences, pseudo_labels, valid))
        kept = valid & thresholds.keep(confidences, pseudo_labels, self.class_thresholds)
        kept |= given != self.ignore_index  # partial labels: a given pixel passes, its probabilities one-hot
        pseudo_labels, probs = overwrite_given(pseudo_labels, probs, given, self.ignore_index)
        return {"strong": strong, "probs": probs, "embeddings": embeddings, "kept": kept,
                "mask_ratio": (kept.sum() / valid.sum().clamp(min=1)).float(),
                "shown": torch.where(kept, pseudo_labels, self.ignore_index)}

    def compute_losses(self, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        contrastive_weight, consistency_weight = self.loss_weights(int(self.global_step))
        images_l, masks_l = batch["labeled"]["image"], batch["labeled"]["mask"]
        semi, n = consistency_weight > 0, len(images_l)
        # Before the unlabeled phase the labeled images alone; then labeled + strong unlabeled ones in one forward.
        targets = self.unlabeled_targets(batch["unlabeled"], contrastive_weight > 0) if semi else {}
        images = torch.cat([images_l, targets["strong"]]) if semi else images_l
        logits, embeddings = self.forward_student(images, contrastive_weight > 0, mix=semi)
        loss = loss_sup = self.supervised_loss(logits[:n], masks_l)
        losses = {"loss_sup": loss_sup.detach()}
        if semi:
            loss_unsup = self.consistency.loss(logits[n:], targets["probs"], targets["kept"])
            loss = loss + consistency_weight * loss_unsup
            losses.update(loss_unsup=loss_unsup.detach(), mask_ratio=targets["mask_ratio"])
            self.remember_unlabeled(targets["strong"], targets["shown"], logits[n:])
        if embeddings is not None:
            keys = torch.cat([embeddings[:n].detach(), targets["embeddings"]]) if semi else embeddings
            labels = torch.cat([masks_l, targets["shown"]]) if semi else masks_l
            with self.phase("contrast"):
                loss_contrast, rows = self.contrast.loss(embeddings, keys, labels, logits, self.ignore_index)
            loss = loss + contrastive_weight * loss_contrast
            losses.update(loss_contrast=loss_contrast.detach(), anchor_rows=rows)
        thresholds = {f"threshold/{c}": t for c, t in zip(self.class_names, self.class_thresholds.clone().unbind())}
        return {"loss": loss, **losses, **thresholds}
