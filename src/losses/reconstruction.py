"""Reconstruction pretraining's loss (METHODS.md section 7 "Loss"): ``L1 + w * (1 - MS-SSIM)``.

Multi-scale SSIM (Wang et al., 2003) as pytorch_msssim computes it, in fp32, batched.
"""

from __future__ import annotations

import functools

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Per-scale exponents of MS-SSIM (Wang et al., 2003), finest scale first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def gaussian_window(size: int, sigma: float = 1.5) -> Tensor:
    """Normalised 1-D Gaussian (size,) centred on the middle tap (pytorch_msssim's `_fspecial_gauss_1d`)."""
    coords = torch.arange(size, dtype=torch.float32) - size // 2
    window = torch.exp(-(coords**2) / (2 * sigma**2))
    return window / window.sum()


@functools.cache
def _constants(window_size: int, scales: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """The Gaussian window and the normalised scale weights on ``device``, made once per device.

    A copy from host memory to a GPU waits for the device, so it is not repeated at every step.
    They are made outside inference mode even when a validation asks first: a training step's
    backward keeps the weights, which an inference tensor may not be.
    """
    with torch.inference_mode(False):
        weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=dtype, device=device)
        return gaussian_window(window_size).to(dtype=dtype, device=device), weights / weights.sum()


def _band(size: int, window: Tensor) -> Tensor:
    """(size - k + 1, size) matrix whose row i holds ``window`` at columns i..i+k-1: a valid 1-D correlation."""
    rows, taps = size - window.numel() + 1, window.numel()
    columns = torch.arange(rows, device=window.device)[:, None] + torch.arange(taps, device=window.device)
    return window.new_zeros(rows, size).scatter_(1, columns, window.expand(rows, taps))


def fitting_scales(height: int, width: int, window_size: int = 11, max_scales: int = 5) -> int:
    """Most MS-SSIM scales (at most ``max_scales``) an image of this size allows.

    pytorch_msssim's rule: the smaller side must exceed ``(window_size - 1) * 2**(scales - 1)``.
    """
    scales = 0
    while scales < max_scales and min(height, width) > (window_size - 1) * 2**scales:
        scales += 1
    return scales


def ms_ssim(x: Tensor, y: Tensor, scales: int = 5, window_size: int = 11, data_range: float = 1.0) -> Tensor:
    """Mean multi-scale SSIM of two batches (B, C, H, W), as pytorch_msssim's ``ms_ssim``.

    Gaussian window (sigma 1.5) without padding, K = (0.01, 0.03), 2x2 average pooling between
    scales; the contrast-structure terms of the first ``scales - 1`` scales and the SSIM of the
    last are raised to the MS-SSIM weights and multiplied. With fewer than 5 scales the first
    weights are used, renormalised to sum 1 (then 1 scale is plain SSIM). Computed in fp32 even
    under autocast: the variances are differences of blurred squares, which bf16 would cancel.
    """
    if not 1 <= scales <= len(MS_SSIM_WEIGHTS):
        raise ValueError(f"scales must be in [1, {len(MS_SSIM_WEIGHTS)}], got {scales}")
    if fitting_scales(*x.shape[-2:], window_size, scales) < scales:
        raise ValueError(
            f"images of {tuple(x.shape[-2:])} are too small for {scales} MS-SSIM scales with a {window_size}-tap "
            f"window (the smaller side must exceed {(window_size - 1) * 2 ** (scales - 1)})"
        )
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)  # fp32 or fp64
    x, y = x.to(dtype), y.to(dtype)
    window, weights = _constants(window_size, scales, x.dtype, x.device)
    channels = x.shape[1]

    def blur(*ts: Tensor) -> tuple[Tensor, ...]:
        # The valid (unpadded) separable Gaussian blur as two banded matmuls, all five maps of a
        # scale at once: on CPU several times faster than depthwise convolutions of these sizes.
        stacked = torch.cat(ts, dim=1)
        with torch.autocast(stacked.device.type, enabled=False):
            blurred = _band(stacked.shape[-2], window) @ stacked @ _band(stacked.shape[-1], window).T
        return blurred.split(channels, dim=1)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    terms = []
    for scale in range(scales):
        mu_x, mu_y, xx, yy, xy = blur(x, y, x * x, y * y, x * y)
        var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
        cs_map = (2 * cov + c2) / (var_x + var_y + c2)
        if scale < scales - 1:
            terms.append(cs_map.flatten(2).mean(-1))  # (B, C)
            padding = (x.shape[2] % 2, x.shape[3] % 2)
            x, y = F.avg_pool2d(x, 2, padding=padding), F.avg_pool2d(y, 2, padding=padding)
        else:
            luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
            terms.append((luminance * cs_map).flatten(2).mean(-1))
    # NOTE: pytorch_msssim clamps with relu; a floor of 1e-6 keeps the gradient of t**w finite at 0.
    stacked = torch.stack(terms).clamp(min=1e-6)  # (scales, B, C)
    return (stacked ** weights.view(-1, 1, 1)).prod(0).mean()


