"""C3-SemiSeg's losses and dynamic class-balanced thresholds (Zhou et al., ICCV 2021; METHODS.md section 6).

Pure tensor functions, usable without Lightning, with no Python loop over images, classes or pixels:
- `update_class_thresholds` and `class_balanced_mask`: the per-class confidence thresholds of
  METHODS.md 6 step 4 (a running average of a per-class quantile of the teacher's confidences);
- `soft_consistency_loss`: the soft cross-entropy to the teacher's probabilities on kept pixels (step 5);
- `sample_anchors`, `pixel_contrastive_loss` and `cross_set_contrastive_loss`: the cross-set
  pixel contrastive loss (step 6): per (image, class), ``num_views`` anchor pixels, half of them
  mispredicted ("hard"), contrasted across the whole labeled + unlabeled batch;
  `contrastive_from_logits` takes full-size labels and logits to the embedding grid first.
The ramp-up of both losses is `src.pl_modules.ops.sigmoid_rampup_from`. The method's options of each
part are a small frozen dataclass that checks itself and applies them: `C3Consistency`,
`C3Thresholds` and `C3Contrast` (``model.init_args.consistency``, ``.thresholds``, ``.contrast``).

How `src.pl_modules.c3semiseg.C3SemiSeg` follows the reference (github.com/Amandaynzhou/C3-SemiSeg):
- Where METHODS.md 6 and 10 leave room (the README and the released ``scripts/train_ssl.sh``
  disagree), defaults follow the script (train_ssl.sh:21-46), the only configuration that runs the
  contrastive path: EMA teacher, cross-set CutMix, contrastive weight 0.1, V = 20, T = 0.15.
- Steps are optimizer steps of the reference run: 250 per epoch, 25,000 in all; the reference counts
  ``world_size`` units per iteration (trainer/Ctrainer.py:484-490). So the unlabeled phase starts at
  epoch 10 (step 2,250), the consistency ramp-up is 16,000 units (4,000 steps), the contrastive one
  1,000 units (250 steps). configs/c3semiseg.yaml scales them to its shorter run.
- The consistency loss keeps the reference's extra 1/C (``consistency.class_mean``), so that its
  weight of 50 means what it means there. Class 0 is an anchor class unless ``contrast.exclude_class_zero``:
  the reference's ``x > 0`` filter (road is never an anchor) is treated as a bug by default.
- Thresholds move at momentum 0.9 from 0.9 (Ctrainer.py:336, 583), on the teacher outputs of every
  rank (Ctrainer.py:335); ranks past the end (``end_percent = 1``) are clamped, and padding pixels of
  the weak view neither count nor pass.
- The teacher is a hard copy at the unlabeled phase's first step, then an EMA, for the network and
  the projection head alike (Ctrainer.py:633-647): decay ``ema_decay(s, ema_decay)``, s the steps since
  the phase began (0, the copy, at its first). NOTE: BatchNorm buffers are copied from the student at
  every update; the reference copies them once (Ctrainer.py:629-631), but its BN is frozen, so they
  never change there. NOTE: the reference's warm-up is faster: its counter runs one iteration ahead
  and adds the world size per iteration, so its k-th decay is ``min(1 - 1/((k+1)·ws + 1), 0.99)``
  (0.99 after about 25 steps on its 4 GPUs, against 99 here; benchmarks/results/parity/c3semiseg.md).
- NOTE: the weak view is a shared rescale-crop and h-flip of the batch (padding ignored), the strong
  one the weak view with colour jitter at p = 1, without RandAugment (off in the README's config) or
  the +-10 degree rotation (METHODS.md 6).
- The head reads the decoder's features average-pooled to ``embedding_stride`` input pixels per cell
  (the reference: layer4 of DeepLabV2, stride 8; 4 suits small crops).
- Labeled crops follow ``data.photometric`` (the reference: no colour augmentation). Not reproduced:
  frozen BN, DeepLabV2, Adam with a 10x smaller backbone lr (suite-wide choices).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.datasets.base import IGNORE_INDEX
from src.losses.reco import downsample_nearest, pool_to_stride

BASE_TEMPERATURE = 0.1  # the reference scales its loss by temperature / 0.1
_LABEL_SLOTS = 256  # label values 0..255 (255 = ignore) get one group slot each per image


# ---------------------------------------------------------------------------------------- thresholds
def class_confidence_quantiles(
    confidences: Tensor,
    predictions: Tensor,
    keep_fractions: Tensor,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per class c, the confidence at rank ``floor(N_c * keep_fractions[c])`` among its N_c pixels, sorted descending.

    A pixel belongs to the class it is predicted as (``predictions``). The rank is clamped to
    ``N_c - 1`` (the reference indexes past the end when the fraction is 1, and then skips the
    class). One sort for all classes: pixels ordered by class, by descending confidence inside a
    class (CSR layout), so class c's ranked values start at ``offset_c = sum(N_<c)``.

    Args:
        confidences: (...) maximum probabilities.
        predictions: (...) long, the arg max, in ``[0, C)`` with ``C = len(keep_fractions)``.
        keep_fractions: (C,) the fraction of each class's pixels ranked above the returned value.
        valid: (...) bool, pixels that count (None: all).

    Returns:
        ``(values, counts)``: (C,) float64 quantiles (0 for classes without pixels) and (C,) pixel counts.
    """
    num_classes = keep_fractions.numel()
    confidences = confidences.reshape(-1).double()
    classes = predictions.reshape(-1).long()
    if valid is not None:
        classes = torch.where(valid.reshape(-1), classes, num_classes)  # slot C: not counted, sorted last
    order = torch.argsort(confidences, descending=True, stable=True)
    order = order[torch.argsort(classes[order], stable=True)]  # by class; descending confidence inside
    ranked = confidences[order]
    counts = torch.bincount(classes, minlength=num_classes + 1)[:num_classes]
    offsets = torch.cumsum(counts, 0) - counts
    rank = torch.floor(counts.double() * keep_fractions.double()).long()
    rank = torch.minimum(rank, counts - 1).clamp(min=0)
    if ranked.numel() == 0:
        return torch.zeros(num_classes, dtype=torch.float64, device=confidences.device), counts
    values = ranked[(offsets + rank).clamp(max=ranked.numel() - 1)]
    return torch.where(counts > 0, values, 0.0), counts


