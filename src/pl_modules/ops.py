"""Small pure tensor functions shared by several methods (METHODS.md sections 1.5, 3, 4, 6, 7 and 8).

Conventions: images are float (B, 3, H, W) in [0, 1] (the network normalises them),
pseudo-labels (B, H, W) long with 255 where invalid, confidences (B, H, W) float in [0, 1]
with 0 where invalid. Everything is batched (no per-sample Python loop) and returns tensors on
the inputs' device. Randomness comes from an optional ``torch.Generator``: numbers are drawn on
the generator's device (the CPU for the default generator) and then moved, so the same seed and
inputs give the same outputs, and a CPU generator gives the same draws whatever the inputs' device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.datasets.base import IGNORE_INDEX
from src.losses.reco import downsample_nearest
from src.networks.segmenter import IMAGENET_MEAN

MIX_MODES = ("none", "cutout", "cutmix", "classmix")
_TRIES_PER_ROUND = 32  # `cutmix_boxes` tries per sample and round
ALL_CHANNELS = 3  # channel index of a whole-pixel hole in `sample_holes`


def _uniform(shape: Sequence[int], generator: torch.Generator | None) -> Tensor:
    """U[0, 1) float64 numbers drawn on the generator's device (the CPU by default)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(tuple(shape), generator=generator, device=device, dtype=torch.float64)


def _uniform_int(low: Tensor | int, high: Tensor | int, u: Tensor) -> Tensor:
    """``UniformInt[low, high]`` (both ends inclusive) from uniforms ``u`` in [0, 1), as long."""
    low = torch.as_tensor(low, dtype=torch.float64, device=u.device)
    high = torch.as_tensor(high, dtype=torch.float64, device=u.device)
    value = low + torch.floor(u * (high - low + 1))
    return torch.minimum(value, high).long()  # guards u * n rounding up to n


# ---------------------------------------------------------------------------------------- EMA and ramps
def ema_decay(step: int, alpha: float) -> float:
    """ReCo's EMA decay ``min(1 - 1/(step + 1), alpha)``: 0 at step 0 (the teacher copies the student)."""
    return min(1.0 - 1.0 / (step + 1), alpha)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """In place, ``teacher = decay * teacher + (1 - decay) * student`` on floating-point parameters.

    Buffers are deliberately not averaged (METHODS.md 3 step 6): the teacher's BatchNorm running
    statistics, and ``num_batches_tracked``, come only from its own train-mode forward passes on
    unlabeled batches (a method that wants the student's copies them, `copy_buffers`). Teacher and
    student must have the same parameter names (a deep copy does).
    """
    teacher_named = [(n, p) for n, p in teacher.named_parameters() if p.dtype.is_floating_point]
    student_named = [(n, p) for n, p in student.named_parameters() if p.dtype.is_floating_point]
    if [n for n, _ in teacher_named] != [n for n, _ in student_named]:
        raise ValueError("ema_update: teacher and student have different parameter names")
    if teacher_named:
        torch._foreach_lerp_([p for _, p in teacher_named], [p for _, p in student_named], 1.0 - decay)


@torch.no_grad()
def copy_buffers(target: nn.Module, source: nn.Module) -> None:
    """In place, every buffer of ``target`` (BatchNorm statistics, counters) becomes ``source``'s (same architecture)."""
    for buffer_t, buffer_s in zip(target.buffers(), source.buffers()):
        buffer_t.copy_(buffer_s)