def reconstruction_loss(
    prediction: Tensor, target: Tensor, ssim_weight: float = 1.0, scales: int = 5, window_size: int = 11
) -> tuple[Tensor, Tensor, Tensor]:
    """``L1 + ssim_weight * (1 - MS-SSIM)`` over every pixel, with its two terms.

    Args:
        prediction: (B, C, H, W) network output (computed in fp32).
        target: (B, C, H, W), on the scale of ``prediction``. MS-SSIM takes a data range of 1, whatever
            the scale: the reference's quirk on normalised tensors.
        ssim_weight: Weight of ``1 - MS-SSIM``; 0 skips MS-SSIM (then reported as 0).
        scales: MS-SSIM scales (see `fitting_scales`).
        window_size: Side of MS-SSIM's Gaussian window.

    Returns:
        ``(loss, l1, ms_ssim)``.
    """
    prediction = prediction.float()
    l1 = F.l1_loss(prediction, target)
    if ssim_weight == 0:
        return l1, l1, prediction.new_zeros(())
    similarity = ms_ssim(prediction, target, scales, window_size)
    return l1 + ssim_weight * (1.0 - similarity), l1, similarity


class ReconstructionLoss(nn.Module):
    """`reconstruction_loss` of a network's output against clean [0, 1] images, normalised by the dataset.

    The target is ``(images - image_mean) / image_std``. Images too small for ``ssim_scales`` get as
    many scales as fit (`fitting_scales`), with one warning per image size.

    Args:
        image_mean: Dataset mean colour in [0, 1] (3 values).
        image_std: Dataset std (3 values).
        ssim_weight: Weight of ``1 - MS-SSIM`` beside the L1 term (0 = L1 only).
        ssim_scales: Most MS-SSIM scales.
        ssim_window: Side of MS-SSIM's Gaussian window.
    """

    def __init__(
        self,
        image_mean: tuple[float, float, float],
        image_std: tuple[float, float, float],
        ssim_weight: float = 1.0,
        ssim_scales: int = 5,
        ssim_window: int = 11,
    ) -> None:
        super().__init__()
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        self.ssim_weight, self.ssim_scales, self.ssim_window = ssim_weight, ssim_scales, ssim_window
        self._warned_sizes: set[tuple[int, int]] = set()

    def forward(self, prediction: Tensor, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, l1, ms_ssim)`` of ``prediction`` (B, 3, H, W) against the normalised ``images``."""
        target = (images - self.image_mean) / self.image_std
        scales = self.scales(*images.shape[-2:]) if self.ssim_weight else 0
        return reconstruction_loss(prediction, target, self.ssim_weight, scales, self.ssim_window)

    def restore(self, prediction: Tensor) -> Tensor:
        """The network's output back as a [0, 1] image."""
        return (prediction * self.image_std + self.image_mean).clamp(0.0, 1.0)

    def scales(self, height: int, width: int) -> int:
        """MS-SSIM scales for images of this size: ``ssim_scales``, or as many as fit (warned once per size)."""
        scales = fitting_scales(height, width, self.ssim_window, self.ssim_scales)
        if scales < self.ssim_scales and (height, width) not in self._warned_sizes:
            self._warned_sizes.add((height, width))
            warnings.warn(
                f"model.ssim_scales={self.ssim_scales}: {height}x{width} images allow {scales} MS-SSIM scale(s) "
                f"with a {self.ssim_window}-tap window; using {scales}",
                stacklevel=3,
            )
        if scales == 0:
            raise ValueError(f"{height}x{width} images are smaller than model.ssim_window={self.ssim_window}")
        return scales