@torch.no_grad()
def update_class_thresholds(
    thresholds: Tensor,
    confidences: Tensor,
    predictions: Tensor,
    end_percent: float = 0.8,
    gamma: float = 0.0,
    momentum: float = 0.9,
    valid: Tensor | None = None,
) -> Tensor:
    """One step of the dynamic class-balanced thresholds (METHODS.md 6 step 4).

    For every class c predicted somewhere, ``value_c`` is the confidence at rank
    ``floor(N_c * end_percent * theta_c ** gamma)`` of its pixels sorted by descending confidence,
    and ``theta_c <- momentum * theta_c + (1 - momentum) * value_c``; a threshold that is exactly 0
    is set to ``value_c`` directly (the reference's first-update branch). Classes not predicted keep
    their threshold. With ``gamma = 0`` about the top ``end_percent`` of each class's pixels pass.

    Args:
        thresholds: (C,) current thresholds theta.
        confidences: (...) teacher confidences (max probability).
        predictions: (...) long teacher arg max in ``[0, C)``.
        end_percent: Fraction of each class's pixels (at ``theta = 1``) ranked above its new value.
        gamma: Exponent of theta in the rank: with ``gamma > 0`` a low threshold keeps fewer pixels.
        momentum: Weight of the old threshold in the running average.
        valid: (...) bool, pixels that count (None: all).

    Returns:
        (C,) new thresholds, dtype of ``thresholds``.
    """
    if not 0.0 <= end_percent <= 1.0:
        raise ValueError(f"end_percent must be in [0, 1], got {end_percent}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    old = thresholds.double()
    values, counts = class_confidence_quantiles(confidences, predictions, end_percent * old.pow(gamma), valid)
    new = torch.where(old == 0, values, momentum * old + (1.0 - momentum) * values)
    return torch.where(counts > 0, new, old).to(thresholds.dtype)


def class_balanced_mask(confidences: Tensor, predictions: Tensor, thresholds: Tensor) -> Tensor:
    """``confidence >= theta[prediction]`` per pixel: the kept pixels M of METHODS.md 6 step 4 (bool, same shape)."""
    return confidences >= thresholds.to(confidences.dtype)[predictions.long()]


# ---------------------------------------------------------------------------------------- consistency
def soft_consistency_loss(logits: Tensor, target_probs: Tensor, mask: Tensor, class_mean: bool = True) -> Tensor:
    """Soft cross-entropy to the teacher's probabilities on kept pixels (METHODS.md 6 step 5).

    ``sum_{b,p} M_bp sum_c -p_T,c log p_S,c / (sum M + 1e-9)``, further divided by the number of
    classes C when ``class_mean`` (the reference averages over B*C*H*W and rescales by B*H*W / sum M,
    which leaves that 1/C; its weight of 50 assumes it). No kept pixel gives 0, still attached.

    Args:
        logits: (B, C, H, W) student logits.
        target_probs: (B, C, H, W) teacher probabilities (no gradient is taken through them).
        mask: (B, H, W) bool, the kept pixels M.
        class_mean: Keep the reference's extra 1/C.
    """
    log_probs = F.log_softmax(logits.float(), dim=1)
    pixel_loss = -(target_probs.detach().float() * log_probs).sum(dim=1)  # (B, H, W)
    loss = (pixel_loss * mask).sum() / (mask.sum() + 1e-9)
    return loss / logits.shape[1] if class_mean else loss


# ---------------------------------------------------------------------------------------- contrastive
def sample_anchors(
    labels: Tensor,
    predictions: Tensor,
    num_views: int,
    ignore_index: int = IGNORE_INDEX,
    exclude_class_zero: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Anchor pixels of the pixel contrastive loss, per (image, class) (METHODS.md 6 step 6).

    An (image, class) pair qualifies when more than ``num_views`` (V) of the image's pixels carry
    that label (not ``ignore_index``; not 0 either with ``exclude_class_zero``, the reference's
    ``x > 0`` filter). From it V pixels are drawn without replacement: ``V // 2`` hard ones
    (label c, predicted otherwise) and the rest easy (predicted c); when one group is short the
    other tops up, i.e. ``hard = min(H, max(V // 2, V - E))``, ``easy = V - hard``. Batched: each
    pixel gets a uniform key; pixels are sorted by (pair, hard first, key) and the first
    ``hard`` / ``easy`` of each segment are kept.

    Args:
        labels: (N, h, w) integer labels in [0, 255] on the embedding grid (``ignore_index`` unknown).
        predictions: (N, h, w) the student's arg max on the same grid.
        num_views: V, anchors per (image, class).
        ignore_index: Label of unknown pixels.
        exclude_class_zero: Never take class 0 as an anchor class (the reference does so).
        generator: Source of the random keys (None: the global RNG of ``labels``' device).

    Returns:
        ``(pixels, classes)``: (A, V) raster indices into the N*h*w pixels, hard ones first in each
        row, rows ordered by image then class; (A,) the class of each row.
    """
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    device = labels.device
    num_images = labels.shape[0]
    flat_labels = labels.reshape(-1).long()
    if flat_labels.numel() and not (0 <= int(flat_labels.min()) and int(flat_labels.max()) < _LABEL_SLOTS):
        raise ValueError(f"labels must lie in [0, {_LABEL_SLOTS - 1}]")
    pixels_per_image = flat_labels.numel() // max(num_images, 1)
    image = torch.arange(num_images, device=device).repeat_interleave(pixels_per_image)
    pair = image * _LABEL_SLOTS + flat_labels  # (N*h*w,) one slot per (image, label value)
    easy = predictions.reshape(-1).long() == flat_labels
    segment = pair * 2 + easy.long()  # hard (0) before easy (1) inside a pair
    with torch.no_grad():
        num_pairs = num_images * _LABEL_SLOTS
        sizes = torch.bincount(segment, minlength=2 * num_pairs).view(num_pairs, 2)  # (pairs, [hard, easy])
        label_of_pair = torch.arange(num_pairs, device=device) % _LABEL_SLOTS
        qualifies = (sizes.sum(1) > num_views) & (label_of_pair != ignore_index)
        if exclude_class_zero:
            qualifies &= label_of_pair != 0
        hard_keep = torch.minimum(sizes[:, 0], torch.clamp(num_views - sizes[:, 1], min=num_views // 2))
        keep = torch.stack([hard_keep, num_views - hard_keep], 1) * qualifies[:, None]  # (pairs, 2)
        draw_device = generator.device if generator is not None else device
        order = torch.argsort(torch.rand(segment.numel(), generator=generator, device=draw_device).to(device))
        order = order[torch.argsort(segment[order], stable=True)]  # by segment, random inside
        counts = sizes.reshape(-1)
        rank = torch.arange(order.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[segment[order]]
        chosen = order[rank < keep.reshape(-1)[segment[order]]]  # ordered by pair, hard first
        classes = label_of_pair[qualifies]
    return chosen.view(-1, num_views), classes


def gather_pixels(x: Tensor, pixels: Tensor) -> Tensor:
    """Features of raster pixels: (N, D, h, w) and (...) indices into N*h*w -> (..., D), gradient kept."""
    num_images, dim, height, width = x.shape
    flat = pixels.reshape(-1)
    # (N, D, h*w) indexed by (image, position) pairs -> (M, D) without copying all of x
    picked = x.flatten(2)[flat // (height * width), :, flat % (height * width)]
    return picked.view(*pixels.shape, dim)


def pixel_contrastive_loss(
    anchors: Tensor,
    keys: Tensor,
    classes: Tensor,
    temperature: float = 0.15,
    base_temperature: float = BASE_TEMPERATURE,
) -> Tensor:
    """The supervised pixel contrastive loss of METHODS.md 6 step 6 on sampled anchors.

    Rows ``i`` of the flattened anchors ``a_i`` (student) are compared with every key ``k_j``
    (row j of ``keys`` is the same pixel as anchor j, e.g. the teacher's embedding of it), both
    L2-normalised: ``z_ij = a_i . k_j / T`` minus the row maximum (detached). Positives: same class,
    ``j != i``; negatives: another class.
    ``l_i = -mean_{j in pos(i)} [z_ij - log(exp(z_ij) + sum_{n in neg(i)} exp(z_in))]`` and the loss is
    ``(T / base_temperature) * mean_i l_i``. Rows without a positive (only when V = 1 and the class
    has a single row) are left out of the mean instead of giving NaN. Gradients reach ``keys`` too
    unless the caller detaches them (the reference detaches the teacher side of cross-set pairs but
    not the keys of its labeled-only self-contrast, where keys are the anchors).

    Args:
        anchors: (A, V, D) student embeddings of the anchors.
        keys: (A, V, D) embeddings of the same pixels on the key side.
        classes: (A,) the class of each row of anchors.
        temperature: T.
        base_temperature: The loss is scaled by ``T / base_temperature``.

    Returns:
        A 0-dim float32 tensor; 0 (attached to ``anchors``) when there is no anchor.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if anchors.numel() == 0:
        return anchors.sum().float() * 0.0
    num_views = anchors.shape[1]
    anchors = F.normalize(anchors.float().reshape(-1, anchors.shape[-1]), dim=1)  # (A*V, D)
    keys = F.normalize(keys.float().reshape(-1, keys.shape[-1]), dim=1)
    labels = classes.repeat_interleave(num_views)  # (A*V,) class of every flattened anchor
    logits = anchors @ keys.T / temperature  # (A*V, A*V)
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    exp_logits = logits.exp()
    negative_sum = (exp_logits * ~same).sum(dim=1, keepdim=True)
    log_prob = logits - torch.log(exp_logits + negative_sum)
    num_positive = positive.sum(dim=1)
    mean_log_prob = (log_prob * positive).sum(dim=1) / num_positive.clamp(min=1)
    # Mean over anchors with a positive (0, graph kept, when none), without a host sync.
    has_positive = num_positive > 0
    mean = (mean_log_prob * has_positive).sum() / has_positive.sum().clamp(min=1)
    return -(temperature / base_temperature) * mean


def cross_set_contrastive_loss(
    embeddings: Tensor,
    keys: Tensor,
    labels: Tensor,
    predictions: Tensor,
    num_views: int = 20,
    temperature: float = 0.15,
    ignore_index: int = IGNORE_INDEX,
    exclude_class_zero: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """C3's cross-set pixel contrastive loss of a labeled + unlabeled batch (METHODS.md 6 step 6).

    Anchors come from every image of the batch (`sample_anchors`), so a class's positives and
    negatives span the labeled and the unlabeled set; each anchor is compared with the key-side
    embeddings of all anchors (`pixel_contrastive_loss`).

    Args:
        embeddings: (N, D, h, w) student embeddings (labeled and unlabeled images).
        keys: (N, D, h, w) key-side embeddings on the same grid: in C3 the student's own, detached,
            for labeled images and the teacher's for unlabeled ones. Pass ``embeddings`` itself
            for the labeled-only self-contrast of the supervised phase.
        labels: (N, h, w) ground truth / confident pseudo-labels on the grid (``ignore_index`` elsewhere).
        predictions: (N, h, w) the student's arg max on the grid (decides hard vs easy anchors).
        num_views: V, anchors per (image, class).
        temperature: T.
        ignore_index: Label of pixels that never become anchors.
        exclude_class_zero: Never take class 0 as an anchor class (the reference's filter).
        generator: Source of the anchor draws.

    Returns:
        ``(loss, num_rows)``: the loss (0, attached to ``embeddings``, without anchors) and the
        number A of (image, class) rows that had anchors, for logging.
    """
    if embeddings.shape != keys.shape:
        raise ValueError(f"keys must have the shape of embeddings {tuple(embeddings.shape)}, got {tuple(keys.shape)}")
    pixels, classes = sample_anchors(labels, predictions, num_views, ignore_index, exclude_class_zero, generator)
    loss = pixel_contrastive_loss(
        gather_pixels(embeddings, pixels), gather_pixels(keys, pixels), classes, temperature
    )
    return loss, torch.tensor(float(len(classes)), device=embeddings.device)


def contrastive_from_logits(
    embeddings: Tensor,
    keys: Tensor,
    labels: Tensor,
    logits: Tensor,
    num_views: int = 20,
    temperature: float = 0.15,
    ignore_index: int = IGNORE_INDEX,
    exclude_class_zero: bool = False,
) -> tuple[Tensor, Tensor]:
    """`cross_set_contrastive_loss` from full-size labels (N, H, W) and student logits (N, C, H, W).

    Both are brought to the grid of ``embeddings`` (N, D, h, w): the labels by nearest sampling,
    the logits (detached) bilinearly, then their arg max gives the predictions. The other
    arguments and the returned ``(loss, num_rows)`` are `cross_set_contrastive_loss`'s.
    """
    size = embeddings.shape[-2:]
    logits_small = F.interpolate(logits.detach().float(), size=size, mode="bilinear", align_corners=False)
    return cross_set_contrastive_loss(
        embeddings, keys, downsample_nearest(labels, size), logits_small.argmax(dim=1), num_views, temperature,
        ignore_index, exclude_class_zero,
    )


# ---------------------------------------------------------------------------------------- options
def _require(ok: bool, option: str, expected: str, value: object) -> None:
    """Raise a ValueError naming ``model.<option>``, what it expects and what it got, unless ``ok``."""
    if not ok:
        raise ValueError(f"model.{option} must be {expected}, got {value}")


def _require_non_negative(group: str, **options: float) -> None:
    for name, value in options.items():
        _require(value >= 0, f"{group}.{name}", ">= 0", value)


@dataclass(frozen=True)
class C3Consistency:
    """The soft consistency loss (METHODS.md 6 step 5) and its weight (``model.init_args.consistency``).

    Args:
        weight: w_con after its ramp-up (0: supervised only).
        ramp_up_steps: Length of its sigmoid ramp-up, from the unlabeled phase's first step.
        class_mean: Divide the loss by the number of classes, as the reference (`soft_consistency_loss`).
    """

    weight: float = 50.0
    ramp_up_steps: int = 4000
    class_mean: bool = True

    def __post_init__(self) -> None:
        _require_non_negative("consistency", weight=self.weight, ramp_up_steps=self.ramp_up_steps)

    def loss(self, logits: Tensor, target_probs: Tensor, kept: Tensor) -> Tensor:
        """`soft_consistency_loss` with these options."""
        return soft_consistency_loss(logits, target_probs, kept, self.class_mean)


@dataclass(frozen=True)
class C3Thresholds:
    """The dynamic class-balanced thresholds that choose the kept pixels (METHODS.md 6 step 4;
    ``model.init_args.thresholds``). The values are the method's ``class_thresholds`` buffer.

    Args:
        dynamic_threshold: Keep only pixels above their class's dynamic threshold (else all pixels).
        end_percent: Fraction of each predicted class's pixels (by confidence) the threshold aims to keep.
        gamma: Exponent of the threshold in the rank (0: a plain per-class quantile).
        threshold_momentum: Weight of the old threshold in its running average.
        initial_threshold: Start value of every class's threshold (0: the first update sets it).
    """

    dynamic_threshold: bool = True
    end_percent: float = 0.8
    gamma: float = 0.0
    threshold_momentum: float = 0.9
    initial_threshold: float = 0.9

    def __post_init__(self) -> None:
        for name in ("end_percent", "threshold_momentum", "initial_threshold"):
            value = getattr(self, name)
            _require(0.0 <= value <= 1.0, f"thresholds.{name}", "in [0, 1]", value)
        _require_non_negative("thresholds", gamma=self.gamma)

    def initial(self, num_classes: int) -> Tensor:
        """(C,) thresholds before the first update."""
        return torch.full((num_classes,), float(self.initial_threshold))

    def keep(self, confidences: Tensor, predictions: Tensor, thresholds: Tensor) -> Tensor:
        """The kept pixels M (bool): `class_balanced_mask`, or every pixel without ``dynamic_threshold``."""
        if not self.dynamic_threshold:
            return torch.ones_like(confidences, dtype=torch.bool)
        return class_balanced_mask(confidences, predictions, thresholds)

    def update_(
        self, thresholds: Tensor, confidences: Tensor, predictions: Tensor, valid: Tensor | None = None
    ) -> None:
        """`update_class_thresholds` with these options, in place."""
        thresholds.copy_(update_class_thresholds(thresholds, confidences, predictions, self.end_percent,
                                                 self.gamma, self.threshold_momentum, valid))


@dataclass(frozen=True)
class C3Contrast:
    """The cross-set pixel contrastive loss (METHODS.md 6 step 6) and its weight (``model.init_args.contrast``).

    Args:
        weight: w_ctr after its ramp-up (0 turns the loss off).
        start_step: Its first step (labeled-only before the unlabeled phase).
        ramp_up_steps: Length of its sigmoid ramp-up.
        temperature: T.
        num_views: V (``hard_neg_num``), anchors per (image, class); a class needs more than V pixels of an image.
        exclude_class_zero: Never use class 0 as an anchor class (the reference's ``x > 0`` filter).
        embedding_stride: Input pixels per embedding cell: the head reads decoder features pooled to it.
    """

    weight: float = 0.1
    start_step: int = 0
    ramp_up_steps: int = 250
    temperature: float = 0.15
    num_views: int = 20
    exclude_class_zero: bool = False
    embedding_stride: int = 4

    def __post_init__(self) -> None:
        _require_non_negative("contrast", weight=self.weight, start_step=self.start_step,
                              ramp_up_steps=self.ramp_up_steps)
        _require(self.temperature > 0, "contrast.temperature", "> 0", self.temperature)
        _require(self.num_views >= 2, "contrast.num_views", ">= 2 (an anchor needs a positive)", self.num_views)
        _require(self.embedding_stride >= 1, "contrast.embedding_stride", ">= 1", self.embedding_stride)

    def embed(self, head: nn.Module, features: Tensor, input_width: int) -> Tensor:
        """``head``'s embeddings (N, D, h, w) of decoder features (N, F, H', W') pooled to ``embedding_stride``."""
        return head(pool_to_stride(features, self.embedding_stride, input_width))

    def loss(
        self, embeddings: Tensor, keys: Tensor, labels: Tensor, logits: Tensor, ignore_index: int
    ) -> tuple[Tensor, Tensor]:
        """`contrastive_from_logits` with these options: ``(loss, anchor rows)``."""
        return contrastive_from_logits(embeddings, keys, labels, logits, self.num_views, self.temperature,
                                       ignore_index, self.exclude_class_zero)


# A module built in Python keeps these objects in its hyperparameters (one the CLI builds keeps dicts); this lets
# its checkpoints load with weights_only=True, torch.load's default.
torch.serialization.add_safe_globals([C3Consistency, C3Thresholds, C3Contrast])
