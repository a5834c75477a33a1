"""FixMatch (Sohn et al., NeurIPS 2020, arXiv:2001.07685) as UniMatch's baseline, as in UniMatch's code (METHODS.md 8).

No teacher: the model's own prediction on a weakly augmented unlabeled view (no gradient) labels
a strongly augmented, CutMixed view of it, and only pixels whose confidence reaches a threshold
count. The unlabeled term is METHODS.md 8 step 5 (`ops.thresholded_ce`); the total is step 6.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from src.pl_modules.base import SemiSupervisedModule, check_fractions
from src.pl_modules.ops import (confident_fraction, cutmix_boxes, mix_by_mask, overwrite_given, strong_photometric,
                                 thresholded_ce, weak_view)
from src.pl_modules.timing import StepFloor

MIX_SOURCES = ("view", "batch")


class UnlabeledViews(NamedTuple):
    weak: Tensor  # (B, 3, H, W)
    given_w: Tensor  # (B, H, W) long, given labels (partial mode) or ignore
    valid_w: Tensor  # (B, H, W) bool
    strong: list[Tensor]  # each (B, 3, H, W), already CutMixed
    boxes: list[Tensor]  # each (B, H, W) bool, True where the mix source was pasted
    mix: Tensor | None  # mix_source="view": the second weak view (labelled in eval mode); else None
    given_m: Tensor | None  # ... its given labels
    valid_m: Tensor | None  # ... and valid pixels


class FixMatch(SemiSupervisedModule):
    """FixMatch as UniMatch's baseline: one CutMixed strong view learns the weak view's confident labels.

    Per step: a weak view (batch rescale-crop with ``scale_range``, h-flip) and strong views of it (plus
    colour jitter, grayscale, blur and, with ``cutmix_p``, a pasted box); train-mode forwards of ``[labeled;
    weak]`` (BatchNorm over both, as the reference) and of the strong views, which learn the detached weak
    prediction: ``L = (L_sup + L_strong) / 2`` (METHODS.md 8 step 6).

    Choices where the reference is loose (METHODS.md 8, 10):
    - The CutMix source. The released code zips the same loader twice: its "mix batch" holds the
      same images, independently augmented, labelled by an eval-mode forward (UniMatch issue #51).
      ``mix_source="view"`` does that from a second weak view of each crop; ``"batch"`` pastes
      sample (i + 1) mod B's strong view with its train-mode weak prediction (no extra forward).
      The authors report equal results (issues #34, #68).
    - The weak view's rescale is the batch-level `random_rescale_crop` of the crops (range from
      ``data.scale_range``; UniMatch resizes the whole image by 0.5-2.0 before cropping), padding ignored.
    - Partial labels (this suite's mode, not UniMatch's) overwrite pseudo-labels with confidence 1.

    Args:
        confidence_threshold: tau: pixels whose weak-view confidence is below it add nothing to the
            unlabeled loss (0.95 for Pascal/COCO; UniMatch's Cityscapes config uses 0).
        cutmix_p: Probability that a strong view gets a CutMix box (area 2-40 %, aspect 0.3-3.3).
        mix_source: Where pasted boxes come from: ``view`` or ``batch`` (see above).
        **kwargs: Shared options of `SemiSupervisedModule`.
    """

    name = "fixmatch"
    uses_unlabeled = True
    num_strong_views = 1
    # [labeled; weak], then the strong view; the eval-mode labels of the mixing view.
    step_floor = StepFloor(passes=(2, 1), eval_forwards=1)

    def __init__(self, confidence_threshold: float = 0.95, cutmix_p: float = 0.5, mix_source: str = "view",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_fractions(confidence_threshold=confidence_threshold, cutmix_p=cutmix_p)
        if mix_source not in MIX_SOURCES:
            raise ValueError(f"model.mix_source={mix_source!r}; expected one of {MIX_SOURCES}")

    def forward_labeled_and_weak(self, images_l: Tensor, images_w: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Labeled logits, weak logits and (UniMatch only) feature-perturbed weak logits."""
        logits_l, logits_w = self.student(torch.cat([images_l, images_w])).split([len(images_l), len(images_w)])
        return logits_l, logits_w, None

    def forward_strong(self, images_s: Tensor) -> Tensor:
        """Student logits (k*B, C, H, W) of the k strong views stacked (UniMatch V2 perturbs features)."""
        return self.student(images_s)

    def unlabeled_loss(self, loss_strong: Tensor, logits_fp: Tensor | None,
                       targets_w: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The unlabeled loss and logged extras from the strong views' mean term, the weak targets and
        `forward_labeled_and_weak`'s third output (UniMatch's perturbed logits): here that term alone."""
        return loss_strong, {}

    @torch.no_grad()
    def predict_eval_mode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Confidences and pseudo-labels (B, H, W) with the student in eval mode (running BN statistics)."""
        with self.phase("teacher"):
            return self.forward_in_mode(self.student, images, train=False).float().softmax(dim=1).max(dim=1)

    @torch.no_grad()
    def pseudo_labels(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The student's eval-mode argmax (`predict_eval_mode`), confident from ``confidence_threshold`` on.

        NOTE: training labels the weak view in train mode (batch statistics), the mix view in eval mode;
        eval mode makes the labeller the validated model, independent of the batch it is measured on."""
        confidences, pseudo_labels = self.predict_eval_mode(images)
        return pseudo_labels, confidences >= self.hparams.confidence_threshold

    @torch.no_grad()
    def make_views(self, unlabeled: dict[str, Tensor]) -> UnlabeledViews:
        with self.phase("mix+aug"):
            images_u = unlabeled["image"]
            batch, _, height, width = images_u.shape
            given = self.given_labels(unlabeled)
            weak, given_w, valid_w = weak_view(images_u, given, self.scale_range)
            strong = [strong_photometric(weak) for _ in range(self.num_strong_views)]
            mix = given_m = valid_m = None
            if self.hparams.mix_source == "view":
                mix, given_m, valid_m = weak_view(images_u, given, self.scale_range)
                sources = [strong_photometric(mix) for _ in strong]
            else:
                sources = [torch.roll(s, -1, dims=0) for s in strong]  # partner (i + 1) mod B
            boxes = [cutmix_boxes(batch, height, width, device=weak.device, p=self.hparams.cutmix_p) for _ in strong]
            strong = [mix_by_mask(box, source, s) for box, source, s in zip(boxes, sources, strong)]
            return UnlabeledViews(weak, given_w, valid_w, strong, boxes, mix, given_m, valid_m)

    @torch.no_grad()
    def targets(self, views: UnlabeledViews, logits_w: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """(pseudo-labels, confidences, valid) of the weak view and of the pasted boxes' source."""
        confidences_w, labels_w = logits_w.detach().float().softmax(dim=1).max(dim=1)
        labels_w, confidences_w = overwrite_given(labels_w, confidences_w, views.given_w, self.ignore_index)
        weak = (labels_w, confidences_w, views.valid_w)
        if views.mix is None:  # the partner (i + 1) mod B's own weak targets
            return weak, tuple(torch.roll(t, -1, dims=0) for t in weak)
        confidences_m, labels_m = self.predict_eval_mode(views.mix)
        labels_m, confidences_m = overwrite_given(labels_m, confidences_m, views.given_m, self.ignore_index)
        return weak, (labels_m, confidences_m, views.valid_m)

    def compute_losses(self, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        images_l, masks_l = batch["labeled"]["image"], batch["labeled"]["mask"]
        views = self.make_views(batch["unlabeled"])
        logits_l, logits_w, logits_fp = self.forward_labeled_and_weak(images_l, views.weak)
        logits_s = self.forward_strong(torch.cat(views.strong)).chunk(len(views.strong))  # (k*B, ...) -> k x (B, ...)
        targets_w, targets_m = self.targets(views, logits_w)
        threshold = self.hparams.confidence_threshold
        losses_strong = []
        for logits, box in zip(logits_s, views.boxes):
            labels, confidences, valid = (mix_by_mask(box, m, w) for m, w in zip(targets_m, targets_w))
            losses_strong.append(thresholded_ce(logits, labels, confidences, valid, threshold, self.ignore_index))
        loss_sup = self.supervised_loss(logits_l, masks_l)
        loss_unsup, extra = self.unlabeled_loss(torch.stack(losses_strong).mean(), logits_fp, targets_w)
        # The grid shows what the last strong view learns: ignore_index where invalid or under the threshold.
        shown = torch.where(valid & (confidences >= threshold), labels, self.ignore_index)
        self.remember_unlabeled(views.strong[-1], shown, logits_s[-1])
        return {"loss": (loss_sup + loss_unsup) / 2, "loss_sup": loss_sup.detach(), "loss_unsup": loss_unsup.detach(),
                **extra, "mask_ratio": confident_fraction(targets_w[1], targets_w[2], threshold)}
