import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure as ssim_torchmetrics

from src.losses.reconstruction import MS_SSIM_WEIGHTS, _constants, fitting_scales, gaussian_window, ms_ssim, reconstruction_loss


def reference_ms_ssim(x: torch.Tensor, y: torch.Tensor, scales: int) -> torch.Tensor:
    """pytorch_msssim's MS-SSIM, one image and channel at a time, from torchmetrics' SSIM maps."""
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=x.dtype)
    weights = weights / weights.sum()
    product = torch.ones(x.shape[:2], dtype=x.dtype)
    for scale in range(scales):
        for b in range(x.shape[0]):
            for c in range(x.shape[1]):
                pair = x[b : b + 1, c : c + 1], y[b : b + 1, c : c + 1]
                if scale < scales - 1:  # contrast-structure, averaged over the valid (unpadded) window positions
                    _, term = ssim_torchmetrics(*pair, data_range=1.0, return_contrast_sensitivity=True)
                else:
                    _, full = ssim_torchmetrics(*pair, data_range=1.0, return_full_image=True)
                    term = full[..., 5:-5, 5:-5].mean()
                product[b, c] *= term.squeeze().clamp(min=1e-6) ** weights[scale]
        padding = (x.shape[2] % 2, x.shape[3] % 2)
        x, y = F.avg_pool2d(x, 2, padding=padding), F.avg_pool2d(y, 2, padding=padding)
    return product.mean()


def test_ms_ssim_matches_a_reference_and_is_one_for_equal_images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 171, 165, generator=g, dtype=torch.float64) * 2 - 0.5  # normalised-like range
    y = x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    for scales in (1, 3, 5):
        assert ms_ssim(x, y, scales).item() == pytest.approx(reference_ms_ssim(x, y, scales).item(), abs=1e-5)
    assert ms_ssim(x, x, 5).item() == pytest.approx(1.0, abs=1e-9)
    assert ms_ssim(x, x + 0.5 * (y - x), 5) > ms_ssim(x, y, 5) > ms_ssim(x, 2 * y - x, 5)  # more noise, lower
    assert [fitting_scales(s, 200) for s in (10, 11, 21, 41, 64, 160, 161)] == [0, 1, 2, 3, 3, 4, 5]
    with pytest.raises(ValueError, match="too small"):
        ms_ssim(x[..., :64, :64], y[..., :64, :64], 4)


def test_ms_ssim_stays_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 48, 48, generator=g)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).requires_grad_()
    exact = ms_ssim(x, y, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = ms_ssim(x, y, 2)
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(exact.item(), abs=1e-6)


def test_ms_ssim_constants_are_made_once_and_serve_a_backward_after_a_validation():
    _constants.cache_clear()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 48, 48, generator=g)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).requires_grad_()
    with torch.inference_mode():  # Lightning validates under inference mode, possibly before any step
        ms_ssim(x, y.detach(), 2)
    ms_ssim(x, y, 2).backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    window, weights = _constants(11, 2, torch.float32, x.device)
    assert _constants(11, 2, torch.float32, x.device)[0] is window and _constants.cache_info().misses == 1
    assert torch.equal(window, gaussian_window(11))
    assert torch.equal(weights, torch.tensor(MS_SSIM_WEIGHTS[:2]) / torch.tensor(MS_SSIM_WEIGHTS[:2]).sum())


def test_reconstruction_loss_is_l1_plus_weighted_dissimilarity():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 48, 48, generator=g)
    noisy = target + 0.1 * torch.randn(target.shape, generator=g)
    loss, l1, similarity = reconstruction_loss(noisy, target, 0.5, 2)
    assert l1.item() == pytest.approx(F.l1_loss(noisy, target).item()) and similarity.item() == ms_ssim(noisy, target, 2).item()
    assert loss.item() == pytest.approx(l1.item() + 0.5 * (1 - similarity.item()))
    loss, l1, similarity = reconstruction_loss(target, target, 1.0, 2)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss, l1, similarity = reconstruction_loss(noisy, target, 0.0, 0)  # L1 only: no MS-SSIM (0, whatever the size)
    assert loss.item() == l1.item() and similarity.item() == 0