@torch.no_grad()
def ema_update_buffers(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """`ema_update` for buffers: floating-point ones (BatchNorm statistics) in one fused lerp, the
    others (``num_batches_tracked``) copied from ``student`` (same architecture)."""
    pairs = list(zip(teacher.buffers(), student.buffers()))
    floats = [(t, s) for t, s in pairs if t.is_floating_point()]
    if floats:
        torch._foreach_lerp_([t for t, _ in floats], [s for _, s in floats], 1.0 - decay)
    for buffer_t, buffer_s in pairs:
        if not buffer_t.is_floating_point():
            buffer_t.copy_(buffer_s)


def sigmoid_rampup(step: float, length: float) -> float:
    """``exp(-5 (1 - clip(step / length, 0, 1))^2)`` (Laine and Aila, 2017); 1 when ``length`` is 0."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(step / length, 0.0), 1.0)
    return math.exp(-5.0 * phase * phase)


def sigmoid_rampup_from(step: int, start: int, length: float) -> float:
    """`sigmoid_rampup` of the steps since ``start``, and 0 before it: a term that starts late and ramps up."""
    return sigmoid_rampup(step - start, length) if step >= start else 0.0


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, floor: float) -> float:
    """LR multiplier: linear from ``floor`` to 1 over ``warmup_steps``, then cosine down to ``floor`` at the end.

    Reconstruction pretraining's schedule (METHODS.md 7 "Optimisation"), as per-step multipliers.
    """
    if step < warmup_steps:
        return floor + (1.0 - floor) * step / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------- losses
def confident_fraction(confidences: Tensor, valid: Tensor, threshold: float) -> Tensor:
    """Fraction of ``valid`` pixels whose confidence reaches ``threshold`` (0 if none is valid), for logging."""
    confident = (confidences >= threshold) & valid
    return (confident.sum() / valid.sum().clamp(min=1)).float().detach()


def confidence_weighted_ce(
    logits: Tensor,
    pseudo_labels: Tensor,
    confidences: Tensor,
    threshold: float = 0.97,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor]:
    """ReCo's unsupervised loss (METHODS.md 3 step 5) and the confident fraction for logging.

    Per image ``eta_b = #(confidence >= threshold) / #(valid pixels)`` (no gradient; the numerator
    counts all pixels, as in the reference; invalid pixels carry confidence 0 so this equals
    counting valid ones). With ``l_bp`` the per-pixel cross-entropy (0 where ignored), the loss is
    ``sum(eta_b * l_bp over l_bp > 0) / #(l_bp > 0)``: every valid pixel counts, weighted by its
    image's eta; it is not a hard confidence mask. If no pixel has ``l_bp > 0`` the loss is 0
    (not NaN) and still attached to the graph.

    Args:
        logits: (B, C, H, W) student logits at label resolution.
        pseudo_labels: (B, H, W) long, ``ignore_index`` where invalid.
        confidences: (B, H, W) teacher confidences.
        threshold: delta_s, the confidence that counts a pixel as confident.
        ignore_index: Label of invalid pixels.

    Returns:
        ``(loss, fraction)``: the scalar loss and `confident_fraction` of the valid pixels.
    """
    valid = pseudo_labels != ignore_index
    with torch.no_grad():
        confident_per_image = (confidences >= threshold).flatten(1).sum(1)
        eta = confident_per_image / valid.flatten(1).sum(1).clamp(min=1)  # (B,); 0/0 -> 0, excluded anyway
    pixel_loss = F.cross_entropy(logits.float(), pseudo_labels.long(), ignore_index=ignore_index, reduction="none")
    counted = pixel_loss > 0  # (B, H, W)
    weighted = torch.where(counted, pixel_loss * eta.view(-1, 1, 1), torch.zeros_like(pixel_loss))
    loss = weighted.sum() / counted.sum().clamp(min=1)
    return loss, confident_fraction(confidences, valid, threshold)


def thresholded_ce(
    logits: Tensor, pseudo_labels: Tensor, confidences: Tensor, valid: Tensor, threshold: float,
    ignore_index: int = IGNORE_INDEX,
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
    pseudo_labels: Tensor, confidences: Tensor, given: Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Partial labels (METHODS.md 3): a given pixel's label replaces the pseudo-label, with confidence 1.

    Args:
        pseudo_labels: (B, H, W) long.
        confidences: (B, H, W) confidences, or (B, C, H, W) probabilities: a given pixel's become
            the one-hot vector of its label.
        given: (B, H, W) long, the given labels, ``ignore_index`` where none is given.
        ignore_index: Label of pixels without a given label.
    """
    known = given != ignore_index
    labels = torch.where(known, given, pseudo_labels)
    if confidences.dim() == labels.dim() + 1:
        one_hot = F.one_hot(labels, confidences.shape[1]).permute(0, 3, 1, 2).to(confidences.dtype)
        return labels, torch.where(known.unsqueeze(1), one_hot, confidences)
    return labels, torch.where(known, 1.0, confidences)


