"""C3-SemiSeg (Zhou et al., ICCV 2021; code github.com/Amandaynzhou/C3-SemiSeg), as that code does it (METHODS.md 6).

A teacher labels a weak view of each unlabeled crop; the student sees the labeled crops and a
colour-jittered strong view in one batch, cross-set CutMixed (step 2). Three terms (step 7):
supervised CE (step 3); a soft consistency to the teacher's probabilities on pixels above dynamic
class-balanced thresholds (steps 4-5, `src.losses.c3`); a pixel contrastive loss between the
labeled and the unlabeled set on a projection head (step 6). Both extra terms ramp up
with `sigmoid_rampup`; before ``unlabeled_start_step`` only the supervised and a labeled-only
contrastive term are trained.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.losses.c3 import (
    class_balanced_mask,
    cross_set_contrastive_loss,
    soft_consistency_loss,
    update_class_thresholds,
)
from src.losses.reco import downsample_nearest
from src.pl_modules.base import SemiSupervisedModule
from src.pl_modules.fixmatch import weak_view
from src.pl_modules.ops import (
    box_masks,
    colour_jitter,
    ema_decay,
    ema_update,
    mix_by_mask,
    pool_to_stride,
    sigmoid_rampup,
)


def projection_head(in_channels: int, dim: int) -> nn.Sequential:
    """C3's ``mlp`` head: 1x1 conv (bias) + ReLU + 1x1 conv (bias), weights ~ N(0, 0.01)."""
    head = nn.Sequential(nn.Conv2d(in_channels, dim, 1), nn.ReLU(inplace=True), nn.Conv2d(dim, dim, 1))
    for layer in (head[0], head[2]):
        nn.init.normal_(layer.weight, 0.0, 0.01)
    return head


def swap_halves(x: Tensor, keep: Tensor) -> Tensor:
    """Cross-set CutMix (METHODS.md 6 step 2): samples i and P + i (P = len(keep)) swap pixels where ``keep`` is False.

    An involution: the same call mixes the images and un-mixes the outputs of their forward
    (``keep`` resized to the outputs' grid). Samples from 2P on (an odd batch) are untouched.
    """
    pairs = keep.shape[0]
    first, second = x[:pairs], x[pairs : 2 * pairs]
    return torch.cat([mix_by_mask(keep, first, second), mix_by_mask(keep, second, first), x[2 * pairs :]])


