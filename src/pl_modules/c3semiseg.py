"""C3-SemiSeg (Zhou et al., ICCV 2021; code github.com/Amandaynzhou/C3-SemiSeg), as that code does it (METHODS.md 6).

A teacher labels a weak view of each unlabeled crop; the student learns the labeled crops and a strong view in
one cross-set CutMixed batch (step 2): CE (step 3), a soft consistency on pixels above dynamic class-balanced
thresholds (steps 4-5) and a labeled/unlabeled pixel contrast on a projection head (step 6), ramped up (step 7).
`src.losses.c3` holds the losses and thresholds, and how the defaults and choices follow the reference.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from src.losses.c3 import class_balanced_mask, contrastive_from_logits, soft_consistency_loss, update_class_thresholds
from src.losses.reco import pool_to_stride
from src.networks import projection_head
from src.pl_modules.base import SemiSupervisedModule, check_fractions, check_non_negative
from src.pl_modules.ops import (colour_jitter, copy_buffers, cross_set_cutmix_forward, ema_decay, ema_update,
                                 overwrite_given, sigmoid_rampup_from, weak_view)
from src.pl_modules.timing import StepFloor


class C3SemiSeg(SemiSupervisedModule):
    """Consistency with class-balanced thresholds plus cross-set pixel contrast (METHODS.md 6).

    Args:
        contrastive_weight: w_ctr, weight of the contrastive loss after its ramp-up (0 turns it off).
        temperature: T of the contrastive loss.
        num_views: V (``hard_neg_num``), anchors per (image, class); a class needs more than V pixels of an image.
        contrastive_start_step: First step of the contrastive loss (labeled-only before the unlabeled phase).
        contrastive_ramp_up_steps: Length of its sigmoid ramp-up.
        consistency_weight: w_con, weight of the consistency loss after its ramp-up (0: supervised only).
        consistency_ramp_up_steps: Length of its sigmoid ramp-up, from ``unlabeled_start_step``.
        unlabeled_start_step: First step that uses unlabeled images (and updates the EMA teacher).
        dynamic_threshold: Keep only pixels above their class's dynamic threshold (else all pixels).
        end_percent: Fraction of each predicted class's pixels (by confidence) the threshold aims to keep.
        gamma: Exponent of the threshold in the rank (0: a plain per-class quantile).
        threshold_momentum: Weight of the old threshold in its running average.
        initial_threshold: Start value of every class's threshold (0: the first update sets it).
        ema_teacher: An EMA teacher (the script's ``--ema``; see `update_teacher`), or the current student as
            its own teacher, in ``teacher_bn`` mode, without gradient (the README's).
        cross_set_cutmix: CutMix the permuted labeled + unlabeled batch in pairs and un-mix the outputs.
        consistency_class_mean: Divide the consistency loss by the number of classes, as the reference.
        exclude_class_zero: Never use class 0 as an anchor class (the reference's ``x > 0`` filter).
        embedding_stride: Input pixels per embedding cell: the head reads decoder features pooled to it.
        teacher_bn: The teacher's BatchNorm mode; ``eval``: the reference's teacher uses running statistics.
        eval_teacher: Report the teacher as ``val/miou``; False: the reference validates the student.
        **kwargs: Shared options of `SemiSupervisedModule` (``representation_dim`` is the embedding
            dimension, ``ema_decay`` the EMA's alpha).
    """

    name = "c3semiseg"
    uses_unlabeled = True
    teacher_update_before_step = True  # as the reference, at the start of each iteration
    # One pass of labeled + strong unlabeled images, cross-set mixed, with the projection head; the teacher's forward.
    step_floor = StepFloor(passes=(2,), eval_forwards=1, variant="c3head")
    steady_state = {"unlabeled_start_step": 0}  # no supervised phase

    def __init__(
        self,
        contrastive_weight: float = 0.1,
        temperature: float = 0.15,
        num_views: int = 20,
        contrastive_start_step: int = 0,
        contrastive_ramp_up_steps: int = 250,
        consistency_weight: float = 50.0,
        consistency_ramp_up_steps: int = 4000,
        unlabeled_start_step: int = 2250,
        dynamic_threshold: bool = True,
        end_percent: float = 0.8,
        gamma: float = 0.0,
        threshold_momentum: float = 0.9,
        initial_threshold: float = 0.9,
        ema_teacher: bool = True,
        cross_set_cutmix: bool = True,
        consistency_class_mean: bool = True,
        exclude_class_zero: bool = False,
        embedding_stride: int = 4,
        teacher_bn: str = "eval",
        eval_teacher: bool = False,
        **kwargs: Any,
    ) -> None:
        check_non_negative(
            contrastive_weight=contrastive_weight, consistency_weight=consistency_weight, gamma=gamma,
            contrastive_start_step=contrastive_start_step, contrastive_ramp_up_steps=contrastive_ramp_up_steps,
            consistency_ramp_up_steps=consistency_ramp_up_steps, unlabeled_start_step=unlabeled_start_step,
        )
        check_fractions(end_percent=end_percent, threshold_momentum=threshold_momentum,
                        initial_threshold=initial_threshold)
        if not temperature > 0:
            raise ValueError(f"model.temperature must be > 0, got {temperature}")
        if num_views < 2:
            raise ValueError(f"model.num_views must be >= 2 (an anchor needs a positive), got {num_views}")
        if embedding_stride < 1:
            raise ValueError(f"model.embedding_stride must be >= 1, got {embedding_stride}")
        self.uses_teacher = ema_teacher  # read by the base to build the EMA teacher
        super().__init__(teacher_bn=teacher_bn, eval_teacher=eval_teacher, **kwargs)
        self.rep_head = projection_head(self.student.feature_channels, self.hparams.representation_dim)
        self.teacher_head = copy.deepcopy(self.rep_head).requires_grad_(False) if self.teacher is not None else None
        self.register_buffer("class_thresholds", torch.full((self.num_classes,), float(initial_threshold)))

    def loss_weights(self, step: int) -> tuple[float, float]:
        """``(w_ctr * r(t - t_ctr0), w_con * r(t - t_u0))`` at ``step`` (METHODS.md 6 step 7); 0 before a start."""
        hp, ramp = self.hparams, sigmoid_rampup_from
        return (hp.contrastive_weight * ramp(step, hp.contrastive_start_step, hp.contrastive_ramp_up_steps),
                hp.consistency_weight * ramp(step, hp.unlabeled_start_step, hp.consistency_ramp_up_steps))

    @torch.no_grad()
    def update_teacher(self, step: int) -> None:
        """Before ``step``: nothing until the unlabeled phase, then an EMA of the network and its head (step 8).

        The decay is ``ema_decay(s, ema_decay)``, s the steps since the phase began: 0, a copy, at its first
        step. NOTE: BatchNorm buffers are copied from the student at every update; the reference copies them
        once (trainer/Ctrainer.py:629-631), but its BN is frozen, so they never change there.
        """
        since = step - self.hparams.unlabeled_start_step
        if since >= 0:
            for teacher, student in ((self.teacher, self.student), (self.teacher_head, self.rep_head)):
                ema_update(teacher, student, ema_decay(since, self.hparams.ema_decay))
                copy_buffers(teacher, student)

    def embed(self, head: nn.Module, features: Tensor, input_width: int) -> Tensor:
        """Projection-head embeddings on the ``embedding_stride`` grid from decoder features (N, F, h, w)."""
        return head(pool_to_stride(features, self.hparams.embedding_stride, input_width))

    @torch.no_grad()
    def teacher_outputs(self, images: Tensor, with_embeddings: bool) -> tuple[Tensor, Tensor | None]:
        """Teacher (or, without one, student) probabilities (B, C, H, W) and embeddings or None (step 1)."""
        network, head = (self.teacher, self.teacher_head) if self.teacher is not None else (self.student, self.rep_head)
        with self.phase("teacher"):
            logits, features = self.forward_in_mode(network, images, self.hparams.teacher_bn == "train",
                                                    with_features=True)
            embeddings = self.embed(head, features, images.shape[-1]) if with_embeddings else None
            return logits.float().softmax(dim=1), embeddings

    def forward_student(self, images: Tensor, with_embeddings: bool, mix: bool = True) -> tuple[Tensor, Tensor | None]:
        """Logits (N, C, H, W) and embeddings or None, through `cross_set_cutmix_forward` if ``mix`` (step 2)."""

        def forward(batch: Tensor) -> tuple[Tensor, Tensor | None]:
            logits, features = self.student.forward_features(batch)
            return logits, self.embed(self.rep_head, features, images.shape[-1]) if with_embeddings else None

        if not mix:
            return forward(images)
        return cross_set_cutmix_forward(forward, images, self.hparams.cross_set_cutmix, lambda: self.phase("mix+aug"))

    def confident(self, confidences: Tensor, pseudo_labels: Tensor) -> Tensor:
        """The kept pixels M of step 4 (bool): above their class's current threshold, or all without them."""
        if not self.hparams.dynamic_threshold:
            return torch.ones_like(confidences, dtype=torch.bool)
        return class_balanced_mask(confidences, pseudo_labels, self.class_thresholds)

    @torch.no_grad()
    def pseudo_labels(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The teacher's argmax (`teacher_outputs`) and `confident` with the current thresholds (not updated)."""
        confidences, pseudo_labels = self.teacher_outputs(images, with_embeddings=False)[0].max(dim=1)
        return pseudo_labels, self.confident(confidences, pseudo_labels)

    @torch.no_grad()
    def unlabeled_targets(self, unlabeled: dict[str, Tensor], with_embeddings: bool) -> dict[str, Tensor | None]:
        """The ``strong`` view (B, 3, H, W) and, from the weak one, the teacher's ``probs`` (B, C, H, W) and
        ``embeddings`` (or None), the kept pixels M (``kept``, bool), their share of the valid ones
        (``mask_ratio``) and the kept pseudo-labels, ignore elsewhere (``shown``), steps 1 and 4."""
        images_u, hp = unlabeled["image"], self.hparams
        given = unlabeled.get("mask", torch.full_like(images_u[:, 0], self.ignore_index, dtype=torch.long))
        with self.phase("mix+aug"):
            # NOTE: weak = a shared rescale-crop and h-flip (padding ignored); strong = weak + colour jitter with
            # p = 1, without RandAugment (off in the README's config) or the +-10 degree rotation (METHODS.md 6).
            weak, given, valid = weak_view(images_u, given, self.scale_range)
            strong = colour_jitter(weak, p=1.0, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.25)
        probs, embeddings = self.teacher_outputs(weak, with_embeddings)
        confidences, pseudo_labels = probs.max(dim=1)
        if hp.dynamic_threshold:
            with self.phase("teacher"):  # one update from the teacher outputs of every rank
                confidences_all, labels_all, valid_all = self.gather_ranks(confidences, pseudo_labels, valid)
                self.class_thresholds.copy_(update_class_thresholds(
                    self.class_thresholds, confidences_all, labels_all, hp.end_percent, hp.gamma,
                    hp.threshold_momentum, valid_all))
        # Partial labels: a given pixel's probabilities become its label's one-hot, and it always passes.
        kept = (valid & self.confident(confidences, pseudo_labels)) | (given != self.ignore_index)
        pseudo_labels, probs = overwrite_given(pseudo_labels, probs, given, self.ignore_index)
        return {"strong": strong, "probs": probs, "embeddings": embeddings, "kept": kept,
                "mask_ratio": (kept.sum() / valid.sum().clamp(min=1)).float(),
                "shown": torch.where(kept, pseudo_labels, self.ignore_index)}

    def compute_losses(self, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        hp = self.hparams
        contrastive_weight, consistency_weight = self.loss_weights(int(self.global_step))
        images_l, masks_l = batch["labeled"]["image"], batch["labeled"]["mask"]
        semi, n = consistency_weight > 0, len(images_l)
        # Before the unlabeled phase the labeled images alone; then one forward of labeled + strong unlabeled
        # images (BatchNorm over both), cross-set mixed and un-mixed.
        targets = self.unlabeled_targets(batch["unlabeled"], contrastive_weight > 0) if semi else {}
        images = torch.cat([images_l, targets["strong"]]) if semi else images_l
        logits, embeddings = self.forward_student(images, contrastive_weight > 0, mix=semi)
        loss = loss_sup = self.supervised_loss(logits[:n], masks_l)
        losses = {"loss_sup": loss_sup.detach()}
        if semi:
            loss_unsup = soft_consistency_loss(logits[n:], targets["probs"], targets["kept"], hp.consistency_class_mean)
            loss = loss + consistency_weight * loss_unsup
            losses.update(loss_unsup=loss_unsup.detach(), mask_ratio=targets["mask_ratio"])
            self.remember_unlabeled(targets["strong"], targets["shown"], logits[n:])
        if embeddings is not None:
            # Keys: the anchors themselves before the unlabeled phase (labeled self-contrast); then the
            # student's own embeddings (detached) for labeled pixels, the teacher's for unlabeled ones.
            keys = torch.cat([embeddings[:n].detach(), targets["embeddings"]]) if semi else embeddings
            labels = torch.cat([masks_l, targets["shown"]]) if semi else masks_l
            with self.phase("contrast"):
                loss_contrast, rows = contrastive_from_logits(embeddings, keys, labels, logits, hp.num_views,
                                                              hp.temperature, self.ignore_index, hp.exclude_class_zero)
            loss = loss + contrastive_weight * loss_contrast
            losses.update(loss_contrast=loss_contrast.detach(), anchor_rows=rows)
        thresholds = {f"threshold/{c}": t for c, t in zip(self.class_names, self.class_thresholds.clone().unbind())}
        return {"loss": loss, **losses, **thresholds}
