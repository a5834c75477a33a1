"""FixMatch and UniMatch (Yang et al., CVPR 2023, arXiv:2208.09910), as in UniMatch's code (METHODS.md 8).

No teacher: the model's own prediction on a weakly augmented unlabeled view (no gradient) labels
strongly augmented, CutMixed views of it, and only pixels whose confidence reaches a threshold
count. FixMatch (Sohn et al., NeurIPS 2020; UniMatch's baseline) learns one strong view; UniMatch
learns two, plus a stream decoded from channel-dropped encoder features of the weak view.
Each unlabeled term is METHODS.md 8 step 5 (`thresholded_ce`); the total is step 6.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from src.pl_modules.base import SemiSupervisedModule
from src.pl_modules.ops import (
    _grey,
    _uniform,
    colour_jitter,
    confident_fraction,
    gaussian_blur,
    mix_by_mask,
    random_hflip,
    random_rescale_crop,
)

MIX_SOURCES = ("view", "batch")
_TRIES_PER_ROUND = 32


# ---------------------------------------------------------------------------------------- augmentation
def cutmix_boxes(
    batch_size: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    p: float = 0.5,
    area_range: tuple[float, float] = (0.02, 0.4),
    aspect_range: tuple[float, float] = (0.3, 1 / 0.3),
    max_tries: int = 1024,
) -> Tensor:
    """UniMatch's CutMix boxes (``obtain_cutmix_box``): (B, H, W) bool, True inside; no box w.p. ``1 - p``.

    The area ``a = U(area_range) * H * W`` is drawn once per sample; aspect ``r ~ U(aspect_range)``,
    size ``w = int(sqrt(a / r))``, ``h = int(sqrt(a * r))`` and a top-left corner uniform over the
    whole image are redrawn until the box fits. Batched: tries come in rounds of 32 per sample and
    each sample keeps its first fitting one, which is the reference's rejection sampling. After
    ``max_tries`` (a crop so elongated that no box fits, where the reference loops forever) the
    last try is clamped into the image.
    """
    u = _uniform((batch_size, 2), generator)
    apply = u[:, 0] < p
    area = (area_range[0] + (area_range[1] - area_range[0]) * u[:, 1]) * height * width
    boxes = torch.zeros(batch_size, 4, dtype=torch.float64, device=u.device)  # x0, y0, w, h
    found = ~apply  # samples without a box need no try
    rows = torch.arange(batch_size, device=u.device)
    for _ in range(max(1, math.ceil(max_tries / _TRIES_PER_ROUND))):
        v = _uniform((batch_size, _TRIES_PER_ROUND, 3), generator)
        ratio = aspect_range[0] + (aspect_range[1] - aspect_range[0]) * v[..., 0]
        box_w = torch.floor(torch.sqrt(area.unsqueeze(1) / ratio))
        box_h = torch.floor(torch.sqrt(area.unsqueeze(1) * ratio))
        tries = torch.stack([torch.floor(v[..., 1] * width), torch.floor(v[..., 2] * height), box_w, box_h], -1)
        fits = (tries[..., 0] + box_w <= width) & (tries[..., 1] + box_h <= height)  # (B, tries)
        take = fits.any(1) & ~found
        boxes[take] = tries[rows, fits.double().argmax(1)][take]  # argmax: the first fitting try
        found = found | take
        if bool(found.all()):
            break
    if not bool(found.all()):
        last = tries[:, -1]
        box_w, box_h = last[:, 2].clamp(max=width), last[:, 3].clamp(max=height)
        clamped = torch.stack([torch.minimum(last[:, 0], width - box_w), torch.minimum(last[:, 1], height - box_h),
                               box_w, box_h], 1)
        boxes = torch.where(found.unsqueeze(1), boxes, clamped)
    device = torch.device(device) if device is not None else torch.device("cpu")
    x0, y0, box_w, box_h = (t.long().to(device).view(-1, 1, 1) for t in boxes.unbind(1))
    ys = torch.arange(height, device=device).view(1, -1, 1)
    xs = torch.arange(width, device=device).view(1, 1, -1)
    inside = (ys >= y0) & (ys < y0 + box_h) & (xs >= x0) & (xs < x0 + box_w)
    return inside & apply.to(device).view(-1, 1, 1)


def random_grayscale(images: Tensor, generator: torch.Generator | None = None, p: float = 0.2) -> Tensor:
    """Per sample, with probability ``p``, the luma in all three channels (torchvision ``RandomGrayscale``)."""
    apply = (_uniform((images.shape[0],), generator) < p).to(images.device).view(-1, 1, 1, 1)
    return torch.where(apply, _grey(images).expand_as(images), images)


def strong_photometric(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """UniMatch's strong view: colour jitter (0.5, 0.5, 0.5, 0.25) p 0.8, grayscale p 0.2, blur p 0.5 sigma 0.1-2."""
    images = colour_jitter(images, generator, 0.8, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.25)
    images = random_grayscale(images, generator, 0.2)
    return gaussian_blur(images, generator, 0.5, sigma_range=(0.1, 2.0))