class C3SemiSeg(SemiSupervisedModule):
    """Consistency with class-balanced thresholds plus cross-set pixel contrast (METHODS.md 6).

    Choices where METHODS.md 6 and 10 leave room (the README and the released ``train_ssl.sh``
    disagree; defaults follow the script, the only configuration that runs the contrastive path):
    - Teacher: an EMA teacher (``ema_teacher=True``, the script's ``--ema``): frozen until
      ``unlabeled_start_step``, a hard copy of the student (and of its projection head) at that
      step, then ``alpha = min(1 - 1/(s + 1), ema_decay)`` with s the steps since, applied before
      each step as the reference does. ``ema_teacher=False`` (README default) makes the teacher the
      current student itself, in ``teacher_bn`` mode, without gradient (a hard copy every step).
      NOTE: the teacher's BatchNorm buffers are copied from the student at every update; the
      reference copies them once, but its BN is frozen, so they never change there.
    - ``teacher_bn`` defaults to ``eval`` (the reference's teacher uses running statistics) and
      ``eval_teacher`` to False (the reference validates the student).
    - Class 0 is a possible anchor class (``exclude_class_zero=False``): the reference's ``x > 0``
      filter (road is never an anchor) is treated as a bug; set True to replicate it.
    - The consistency loss keeps the reference's extra 1/C (``consistency_class_mean``) so that
      the weight 50 means what it means there. 50 is the default here; ``configs/c3semiseg.yaml``
      sets 5 for the short from-scratch CPU schedule, where 50 swamps the supervised loss (the
      config's comment has the measurements), and the benchmark restores 50 on real datasets.
    - Steps: the reference counts ``world_size`` units per iteration (1,000 per epoch); defaults
      here are optimizer steps of its run (250 per epoch, 25,000 in all): unlabeled phase from
      epoch 10 (step 2,250), consistency ramp-up 16,000 units (4,000 steps), contrastive ramp-up
      1,000 units (250 steps).
    - Embeddings: the projection head reads the smp decoder's features average-pooled to stride
      ``embedding_stride`` (the reference: layer4 of DeepLabV2, stride 8; 4 suits small crops).
    - Views: the weak view is the crop after a shared rescale-crop (``data.scale_range``) and
      h-flip, its padding ignored; the strong view adds colour jitter with p = 1 (0.5, 0.5, 0.5,
      0.25). NOTE: no RandAugment and no +-10 degree rotation (the README's config has RandAugment
      off); labeled crops follow ``data.photometric`` (the reference: no colour augmentation).
    - Cross-set CutMix boxes are `ops.box_masks` (half-area, ReCo's generator); the reference draws
      its half-area boxes with a log-uniform aspect (same area, other aspect distribution).
    - Thresholds: ranks past the end (``end_percent = 1``) are clamped; padding pixels of the weak
      view neither count nor pass. Under DDP the teacher's outputs are gathered from all ranks.
    - Partial labels: given pixels replace the teacher's probabilities by one-hot and always pass.
    Not reproduced: frozen BN, DeepLabV2, Adam with a 10x smaller backbone lr (suite-wide choices).

    Args:
        contrastive_weight: w_ctr, weight of the contrastive loss after its ramp-up (0 turns it off).
        temperature: T of the contrastive loss.
        num_views: V (``hard_neg_num``): anchors per (image, class); a class needs more than V pixels
            of an image on the embedding grid.
        contrastive_start_step: First step of the (labeled-only, before the unlabeled phase) contrastive loss.
        contrastive_ramp_up_steps: Length of its sigmoid ramp-up.
        consistency_weight: w_con, weight of the consistency loss after its ramp-up (0: supervised only).
        consistency_ramp_up_steps: Length of its sigmoid ramp-up, from ``unlabeled_start_step``.
        unlabeled_start_step: First step that uses unlabeled images (and updates the EMA teacher).
        dynamic_threshold: Keep only pixels above their class's dynamic threshold (else all pixels).
        end_percent: Fraction of each predicted class's pixels (by confidence) the threshold aims to keep.
        gamma: Exponent of the threshold in the rank (0: a plain per-class quantile).
        threshold_momentum: Weight of the old threshold in its running average.
        initial_threshold: Start value of every class's threshold (0: the first update sets it).
        ema_teacher: EMA teacher (True) or the current student as its own teacher (False).
        cross_set_cutmix: CutMix the permuted labeled + unlabeled batch in pairs and un-mix the outputs.
        consistency_class_mean: Divide the consistency loss by the number of classes, as the reference.
        exclude_class_zero: Never use class 0 as an anchor class, as the reference.
        embedding_stride: Input pixels per embedding cell; finer decoder features are average-pooled.
        teacher_bn: BatchNorm mode of the teacher's forward (see `SemiSupervisedModule`).
        eval_teacher: Report the teacher as ``val/miou`` (see `SemiSupervisedModule`).
        **kwargs: Shared options of `SemiSupervisedModule` (``representation_dim`` is the embedding
            dimension, ``ema_decay`` the EMA's alpha).
    """

    name = "c3semiseg"
    uses_unlabeled = True

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
        non_negative = {
            "contrastive_weight": contrastive_weight, "consistency_weight": consistency_weight, "gamma": gamma,
            "contrastive_start_step": contrastive_start_step, "contrastive_ramp_up_steps": contrastive_ramp_up_steps,
            "consistency_ramp_up_steps": consistency_ramp_up_steps, "unlabeled_start_step": unlabeled_start_step,
        }
        for option, value in non_negative.items():
            if value < 0:
                raise ValueError(f"model.{option} must be >= 0, got {value}")
        fractions = {"end_percent": end_percent, "threshold_momentum": threshold_momentum,
                     "initial_threshold": initial_threshold}
        for option, value in fractions.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"model.{option} must be in [0, 1], got {value}")
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

    # ------------------------------------------------------------------ schedule and teacher
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
        """Before ``step``: nothing until the unlabeled phase, a hard copy at its first step, then EMA (step 8)."""
        if self.teacher is None:
            return
        since = step - self.hparams.unlabeled_start_step
        if since < 0:
            return
        decay = ema_decay(since, self.hparams.ema_decay)  # 0 at the first step: a copy
        for teacher, student in ((self.teacher, self.student), (self.teacher_head, self.rep_head)):
            ema_update(teacher, student, decay)
            for buffer_t, buffer_s in zip(teacher.buffers(), student.buffers()):
                buffer_t.copy_(buffer_s)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.update_teacher(int(self.global_step))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Nothing: the teacher is updated before each step (`update_teacher`), not after as in the base."""

    # ------------------------------------------------------------------ forward passes
    def embed(self, head: nn.Module, features: Tensor, input_width: int) -> Tensor:
        """Projection-head embeddings on the ``embedding_stride`` grid from decoder features (N, F, h, w)."""
        return head(pool_to_stride(features, self.hparams.embedding_stride, input_width))

    @torch.no_grad()
    def teacher_outputs(self, images: Tensor, with_embeddings: bool) -> tuple[Tensor, Tensor | None]:
        """Teacher probabilities (B, C, H, W) and embeddings (B, D, h, w) or None, without gradient (step 1)."""
        if self.teacher is not None:
            self.set_teacher_mode()
            logits, features = self.teacher.forward_features(images)
            head = self.teacher_head
        else:  # no EMA: the current student is the teacher
            was_training = self.student.training
            self.student.train(self.hparams.teacher_bn == "train")
            try:
                logits, features = self.student.forward_features(images)
            finally:
                self.student.train(was_training)
            head = self.rep_head
        embeddings = self.embed(head, features, images.shape[-1]) if with_embeddings else None
        return logits.float().softmax(dim=1), embeddings

    def forward_student(self, images: Tensor, with_embeddings: bool) -> tuple[Tensor, Tensor | None]:
        """Logits (N, C, H, W) and embeddings of a randomly paired, cross-set CutMixed batch, un-mixed (step 2)."""
        perm = torch.randperm(len(images)).to(images.device)
        mixed = images[perm]
        keep = None
        if self.hparams.cross_set_cutmix and len(images) >= 2:
            keep = box_masks(len(images) // 2, *images.shape[-2:], device=images.device)
            mixed = swap_halves(mixed, keep)
        logits, features = self.student.forward_features(mixed)
        embeddings = self.embed(self.rep_head, features, images.shape[-1]) if with_embeddings else None
        if keep is not None:
            logits = swap_halves(logits, keep)
            if embeddings is not None:  # the head is pointwise: un-mixing after it equals un-mixing its input
                embeddings = swap_halves(embeddings, downsample_nearest(keep, embeddings.shape[-2:]))
        inverse = perm.argsort()
        return logits[inverse], embeddings[inverse] if embeddings is not None else None

    @torch.no_grad()
    def update_thresholds(self, confidences: Tensor, pseudo_labels: Tensor, valid: Tensor) -> None:
        """One threshold update from the teacher's weak-view outputs of every rank (step 4)."""
        if self._trainer is not None and self.trainer.world_size > 1:
            confidences, pseudo_labels, valid = (self.all_gather(t) for t in (confidences, pseudo_labels, valid))
        hp = self.hparams
        self.class_thresholds.copy_(update_class_thresholds(
            self.class_thresholds, confidences, pseudo_labels, hp.end_percent, hp.gamma, hp.threshold_momentum, valid
        ))

    def contrastive_term(
        self, embeddings: Tensor, keys: Tensor, labels: Tensor, logits: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Cross-set contrastive loss from full-size labels and student logits (step 6)."""
        size = embeddings.shape[-2:]
        logits_small = F.interpolate(logits.detach().float(), size=size, mode="bilinear", align_corners=False)
        predictions = logits_small.argmax(dim=1)
        return cross_set_contrastive_loss(
            embeddings, keys, downsample_nearest(labels, size), predictions, self.hparams.num_views,
            self.hparams.temperature, self.ignore_index, self.hparams.exclude_class_zero,
        )

    def confident(self, confidences: Tensor, pseudo_labels: Tensor) -> Tensor:
        """The kept pixels M of step 4 (bool): above their class's current threshold, or all without them."""
        if not self.hparams.dynamic_threshold:
            return torch.ones_like(confidences, dtype=torch.bool)
        return class_balanced_mask(confidences, pseudo_labels, self.class_thresholds)

    @torch.no_grad()
    def pseudo_labels(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The teacher's argmax (`teacher_outputs`) and `confident` with the current thresholds (not updated)."""
        probs, _ = self.teacher_outputs(images, with_embeddings=False)
        confidences, pseudo_labels = probs.max(dim=1)
        return pseudo_labels, self.confident(confidences, pseudo_labels)

    def threshold_logs(self) -> dict[str, Tensor]:
        """The per-class thresholds as ``threshold/<class name>`` entries (logged as ``train/threshold/...``)."""
        return {f"threshold/{name}": t for name, t in zip(self.class_names, self.class_thresholds.clone().unbind())}

    # ------------------------------------------------------------------ losses
    @torch.no_grad()
    def unlabeled_targets(self, unlabeled: dict[str, Tensor], with_embeddings: bool) -> dict[str, Tensor | None]:
        """Weak and strong views, the teacher's targets on the weak one and the kept pixels (steps 1 and 4).

        Returns ``strong`` (B, 3, H, W), teacher ``probs`` (B, C, H, W), ``pseudo_labels`` (B, H, W),
        ``kept`` (B, H, W) bool (the mask M), ``valid`` (B, H, W) bool (not padding) and the teacher's
        ``embeddings`` (or None).
        """
        images_u = unlabeled["image"]
        given = unlabeled.get("mask", torch.full_like(images_u[:, 0], self.ignore_index, dtype=torch.long))
        weak, given, valid = weak_view(images_u, given, self.scale_range)
        strong = colour_jitter(weak, p=1.0, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.25)
        probs, embeddings = self.teacher_outputs(weak, with_embeddings)
        confidences, pseudo_labels = probs.max(dim=1)
        if self.hparams.dynamic_threshold:
            self.update_thresholds(confidences, pseudo_labels, valid)
        kept = valid & self.confident(confidences, pseudo_labels)
        # Partial labels: a given pixel's label replaces the teacher's prediction and always passes.
        known = given != self.ignore_index
        pseudo_labels = torch.where(known, given, pseudo_labels)
        one_hot = F.one_hot(pseudo_labels, self.num_classes).permute(0, 3, 1, 2).to(probs.dtype)
        return {
            "strong": strong,
            "probs": torch.where(known[:, None], one_hot, probs),
            "pseudo_labels": pseudo_labels,
            "kept": kept | known,
            "valid": valid,
            "embeddings": embeddings,
        }

    def supervised_phase_losses(
        self, images_l: Tensor, masks_l: Tensor, contrastive_weight: float
    ) -> dict[str, Tensor]:
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
        losses = {
            "loss_sup": loss_sup.detach(),
            "loss_unsup": loss_unsup.detach(),
            "mask_ratio": (kept.sum() / targets["valid"].sum().clamp(min=1)).float(),
        }
        if use_contrast:
            # Key side: the student's own embeddings (detached) for labeled pixels, the teacher's for unlabeled.
            keys = torch.cat([embeddings[: len(images_l)].detach(), targets["embeddings"]])
            loss_contrast, rows = self.contrastive_term(embeddings, keys, torch.cat([masks_l, shown]), logits)
            loss = loss + contrastive_weight * loss_contrast
            losses.update(loss_contrast=loss_contrast.detach(), anchor_rows=rows)
        self.remember_unlabeled(strong, shown, logits_u)
        return {"loss": loss, **losses, **self.threshold_logs()}
