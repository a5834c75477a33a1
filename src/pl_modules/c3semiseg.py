"""C3-SemiSeg (Zhou et al., ICCV 2021; code github.com/Amandaynzhou/C3-SemiSeg), as that code does it (METHODS.md 6).

A teacher labels a weak view of each unlabeled crop; the student sees the labeled crops and a
colour-jittered strong view in one batch, cross-set CutMixed (step 2). Three terms (step 7):
supervised CE (step 3); a soft consistency to the teacher's probabilities on pixels above dynamic
class-balanced thresholds (steps 4-5, `src.losses.c3`); a pixel contrastive loss between the
labeled and the unlabeled set on a projection head (step 6). Both extra terms ramp up with
`sigmoid_rampup`; before ``unlabeled_start_step`` only the supervised and a labeled-only
contrastive term are trained.
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
from src.pl_modules.ops import (colour_jitter, cross_set_cutmix_forward, ema_decay, ema_update, overwrite_given,
                                 sigmoid_rampup, weak_view)
from src.pl_modules.timing import StepFloor


class C3SemiSeg(SemiSupervisedModule):
    """Consistency with class-balanced thresholds plus cross-set pixel contrast (METHODS.md 6).

    Where METHODS.md 6 and 10 leave room (the README and the released ``train_ssl.sh`` disagree),
    defaults follow the script, the only configuration that runs the contrastive path; each choice
    is a NOTE at its code or below. NOTE: steps are optimizer steps of the reference run (250 per
    epoch, 25,000 in all; it counts ``world_size`` units per iteration): unlabeled phase from epoch 10
    (step 2,250), consistency ramp-up 16,000 units (4,000 steps), contrastive ramp-up 1,000 units (250
    steps). Labeled crops follow ``data.photometric`` (the reference: no colour augmentation). Not
    reproduced: frozen BN, DeepLabV2, Adam with a 10x smaller backbone lr (suite-wide choices).

    Args:
        contrastive_weight: w_ctr, weight of the contrastive loss after its ramp-up (0 turns it off).
        temperature: T of the contrastive loss.
        num_views: V (``hard_neg_num``): anchors per (image, class); a class needs more than V pixels
            of an image on the embedding grid.
        contrastive_start_step: First step of the (labeled-only, before the unlabeled phase) contrastive loss.
        contrastive_ramp_up_steps: Length of its sigmoid ramp-up.
        consistency_weight: w_con, weight of the consistency loss after its ramp-up (0: supervised only).
            ``configs/c3semiseg.yaml`` sets 5 for its short from-scratch CPU schedule, where 50 swamps the
            supervised loss (its comment has the measurements); the benchmark restores 50 on real datasets.
        consistency_ramp_up_steps: Length of its sigmoid ramp-up, from ``unlabeled_start_step``.
        unlabeled_start_step: First step that uses unlabeled images (and updates the EMA teacher).
        dynamic_threshold: Keep only pixels above their class's dynamic threshold (else all pixels).
        end_percent: Fraction of each predicted class's pixels (by confidence) the threshold aims to keep.
        gamma: Exponent of the threshold in the rank (0: a plain per-class quantile).
        threshold_momentum: Weight of the old threshold in its running average.
        initial_threshold: Start value of every class's threshold (0: the first update sets it).
        ema_teacher: EMA teacher (True, the script's ``--ema``; see `update_teacher`) or the current
            student as its own teacher, in ``teacher_bn`` mode, without gradient (False, the README's).
        cross_set_cutmix: CutMix the permuted labeled + unlabeled batch in pairs and un-mix the outputs.
        consistency_class_mean: Divide the consistency loss by the number of classes, as the reference,
            so that its weight of 50 means what it means there.
        exclude_class_zero: Never use class 0 as an anchor class: the reference's ``x > 0`` filter (road is
            never an anchor), treated as a bug by default.
        embedding_stride: Input pixels per embedding cell: the head reads the decoder's features
            average-pooled to it (the reference: layer4 of DeepLabV2, stride 8; 4 suits small crops).
        teacher_bn: The teacher's BatchNorm mode (`SemiSupervisedModule`); ``eval``: the reference's
            teacher uses running statistics.
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
        hp = self.hparams
        contrastive = consistency = 0.0
        if step >= hp.contrastive_start_step:
            contrastive = hp.contrastive_weight * sigmoid_rampup(step - hp.contrastive_start_step,
                                                                 hp.contrastive_ramp_up_steps)
        if step >= hp.unlabeled_start_step:
            consistency = hp.consistency_weight * sigmoid_rampup(step - hp.unlabeled_start_step,
                                                                 hp.consistency_ramp_up_steps)
        return contrastive, consistency

    @torch.no_grad()
    def update_teacher(self, step: int) -> None:
        """Before ``step``: nothing until the unlabeled phase, a hard copy at its first step, then EMA (step 8).

        ``alpha = ema_decay(s, ema_decay)``, s the steps since the phase began, for the network and its
        projection head. NOTE: the teacher's BatchNorm buffers are copied from the student at every
        update; the reference copies them once, but its BN is frozen, so they never change there.
        """
        since = step - self.hparams.unlabeled_start_step
        if since < 0:
            return
        decay = ema_decay(since, self.hparams.ema_decay)  # 0 at the first step: a copy
        for teacher, student in ((self.teacher, self.student), (self.teacher_head, self.rep_head)):
            ema_update(teacher, student, decay)
            for buffer_t, buffer_s in zip(teacher.buffers(), student.buffers()):
                buffer_t.copy_(buffer_s)

    def embed(self, head: nn.Module, features: Tensor, input_width: int) -> Tensor:
        """Projection-head embeddings on the ``embedding_stride`` grid from decoder features (N, F, h, w)."""
        return head(pool_to_stride(features, self.hparams.embedding_stride, input_width))

    @torch.no_grad()
    def teacher_outputs(self, images: Tensor, with_embeddings: bool) -> tuple[Tensor, Tensor | None]:
        """Teacher probabilities (B, C, H, W) and embeddings (B, D, h, w) or None, without gradient (step 1)."""
        network, head = (self.teacher, self.teacher_head) if self.teacher is not None else (self.student, self.rep_head)
        with self.phase("teacher"):
            logits, features = self.forward_in_mode(network, images, self.hparams.teacher_bn == "train",
                                                    with_features=True)
            embeddings = self.embed(head, features, images.shape[-1]) if with_embeddings else None
            return logits.float().softmax(dim=1), embeddings

    def forward_student(self, images: Tensor, with_embeddings: bool) -> tuple[Tensor, Tensor | None]:
        """Logits (N, C, H, W) and embeddings of the batch through `cross_set_cutmix_forward` (step 2)."""

        def forward(mixed: Tensor) -> tuple[Tensor, Tensor | None]:
            logits, features = self.student.forward_features(mixed)
            return logits, self.embed(self.rep_head, features, images.shape[-1]) if with_embeddings else None

        return cross_set_cutmix_forward(forward, images, self.hparams.cross_set_cutmix, lambda: self.phase("mix+aug"))

    @torch.no_grad()
    def update_thresholds(self, confidences: Tensor, pseudo_labels: Tensor, valid: Tensor) -> None:
        """One threshold update from the teacher's weak-view outputs of every rank (step 4).

        NOTE: ranks past the end (``end_percent = 1``) are clamped; padding pixels of the weak view
        neither count nor pass. Under DDP the teacher's outputs are gathered from all ranks.
        """
        with self.phase("teacher"):
            if self._trainer is not None and self.trainer.world_size > 1:
                confidences, pseudo_labels, valid = (self.all_gather(t) for t in (confidences, pseudo_labels, valid))
            hp = self.hparams
            self.class_thresholds.copy_(update_class_thresholds(
                self.class_thresholds, confidences, pseudo_labels, hp.end_percent, hp.gamma, hp.threshold_momentum,
                valid,
            ))

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

    def threshold_logs(self) -> dict[str, Tensor]:
        """The per-class thresholds as ``threshold/<class name>`` entries (logged as ``train/threshold/...``)."""
        return {f"threshold/{name}": t for name, t in zip(self.class_names, self.class_thresholds.clone().unbind())}

    def contrastive_term(self, embeddings: Tensor, keys: Tensor, labels: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-set contrastive loss from full-size labels and student logits (step 6)."""
        hp = self.hparams
        with self.phase("contrast"):
            return contrastive_from_logits(embeddings, keys, labels, logits, hp.num_views, hp.temperature,
                                           self.ignore_index, hp.exclude_class_zero)

    @torch.no_grad()
    def unlabeled_targets(self, unlabeled: dict[str, Tensor], with_embeddings: bool) -> dict[str, Tensor | None]:
        """Weak and strong views, the teacher's targets on the weak one and the kept pixels (steps 1 and 4).

        Returns ``strong`` (B, 3, H, W), teacher ``probs`` (B, C, H, W), ``pseudo_labels`` (B, H, W),
        ``kept`` (B, H, W) bool (the mask M), ``valid`` (B, H, W) bool (not padding) and the teacher's
        ``embeddings`` (or None). NOTE: the weak view is the crop after a shared rescale-crop and
        h-flip, its padding ignored; the strong view adds colour jitter with p = 1 (0.5, 0.5, 0.5,
        0.25), no RandAugment and no +-10 degree rotation (the README's config has RandAugment off).
        """
        images_u = unlabeled["image"]
        given = unlabeled.get("mask", torch.full_like(images_u[:, 0], self.ignore_index, dtype=torch.long))
        with self.phase("mix+aug"):
            weak, given, valid = weak_view(images_u, given, self.scale_range)
            strong = colour_jitter(weak, p=1.0, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.25)
        probs, embeddings = self.teacher_outputs(weak, with_embeddings)
        confidences, pseudo_labels = probs.max(dim=1)
        if self.hparams.dynamic_threshold:
            self.update_thresholds(confidences, pseudo_labels, valid)
        kept = valid & self.confident(confidences, pseudo_labels)
        # Partial labels: a given pixel's probabilities become its label's one-hot, and it always passes.
        pseudo_labels, probs = overwrite_given(pseudo_labels, probs, given, self.ignore_index)
        return {"strong": strong, "probs": probs, "pseudo_labels": pseudo_labels, "valid": valid,
                "kept": kept | (given != self.ignore_index), "embeddings": embeddings}

    def supervised_phase_losses(self, images_l: Tensor, masks_l: Tensor, contrastive_weight: float) -> dict[str, Tensor]:
        """Before the unlabeled phase: CE and a contrastive loss of the labeled images with themselves."""
        logits_l, features_l = self.student.forward_features(images_l)
        loss_sup = self.supervised_loss(logits_l, masks_l)
        losses = {"loss": loss_sup, "loss_sup": loss_sup.detach()}
        if contrastive_weight > 0:
            embeddings = self.embed(self.rep_head, features_l, images_l.shape[-1])
            loss_contrast, rows = self.contrastive_term(embeddings, embeddings, masks_l, logits_l)
            losses.update(loss=loss_sup + contrastive_weight * loss_contrast, loss_contrast=loss_contrast.detach(),
                          anchor_rows=rows)
        return losses

    def compute_losses(self, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        contrastive_weight, consistency_weight = self.loss_weights(int(self.global_step))
        images_l, masks_l = batch["labeled"]["image"], batch["labeled"]["mask"]
        if consistency_weight == 0:
            return {**self.supervised_phase_losses(images_l, masks_l, contrastive_weight), **self.threshold_logs()}
        use_contrast = contrastive_weight > 0
        targets = self.unlabeled_targets(batch["unlabeled"], use_contrast)
        strong, kept = targets["strong"], targets["kept"]
        # One forward of labeled + strong unlabeled images (BatchNorm over both), un-mixed.
        logits, embeddings = self.forward_student(torch.cat([images_l, strong]), use_contrast)
        logits_l, logits_u = logits.split([len(images_l), len(strong)])
        loss_sup = self.supervised_loss(logits_l, masks_l)
        loss_unsup = soft_consistency_loss(logits_u, targets["probs"], kept, self.hparams.consistency_class_mean)
        loss = loss_sup + consistency_weight * loss_unsup
        shown = torch.where(kept, targets["pseudo_labels"], self.ignore_index)
        losses = {"loss_sup": loss_sup.detach(), "loss_unsup": loss_unsup.detach(),
                  "mask_ratio": (kept.sum() / targets["valid"].sum().clamp(min=1)).float()}
        if use_contrast:
            # Key side: the student's own embeddings (detached) for labeled pixels, the teacher's for unlabeled.
            keys = torch.cat([embeddings[: len(images_l)].detach(), targets["embeddings"]])
            loss_contrast, rows = self.contrastive_term(embeddings, keys, torch.cat([masks_l, shown]), logits)
            loss = loss + contrastive_weight * loss_contrast
            losses.update(loss_contrast=loss_contrast.detach(), anchor_rows=rows)
        self.remember_unlabeled(strong, shown, logits_u)
        return {"loss": loss, **losses, **self.threshold_logs()}