def weak_view(
    images: Tensor, given_labels: Tensor, scale_range: tuple[float, float], generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Random rescale-crop and h-flip of the unlabeled crops: images, given labels, valid (B, H, W) bool.

    ``valid`` is False on the padding of a shrunk crop (UniMatch's 254 marker, ignored in the loss).
    """
    ones = images.new_ones(images.shape[0], *images.shape[2:])
    images, given_labels, valid = random_rescale_crop(images, given_labels, ones, scale_range, generator)
    images, given_labels, valid = random_hflip(images, given_labels, valid, generator)
    return images, given_labels, valid > 0


# ---------------------------------------------------------------------------------------- losses
def thresholded_ce(
    logits: Tensor, pseudo_labels: Tensor, confidences: Tensor, valid: Tensor, threshold: float, ignore_index: int = 255
) -> Tensor:
    """UniMatch's unlabeled term: ``sum(CE * [conf >= threshold] * valid) / #valid`` (METHODS.md 8 step 5).

    Pixels under the threshold add nothing (and get no gradient) but count in the denominator, as
    every valid pixel does. No valid pixel gives 0, still attached to the graph.
    """
    kept = valid & (confidences >= threshold)
    targets = torch.where(kept, pseudo_labels, ignore_index)
    pixel_loss = F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="none")
    return pixel_loss.sum() / valid.sum().clamp(min=1)


def overwrite_given(
    pseudo_labels: Tensor, confidences: Tensor, given: Tensor, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """Partial labels (METHODS.md 3): a given pixel's label replaces the pseudo-label, with confidence 1."""
    known = given != ignore_index
    return torch.where(known, given, pseudo_labels), torch.where(known, 1.0, confidences)


class UnlabeledViews(NamedTuple):
    weak: Tensor  # (B, 3, H, W)
    given_w: Tensor  # (B, H, W) long, given labels (partial mode) or ignore
    valid_w: Tensor  # (B, H, W) bool
    strong: list[Tensor]  # each (B, 3, H, W), already CutMixed
    boxes: list[Tensor]  # each (B, H, W) bool, True where the mix source was pasted
    mix: Tensor | None  # mix_source="view": the second weak view, labelled in eval mode
    given_m: Tensor | None
    valid_m: Tensor | None


class FixMatch(SemiSupervisedModule):
    """FixMatch as UniMatch's baseline: one CutMixed strong view learns the weak view's confident labels.

    Per step: a weak view (batch rescale-crop with ``scale_range``, h-flip) and strong views of it
    (plus colour jitter, grayscale, blur and, with ``cutmix_p``, a pasted box); one train-mode forward
    on ``[labeled; weak]`` (BatchNorm over both, as the reference), one on the strong views. The weak
    prediction, detached, is the target: ``L = (L_sup + L_strong) / 2`` (METHODS.md 8 step 6).

    Choices where the reference is loose (METHODS.md 8, 10):
    - The CutMix source. The released code zips the same loader twice, so its "mix batch" holds
      the same images, independently augmented, labelled by an eval-mode forward (UniMatch issue
      #51; METHODS.md 8 calls it an independent batch). ``mix_source="view"`` does that, from a
      second batch-level weak view of each crop. ``"batch"`` pastes sample (i + 1) mod B's strong view
      and reuses its train-mode weak prediction (no extra forward); the authors report equal
      results (issues #34, #68).
    - The weak view's rescale is the batch-level `random_rescale_crop` of the crops (range linked from
      ``data.scale_range``; UniMatch resizes the whole image by 0.5-2.0 before cropping); its padding
      is ignored.
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

    def __init__(
        self, confidence_threshold: float = 0.95, cutmix_p: float = 0.5, mix_source: str = "view", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= confidence_threshold <= 1.0:
            raise ValueError(f"model.confidence_threshold must be in [0, 1], got {confidence_threshold}")
        if not 0.0 <= cutmix_p <= 1.0:
            raise ValueError(f"model.cutmix_p must be in [0, 1], got {cutmix_p}")
        if mix_source not in MIX_SOURCES:
            raise ValueError(f"model.mix_source={mix_source!r}; expected one of {MIX_SOURCES}")

    def forward_labeled_and_weak(self, images_l: Tensor, images_w: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Labeled logits, weak logits and (UniMatch only) feature-perturbed weak logits."""
        logits_l, logits_w = self.student(torch.cat([images_l, images_w])).split([len(images_l), len(images_w)])
        return logits_l, logits_w, None

    @torch.no_grad()
    def predict_eval_mode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Confidences and pseudo-labels (B, H, W) with the student in eval mode (running BN statistics)."""
        was_training = self.student.training
        self.student.eval()
        try:
            return self.student(images).float().softmax(dim=1).max(dim=1)
        finally:
            self.student.train(was_training)

    @torch.no_grad()
    def pseudo_labels(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The student's eval-mode argmax (`predict_eval_mode`); confident from ``confidence_threshold`` on.

        NOTE: the strong views learn the weak view's prediction from the train-mode forward of
        ``[labeled; weak]`` (batch statistics); only the mix view is labelled in eval mode. Eval mode
        makes the labeller the validated model, independent of the batch it is measured on.
        """
        confidences, pseudo_labels = self.predict_eval_mode(images)
        return pseudo_labels, confidences >= self.hparams.confidence_threshold

    @torch.no_grad()
    def make_views(self, unlabeled: dict[str, Tensor]) -> UnlabeledViews:
        images_u = unlabeled["image"]
        batch, _, height, width = images_u.shape
        given = unlabeled.get("mask")
        if given is None:
            given = torch.full((batch, height, width), self.ignore_index, dtype=torch.long, device=images_u.device)
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

    def compute_losses(self, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        images_l, masks_l = batch["labeled"]["image"], batch["labeled"]["mask"]
        views = self.make_views(batch["unlabeled"])
        logits_l, logits_w, logits_fp = self.forward_labeled_and_weak(images_l, views.weak)
        logits_s = self.student(torch.cat(views.strong)).chunk(len(views.strong))  # (k*B, C, H, W) -> k x (B, ...)
        with torch.no_grad():
            confidences_w, labels_w = logits_w.detach().float().softmax(dim=1).max(dim=1)
            labels_w, confidences_w = overwrite_given(labels_w, confidences_w, views.given_w, self.ignore_index)
            if views.mix is None:
                # The partner (i + 1) mod B's own weak targets.
                weak_targets = (labels_w, confidences_w, views.valid_w)
                labels_m, confidences_m, valid_m = (torch.roll(t, -1, dims=0) for t in weak_targets)
            else:
                confidences_m, labels_m = self.predict_eval_mode(views.mix)
                labels_m, confidences_m = overwrite_given(labels_m, confidences_m, views.given_m, self.ignore_index)
                valid_m = views.valid_m
        threshold = self.hparams.confidence_threshold
        losses_strong = []
        for logits, box in zip(logits_s, views.boxes):
            labels = mix_by_mask(box, labels_m, labels_w)
            confidences = mix_by_mask(box, confidences_m, confidences_w)
            valid = mix_by_mask(box, valid_m, views.valid_w)
            losses_strong.append(thresholded_ce(logits, labels, confidences, valid, threshold, self.ignore_index))
        loss_sup = self.supervised_loss(logits_l, masks_l)
        loss_strong = torch.stack(losses_strong).mean()
        extra = {}
        loss_unsup = loss_strong
        if logits_fp is not None:
            loss_fp = thresholded_ce(logits_fp, labels_w, confidences_w, views.valid_w, threshold, self.ignore_index)
            loss_unsup = (1 - self.hparams.fp_weight) * loss_strong + self.hparams.fp_weight * loss_fp
            extra = {"loss_strong": loss_strong.detach(), "loss_fp": loss_fp.detach()}
        loss = (loss_sup + loss_unsup) / 2
        # The grid shows what the last strong view learns: 255 where ignored or under the threshold.
        shown = torch.where(valid & (confidences >= threshold), labels, self.ignore_index)
        self.remember_unlabeled(views.strong[-1], shown, logits_s[-1])
        return {
            "loss": loss,
            "loss_sup": loss_sup.detach(),
            "loss_unsup": loss_unsup.detach(),
            **extra,
            "mask_ratio": confident_fraction(confidences_w, views.valid_w, threshold),
        }


class UniMatch(FixMatch):
    """UniMatch: FixMatch with two strong views and a feature-perturbed stream (METHODS.md 8).

    The encoder features of ``[labeled; weak]`` are decoded clean and through ``Dropout2d(fp_dropout)``
    as one doubled batch (`Segmenter.forward_perturbed`); the perturbed weak logits learn the weak
    pseudo-labels. Dropout is on only in that stream. ``L = (L_sup + (1 - fp_weight) * mean(L_s1,
    L_s2) + fp_weight * L_fp) / 2``, i.e. 0.25 / 0.25 / 0.5 with the default ``fp_weight`` (step 6).
    smp applies the dropout to every encoder feature map the decoder reads: for DeepLabV3+ the
    stride-4 and deepest ones, as the reference (its c1 and c4).

    Args:
        fp_dropout: Channel-dropout probability of the feature-perturbed stream.
        fp_weight: Share of the feature-perturbed term in the unlabeled loss; the two strong views
            share the rest equally.
        **kwargs: Options of `FixMatch` and `SemiSupervisedModule`.
    """

    name = "unimatch"
    num_strong_views = 2

    def __init__(self, fp_dropout: float = 0.5, fp_weight: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= fp_dropout < 1.0:
            raise ValueError(f"model.fp_dropout must be in [0, 1), got {fp_dropout}")
        if not 0.0 <= fp_weight <= 1.0:
            raise ValueError(f"model.fp_weight must be in [0, 1], got {fp_weight}")

    def forward_labeled_and_weak(self, images_l: Tensor, images_w: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        clean, perturbed = self.student.forward_perturbed(torch.cat([images_l, images_w]), self.hparams.fp_dropout)
        logits_l, logits_w = clean.split([len(images_l), len(images_w)])
        return logits_l, logits_w, perturbed[len(images_l):]