# ---------------------------------------------------------------------------------------- masks and mixing
def box_masks(
    batch_size: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """ReCo's half-area boxes (``ratio = 2``, METHODS.md 4): (B, H, W) bool, False inside the box.

    True marks the kept part (``m = 1`` outside the box). Per sample, with both ends of every
    ``UniformInt`` inclusive (numpy's ``randint(low, high)`` excludes ``high``, hence ``W - 1``):
    width ``w ~ UniformInt[floor(W/2 + 1), W - 1]``, height ``h = round(H*W / 2 / w)`` (half to even,
    like ``np.round``), top-left ``x0 ~ UniformInt[0, W - w]``, ``y0 ~ UniformInt[0, H - h]``; the box
    is rows ``[y0, y0 + h)`` and columns ``[x0, x0 + w)``, always inside the image.
    """
    u = _uniform((batch_size, 3), generator)
    low, high = width // 2 + 1, width - 1
    if high < low:  # W <= 2, where the reference's randint fails: the box spans the width
        low = high = width
    box_w = _uniform_int(low, high, u[:, 0])
    box_h = torch.round(height * width / 2 / box_w.double()).long().clamp(0, height)
    x0 = _uniform_int(0, width - box_w, u[:, 1])
    y0 = _uniform_int(0, height - box_h, u[:, 2])
    device = torch.device(device) if device is not None else torch.device("cpu")
    x0, y0, box_w, box_h = (t.to(device).view(-1, 1, 1) for t in (x0, y0, box_w, box_h))
    rows = torch.arange(height, device=device).view(1, -1, 1)
    cols = torch.arange(width, device=device).view(1, 1, -1)
    inside = (rows >= y0) & (rows < y0 + box_h) & (cols >= x0) & (cols < x0 + box_w)
    return ~inside


def classmix_masks(
    pseudo_labels: Tensor, generator: torch.Generator | None = None, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """ClassMix masks (METHODS.md 4): (B, H, W) bool, True on ``floor(K/2)`` of the K values of each image.

    The K values are those present in the image's pseudo-label, including ``ignore_index`` when it
    occurs (as in the reference); the chosen ones are a uniform subset without replacement. Batched:
    one random permutation of all possible values per image; walking it, the first ``floor(K/2)``
    present values are chosen. Class ids must lie in [0, 255] (``ignore_index`` gets its own slot).
    """
    batch = pseudo_labels.shape[0]
    device = pseudo_labels.device
    num_slots = 257  # classes 0..255, plus one slot for the ignore index
    slots = torch.where(pseudo_labels == ignore_index, num_slots - 1, pseudo_labels.long()).flatten(1)
    present = torch.zeros(batch, num_slots, dtype=torch.bool, device=device)
    present.scatter_(1, slots, True)
    order = _uniform((batch, num_slots), generator).argsort(dim=1).to(device)  # (B, 257) permutation
    present_in_order = present.gather(1, order)
    num_chosen = present.sum(1, keepdim=True) // 2
    chosen_in_order = present_in_order & (present_in_order.cumsum(1) <= num_chosen)
    chosen = torch.zeros_like(present).scatter_(1, order, chosen_in_order)  # back to value order
    return chosen.gather(1, slots).view_as(pseudo_labels)


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


def mix_by_mask(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``a`` where ``mask`` (B, H, W) is True, ``b`` elsewhere; (B, C, H, W) inputs share the mask over C."""
    if a.dim() == mask.dim() + 1:
        mask = mask.unsqueeze(1)
    return torch.where(mask, a, b)


def swap_halves(x: Tensor, keep: Tensor) -> Tensor:
    """Cross-set CutMix (METHODS.md 6 step 2): samples i and P + i (P = len(keep)) swap pixels where ``keep`` is False.

    An involution: the same call mixes the images and un-mixes the outputs of their forward
    (``keep`` resized to the outputs' grid). Samples from 2P on (an odd batch) are untouched.
    """
    pairs = keep.shape[0]
    first, second = x[:pairs], x[pairs : 2 * pairs]
    return torch.cat([mix_by_mask(keep, first, second), mix_by_mask(keep, second, first), x[2 * pairs :]])


def cross_set_cutmix_forward(
    forward: Callable[[Tensor], tuple[Tensor, Tensor | None]],
    images: Tensor,
    cutmix: bool = True,
    mixing: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> tuple[Tensor, Tensor | None]:
    """Outputs of ``forward`` on a randomly paired, cross-set CutMixed batch, un-mixed (METHODS.md 6 step 2).

    The batch is permuted (``torch.randperm``), then samples i and P + i swap a half-area box
    (`box_masks`, `swap_halves`); the outputs are un-mixed and un-permuted, so row i belongs to
    ``images[i]``. NOTE: the reference draws its half-area boxes with a log-uniform aspect (same
    area, another aspect distribution).

    Args:
        forward: Maps images (N, 3, H, W) to logits (N, C, H, W) and embeddings (N, D, h, w) or None;
            pointwise on the embeddings' grid (a head of 1x1 convolutions), so un-mixing after it
            equals un-mixing its input.
        images: (N, 3, H, W).
        cutmix: Swap the boxes (else the batch is only permuted).
        mixing: Makes the context that encloses the mixing and the un-mixing (a timing phase).
    """
    perm = torch.randperm(len(images)).to(images.device)
    mixed = images[perm]
    keep = None
    if cutmix and len(images) >= 2:
        with mixing():
            keep = box_masks(len(images) // 2, *images.shape[-2:], device=images.device)
            mixed = swap_halves(mixed, keep)
    logits, embeddings = forward(mixed)
    if keep is not None:
        with mixing():
            logits = swap_halves(logits, keep)
            if embeddings is not None:
                embeddings = swap_halves(embeddings, downsample_nearest(keep, embeddings.shape[-2:]))
    inverse = perm.argsort()
    return logits[inverse], embeddings[inverse] if embeddings is not None else None


def mix_unlabeled(
    mode: str,
    images: Tensor,
    pseudo_labels: Tensor,
    confidences: Tensor,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Mix the unlabeled batch as ReCo's ``generate_unsup_data`` (METHODS.md 4).

    Per-sample masks; the partner of sample i is sample (i + 1) mod B. ``cutout``: a half-area box
    becomes the ImageNet mean colour (0 after normalisation), label 255, confidence 0. ``cutmix``:
    the box content of image, label and confidence comes from the partner. ``classmix``: the pixels
    of half the values in pseudo-label i (see `classmix_masks`) are pasted over the partner.
    ``none`` returns the inputs.
    """
    if mode not in MIX_MODES:
        raise ValueError(f"mix mode {mode!r} is unknown; expected one of {MIX_MODES}")
    if mode == "none":
        return images, pseudo_labels, confidences
    batch, _, height, width = images.shape
    if mode == "cutout":
        keep = box_masks(batch, height, width, generator, images.device)
        fill = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        return (
            mix_by_mask(keep, images, fill.expand_as(images)),
            mix_by_mask(keep, pseudo_labels, torch.full_like(pseudo_labels, IGNORE_INDEX)),
            mix_by_mask(keep, confidences, torch.zeros_like(confidences)),
        )
    if mode == "cutmix":
        keep = box_masks(batch, height, width, generator, images.device)
    else:
        keep = classmix_masks(pseudo_labels, generator)
    return tuple(mix_by_mask(keep, x, torch.roll(x, -1, dims=0)) for x in (images, pseudo_labels, confidences))


# ---------------------------------------------------------------------------------------- geometric
def random_rescale_crop(
    images: Tensor,
    pseudo_labels: Tensor,
    confidences: Tensor,
    scale_range: tuple[float, float],
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Rescale each sample by ``s ~ U(scale_range)`` and crop back to H x W (METHODS.md 1.5 and 4).

    As the reference: the rescaled size is ``(int(H*s), int(W*s))``; where it is smaller than the crop
    it is padded at the right/bottom (image reflected, label 255, confidence 0), then a crop of H x W
    is taken at an offset ``UniformInt[0, max(size - crop, 0)]`` per axis. One ``affine_grid`` for the
    batch: images bilinear, labels and confidences nearest; the padding is found from the grid
    (source coordinates outside [-1, 1]). NOTE: no antialiasing when shrinking (PIL resize has it),
    and reflection mirrors about the image edge (the edge pixel repeats).
    """
    low, high = float(scale_range[0]), float(scale_range[1])
    if not 0 < low <= high:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
    batch, _, height, width = images.shape
    u = _uniform((batch, 3), generator)  # drawn even at scale 1 so the stream does not depend on it
    if low == high == 1.0:
        return images, pseudo_labels, confidences
    scale = low + (high - low) * u[:, 0]
    new_h = torch.floor(height * scale).clamp(min=1)
    new_w = torch.floor(width * scale).clamp(min=1)
    y0 = _uniform_int(0, (new_h - height).clamp(min=0), u[:, 1]).double()
    x0 = _uniform_int(0, (new_w - width).clamp(min=0), u[:, 2]).double()
    # Output pixel y reads rescaled pixel y + y0; in align_corners=False normalised coordinates that
    # is src = out * H / new_h + (H / new_h - 1 + 2 * y0 / new_h), and likewise for x.
    theta = torch.zeros(batch, 2, 3, dtype=torch.float64, device=u.device)
    theta[:, 0, 0] = width / new_w
    theta[:, 0, 2] = width / new_w - 1 + 2 * x0 / new_w
    theta[:, 1, 1] = height / new_h
    theta[:, 1, 2] = height / new_h - 1 + 2 * y0 / new_h
    dtype = images.dtype if images.dtype.is_floating_point else torch.float32
    grid = F.affine_grid(theta.to(images.device, dtype), [batch, 1, height, width], align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    inside = (grid.abs() <= 1).all(dim=-1)  # (B, H, W): False on the padding
    targets = torch.stack([pseudo_labels.to(grid.dtype), confidences.to(grid.dtype)], dim=1)  # (B, 2, H, W)
    targets = F.grid_sample(targets, grid, mode="nearest", padding_mode="border", align_corners=False)
    labels = torch.where(inside, targets[:, 0].round().to(pseudo_labels.dtype), IGNORE_INDEX)
    confs = torch.where(inside, targets[:, 1].to(confidences.dtype), 0.0)
    return images, labels, confs


def random_hflip(
    images: Tensor,
    pseudo_labels: Tensor,
    confidences: Tensor,
    generator: torch.Generator | None = None,
    p: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Flip each sample horizontally with probability ``p``, image, label and confidence together."""
    flip = (_uniform((images.shape[0],), generator) < p).to(images.device)
    return (
        torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images),
        torch.where(flip.view(-1, 1, 1), pseudo_labels.flip(-1), pseudo_labels),
        torch.where(flip.view(-1, 1, 1), confidences.flip(-1), confidences),
    )


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


# ---------------------------------------------------------------------------------------- photometric
def rgb_to_hsv(rgb: Tensor) -> Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of the circle, 0 for greys)."""
    red, green, blue = rgb.unbind(1)
    value, _ = rgb.max(1)
    delta = value - rgb.min(1).values
    safe_delta = torch.where(delta > 0, delta, 1.0)
    hue = torch.where(
        value == red,
        ((green - blue) / safe_delta) % 6,
        torch.where(value == green, (blue - red) / safe_delta + 2, (red - green) / safe_delta + 4),
    )
    hue = torch.where(delta > 0, hue / 6, 0.0)
    saturation = torch.where(value > 0, delta / torch.where(value > 0, value, 1.0), 0.0)
    return torch.stack([hue, saturation, value], 1)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """Inverse of `rgb_to_hsv`: channel n in (R, G, B) = v - v*s*clip(min(k, 4 - k), 0, 1), k = (n' + 6h) mod 6."""
    hue, saturation, value = hsv.unbind(1)
    k = torch.stack([(5 + 6 * hue) % 6, (3 + 6 * hue) % 6, (1 + 6 * hue) % 6], 1)  # (B, 3, H, W)
    return value.unsqueeze(1) - (value * saturation).unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


def _grey(images: Tensor) -> Tensor:
    """ITU-R 601 luma, (B, 3, H, W) -> (B, 1, H, W)."""
    return (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).unsqueeze(1)


def _brightness(images: Tensor, factor: Tensor) -> Tensor:
    return (images * factor).clamp(0, 1)


def _contrast(images: Tensor, factor: Tensor) -> Tensor:
    mean = _grey(images).mean(dim=(1, 2, 3), keepdim=True)
    return ((images - mean) * factor + mean).clamp(0, 1)


def _saturation(images: Tensor, factor: Tensor) -> Tensor:
    grey = _grey(images)
    return ((images - grey) * factor + grey).clamp(0, 1)


def _hue(images: Tensor, shift: Tensor) -> Tensor:
    hsv = rgb_to_hsv(images)
    hue = (hsv[:, :1] + shift) % 1.0
    return hsv_to_rgb(torch.cat([hue, hsv[:, 1:]], 1)).clamp(0, 1)


def colour_jitter(
    images: Tensor,
    generator: torch.Generator | None = None,
    p: float = 0.8,
    brightness: float = 0.25,
    contrast: float = 0.25,
    saturation: float = 0.25,
    hue: float = 0.25,
) -> Tensor:
    """Per-sample colour jitter applied with probability ``p`` (METHODS.md 1.5 step 4).

    Brightness, contrast and saturation factors ~ U(1 - x, 1 + x), hue shift ~ U(-hue, hue) of the
    hue circle, all per sample, and, like torchvision's ``ColorJitter``, the four operations run in
    a random order drawn per sample. Batched per (position, operation): at each of the four
    positions every operation runs once, on the samples that take it there, so each sample goes
    through its four operations exactly once. The groups are found where the random numbers are
    drawn (the CPU by default: no device sync). Output in [0, 1].
    """
    batch = images.shape[0]
    device = images.device
    u = _uniform((batch, 9), generator)
    apply = (u[:, 0] < p).to(device).view(-1, 1, 1, 1)
    factors = (
        1 + brightness * (2 * u[:, 1] - 1),
        1 + contrast * (2 * u[:, 2] - 1),
        1 + saturation * (2 * u[:, 3] - 1),
        hue * (2 * u[:, 4] - 1),
    )
    factors = [f.to(device, images.dtype).view(-1, 1, 1, 1) for f in factors]
    operations = (_brightness, _contrast, _saturation, _hue)
    order = u[:, 5:].argsort(dim=1)  # (B, 4): operation index at each position
    out = images
    for position in range(4):
        step = torch.empty_like(out)  # every sample takes exactly one operation at each position
        for index, (op, factor) in enumerate(zip(operations, factors)):
            rows = (order[:, position] == index).nonzero().squeeze(1).to(device)
            step.index_copy_(0, rows, op(out.index_select(0, rows), factor.index_select(0, rows)))
        out = step
    return torch.where(apply, out, images)


def gaussian_blur(
    images: Tensor,
    generator: torch.Generator | None = None,
    p: float = 0.5,
    sigma_range: tuple[float, float] = (0.15, 1.15),
) -> Tensor:
    """Per-sample Gaussian blur with probability ``p`` and ``sigma ~ U(sigma_range)`` (METHODS.md 1.5 step 5).

    Separable, one grouped convolution per axis with a kernel per (sample, channel); kernel radius
    ``ceil(3 * max sigma)``, replicate padding at the borders.
    """
    batch, channels, height, width = images.shape
    device = images.device
    u = _uniform((batch, 2), generator)
    apply = (u[:, 0] < p).to(device).view(-1, 1, 1, 1)
    sigma = (sigma_range[0] + (sigma_range[1] - sigma_range[0]) * u[:, 1]).to(device, images.dtype)
    radius = max(1, math.ceil(3 * sigma_range[1]))
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets.view(1, -1) / sigma.view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0)  # (B*C, 2r+1)
    x = images.reshape(1, batch * channels, height, width)
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(-1, 1, 1, 2 * radius + 1), groups=batch * channels)  # along W
    x = F.conv2d(x, kernel.view(-1, 1, 2 * radius + 1, 1), groups=batch * channels)  # along H
    return torch.where(apply, x.view_as(images).clamp(0, 1), images)


def photometric(
    images: Tensor,
    generator: torch.Generator | None = None,
    jitter_p: float = 0.8,
    blur_p: float = 0.5,
    brightness: float = 0.25,
    contrast: float = 0.25,
    saturation: float = 0.25,
    hue: float = 0.25,
    sigma_range: tuple[float, float] = (0.15, 1.15),
) -> Tensor:
    """`colour_jitter` then `gaussian_blur` (METHODS.md 1.5 steps 4-5); identity when both p are 0."""
    images = colour_jitter(images, generator, jitter_p, brightness, contrast, saturation, hue)
    return gaussian_blur(images, generator, blur_p, sigma_range)


def strong_augment(
    images: Tensor, pseudo_labels: Tensor, confidences: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The step after mixing (METHODS.md 4 "Afterwards"): `photometric` on images, then a joint `random_hflip`."""
    return random_hflip(photometric(images, generator), pseudo_labels, confidences, generator)


def random_grayscale(images: Tensor, generator: torch.Generator | None = None, p: float = 0.2) -> Tensor:
    """Per sample, with probability ``p``, the luma in all three channels (torchvision ``RandomGrayscale``)."""
    apply = (_uniform((images.shape[0],), generator) < p).to(images.device).view(-1, 1, 1, 1)
    return torch.where(apply, _grey(images).expand_as(images), images)


def strong_photometric(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """UniMatch's strong view: colour jitter (0.5, 0.5, 0.5, 0.25) p 0.8, grayscale p 0.2, blur p 0.5 sigma 0.1-2."""
    images = colour_jitter(images, generator, 0.8, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.25)
    images = random_grayscale(images, generator, 0.2)
    return gaussian_blur(images, generator, 0.5, sigma_range=(0.1, 2.0))


# ---------------------------------------------------------------------------------------- corruption
def sample_holes(
    num_images: int,
    height: int,
    width: int,
    hole_size: tuple[int, int] = (2, 16),
    area_fraction: float = 0.5,
    channel_hole_probability: float = 0.5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random holes of a batch: one row ``(image, channel, top, left, hole_height, hole_width)`` each.

    Each image draws its mode: per-channel holes with ``channel_hole_probability`` (``channel``
    in 0..2), else whole-pixel holes (``channel == 3``). Hole sides are UniformInt[low, high],
    positions uniform with the hole inside the image. Holes are added until their summed area
    (overlaps counted again) reaches ``area_fraction`` of H*W, or of 3*H*W for per-channel holes:
    the last hole is the first one whose area reaches it. Numbers are drawn on the generator's
    device (the CPU by default).
    """
    low, high = hole_size
    if not 1 <= low <= high <= min(height, width):
        raise ValueError(f"hole_size={hole_size} must satisfy 1 <= low <= high <= image side {min(height, width)}")
    device = generator.device if generator is not None else torch.device("cpu")
    per_channel = torch.rand(num_images, generator=generator, device=device) < channel_hole_probability
    target = area_fraction * height * width * (1.0 + 2.0 * per_channel.double())  # (B,)
    # Enough holes for every image on average (mean area ((low + high) / 2)^2); doubled until enough.
    count = int(float(target.max()) / ((low + high) / 2) ** 2 * 1.25) + 8
    while True:
        sides = torch.randint(low, high + 1, (num_images, count, 2), generator=generator, device=device)
        area = sides.prod(-1).double()  # (B, N)
        if bool((area.sum(1) >= target).all()):
            break
        count *= 2
    keep = area.cumsum(1) - area < target[:, None]  # the summed area before this hole is short of the target
    u = torch.rand(num_images, count, 2, generator=generator, device=device, dtype=torch.float64)
    room = torch.tensor([height, width], device=device) - sides + 1  # positions per axis
    corner = torch.minimum((u * room).floor().long(), room - 1)  # (B, N, 2) top, left
    channel = torch.randint(0, 3, (num_images, count), generator=generator, device=device)
    channel = torch.where(per_channel[:, None], channel, ALL_CHANNELS)
    image = torch.arange(num_images, device=device)[:, None].expand(-1, count)
    holes = torch.stack([image, channel, corner[..., 0], corner[..., 1], sides[..., 0], sides[..., 1]], dim=-1)
    return holes[keep]  # (B, N, 6) -> (holes, 6)


def paint_holes(holes: Tensor, num_images: int, height: int, width: int, device: torch.device | None = None) -> Tensor:
    """Hole masks (B, 3, H, W) bool of `sample_holes` rows: whole-pixel holes cover all 3 channels.

    Corners are accumulated into a difference image and summed up (2-D prefix sum), so every hole
    of the batch is painted at once.
    """
    diff = torch.zeros(num_images, 4, height + 1, width + 1, device=device)
    image, channel, top, left, hole_h, hole_w = holes.to(device).unbind(1)
    ones = torch.ones(len(holes), device=device)
    for rows, cols, sign in ((top, left, 1), (top, left + hole_w, -1), (top + hole_h, left, -1),
                             (top + hole_h, left + hole_w, 1)):
        diff.index_put_((image, channel, rows, cols), ones * sign, accumulate=True)
    covered = diff.cumsum(2).cumsum(3)[..., :height, :width] > 0.5  # (B, 4, H, W): 3 channels + all
    return covered[:, :3] | covered[:, 3:]


def coarse_cutout(
    images: Tensor,
    fill: Tensor,
    hole_size: tuple[int, int] = (2, 16),
    area_fraction: float = 0.5,
    channel_hole_probability: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Reconstruction pretraining's corruption (METHODS.md 7 "Corruption"): corrupted copies of
    ``images`` (B, 3, H, W) and their hole masks (B, 3, H, W) bool.

    Per image, with equal probability (``channel_hole_probability``), whole-pixel holes filled with
    the mean colour, or per-channel holes that blank one random channel with that channel's mean;
    hole sides ~ UniformInt[2, 16] by default, holes added until their summed area (overlaps
    counted again) reaches 50 % of H*W (whole-pixel) or of 3*H*W (per-channel), `sample_holes`.
    A masked channel value becomes that channel's ``fill`` value (3,), the dataset mean.
    """
    batch, _, height, width = images.shape
    holes = sample_holes(batch, height, width, hole_size, area_fraction, channel_hole_probability, generator)
    mask = paint_holes(holes, batch, height, width, images.device)
    return torch.where(mask, fill.to(images).view(1, 3, 1, 1), images), mask
