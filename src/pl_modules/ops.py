"""Small pure tensor functions shared by several methods (METHODS.md sections 1.5, 3 and 4).

Conventions: images are float (B, 3, H, W) in [0, 1] (the network normalises them),
pseudo-labels (B, H, W) long with 255 where invalid, confidences (B, H, W) float in [0, 1]
with 0 where invalid. Everything is batched (no per-sample Python loop) and returns tensors on
the inputs' device. Randomness comes from an optional ``torch.Generator``: numbers are drawn on
the generator's device (the CPU for the default generator) and then moved, so the same seed and
inputs give the same outputs, and a CPU generator gives the same draws whatever the inputs' device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
MIX_MODES = ("none", "cutout", "cutmix", "classmix")


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
    unlabeled batches. Teacher and student must have the same parameter names (a deep copy does).
    """
    teacher_named = [(n, p) for n, p in teacher.named_parameters() if p.dtype.is_floating_point]
    student_named = [(n, p) for n, p in student.named_parameters() if p.dtype.is_floating_point]
    if [n for n, _ in teacher_named] != [n for n, _ in student_named]:
        raise ValueError("ema_update: teacher and student have different parameter names")
    if teacher_named:
        torch._foreach_lerp_([p for _, p in teacher_named], [p for _, p in student_named], 1.0 - decay)


def sigmoid_rampup(step: float, length: float) -> float:
    """``exp(-5 (1 - clip(step / length, 0, 1))^2)`` (Laine and Aila, 2017); 1 when ``length`` is 0."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(step / length, 0.0), 1.0)
    return math.exp(-5.0 * phase * phase)


def pool_to_stride(features: Tensor, stride: int, input_width: int) -> Tensor:
    """Decoder features (N, F, h, w) average-pooled to ``stride`` input pixels per cell.

    A decoder finer than ``stride`` (U-Net: stride 1) is pooled by the nearest integer factor; a
    coarser or equal one is returned as it is.
    """
    pool = max(1, round(stride * features.shape[-1] / input_width))
    return F.avg_pool2d(features, pool, ceil_mode=True) if pool > 1 else features


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


def mix_by_mask(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``a`` where ``mask`` (B, H, W) is True, ``b`` elsewhere; (B, C, H, W) inputs share the mask over C."""
    if a.dim() == mask.dim() + 1:
        mask = mask.unsqueeze(1)
    return torch.where(mask, a, b)


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
