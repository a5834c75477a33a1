import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure as ssim_torchmetrics

from src.pl_modules import Recon, Supervised
from src.pl_modules.recon import (
    MS_SSIM_WEIGHTS,
    coarse_cutout,
    fitting_scales,
    ms_ssim,
    paint_holes,
    sample_holes,
    warmup_cosine,
)
from src.train import main
from tests.conftest import smoke_args
from tests.pl_modules.method_tester import MethodTester, tiny_kwargs


class TestRecon(MethodTester):
    method_cls = Recon
    permissive_kwargs: dict = {}  # no pseudo-labels, no threshold

    def test_short_fit_logs_val_miou(self):
        pytest.skip("recon has no mIoU: see test_short_fit_logs_val_loss_and_its_best_checkpoint_transfers")


def holes_of(holes: torch.Tensor, image: int) -> torch.Tensor:
    return holes[holes[:, 0] == image]


def test_holes_are_blocks_of_the_configured_size_until_the_summed_area_reaches_the_fraction():
    height, width, low, high, fraction = 48, 40, 4, 9, 0.5
    holes = sample_holes(12, height, width, (low, high), fraction, 0.5, torch.Generator().manual_seed(0))
    _, channel, top, left, hole_h, hole_w = holes.unbind(1)
    assert ((hole_h >= low) & (hole_h <= high) & (hole_w >= low) & (hole_w <= high)).all()
    assert {int(v) for v in hole_h.unique()} == set(range(low, high + 1))  # every size is drawn
    assert (top >= 0).all() and (left >= 0).all() and (top + hole_h <= height).all() and (left + hole_w <= width).all()
    modes = set()
    for image in range(12):
        own = holes_of(holes, image)
        per_channel = bool((own[:, 1] < 3).all())
        assert per_channel or bool((own[:, 1] == 3).all())  # one mode per image
        modes.add(per_channel)
        target = fraction * height * width * (3 if per_channel else 1)
        areas = own[:, 4] * own[:, 5]
        # Added until the summed area (overlaps counted again) reaches the target, not one more.
        assert areas.sum() >= target > areas.sum() - areas[-1]
    assert modes == {True, False}
    assert len(sample_holes(2, height, width, (low, high), 0.0)) == 0


def opening(mask: torch.Tensor, side: int) -> torch.Tensor:
    """Pixels of ``mask`` (B, C, H, W) that lie in some fully masked side x side square."""
    full_squares = F.avg_pool2d(mask.float(), side, stride=1) > 1 - 1e-6  # by top-left corner
    return F.max_pool2d(F.pad(full_squares.float(), (side - 1,) * 4), side, stride=1) > 0


def test_masks_are_the_union_of_coarse_blocks_and_cover_about_the_configured_fraction():
    height, width, low = 64, 56, 5
    images = torch.rand(8, 3, height, width)
    fill = torch.tensor([0.25, 0.5, 0.75])
    corrupted, mask = coarse_cutout(images, fill, (low, 12), 0.5, 0.5, torch.Generator().manual_seed(1))
    holes = sample_holes(8, height, width, (low, 12), 0.5, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(mask, paint_holes(holes, 8, height, width))
    expected = torch.zeros_like(mask)  # slow painting, one hole at a time
    for image, channel, top, left, hole_h, hole_w in holes.tolist():
        channels = slice(0, 3) if channel == 3 else slice(channel, channel + 1)
        expected[image, channels, top : top + hole_h, left : left + hole_w] = True
    assert torch.equal(mask, expected)
    # Coarse: every masked pixel lies in a fully masked low x low square (an opening keeps the mask),
    # though not in a square larger than the largest hole.
    assert torch.equal(opening(mask, low), mask)
    assert not torch.equal(opening(mask, 13), mask)
    # Summed area 50 % of the pixels (of the channel-pixels with per-channel holes): overlaps leave
    # about 1 - exp(-0.5) = 39 % covered.
    covered = mask.float().mean().item()
    assert 0.3 < covered < 0.5
    assert torch.equal(corrupted[mask], fill.view(1, 3, 1, 1).expand_as(images)[mask])
    assert torch.equal(corrupted[~mask], images[~mask])


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


def test_loss_is_zero_for_a_perfect_reconstruction_and_uses_the_normalised_target():
    module = Recon(**tiny_kwargs())
    images = torch.rand(2, 3, 32, 32)
    target = (images - module.image_mean) / module.image_std
    loss, l1, similarity = module.reconstruction_loss(target, images)
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and similarity.item() == pytest.approx(1.0, abs=1e-6)
    loss, l1, similarity = module.reconstruction_loss(target + 0.1, images)
    assert l1.item() == pytest.approx(0.1, abs=1e-5) and loss.item() > l1.item()
    assert module.student(images).shape == (2, 3, 32, 32)  # RGB out, whatever num_classes says


def test_warmup_then_cosine():
    values = [warmup_cosine(step, 100, 10, 0.01) for step in range(101)]
    assert values[0] == pytest.approx(0.01) and values[10] == pytest.approx(1.0) and values[100] == pytest.approx(0.01)
    assert values[55] == pytest.approx(0.01 + 0.99 * 0.5)
    assert all(a < b for a, b in zip(values[:10], values[1:11]))
    assert all(a > b for a, b in zip(values[10:], values[11:]))


def init_warnings(**kwargs) -> tuple[Supervised, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = Supervised(**{**tiny_kwargs(), **kwargs})
    return module, [str(w.message) for w in caught if "model.init_from" in str(w.message)]


def test_recon_checkpoint_transfers_all_but_the_head_and_reports_it_once(tmp_path):
    torch.manual_seed(0)
    recon = Recon(**tiny_kwargs())
    with torch.no_grad():  # non-default values everywhere, BatchNorm statistics included
        for tensor in recon.student.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor))
    path = tmp_path / "recon.ckpt"
    torch.save({"state_dict": recon.state_dict(), "method": "recon"}, path)

    module, messages = init_warnings(num_classes=5, init_from=str(path))
    source, loaded = recon.student.state_dict(), module.student.state_dict()
    head = sorted(k for k in loaded if k.startswith("model.segmentation_head."))
    assert head == ["model.segmentation_head.0.bias", "model.segmentation_head.0.weight"]
    encoder = [k for k in loaded if k.startswith("model.encoder.")]
    assert len(encoder) > 10 and all(torch.equal(loaded[k], source[k]) for k in encoder)
    assert all(torch.equal(loaded[k], source[k]) for k in loaded if k not in head)  # the decoder too
    assert not torch.equal(loaded[head[1]][:3], source[head[1]])
    assert len(messages) == 1
    assert f"copied {len(loaded) - 2} of {len(loaded)} tensors" in messages[0]
    assert "2 of another shape" in messages[0] and "not in the checkpoint" not in messages[0]
    assert all(name in messages[0] for name in head)
    assert f"{head[1]} (3, 32, 1, 1) -> (5, 32, 1, 1)" in messages[0]

    unrelated = tmp_path / "unrelated.ckpt"
    torch.save({"state_dict": {"student.model.other.weight": torch.zeros(2, 2)}}, unrelated)
    with pytest.raises(ValueError, match="no tensor matches"):
        init_warnings(init_from=str(unrelated))


def test_short_fit_logs_val_loss_and_its_best_checkpoint_transfers(tmp_path, capsys):
    cli = main(["fit", *smoke_args("recon", tmp_path)])
    assert "val/loss: " in capsys.readouterr().out  # the summary prints the monitored metric, not an mIoU
    metrics = cli.trainer.callback_metrics
    assert "val/miou" not in metrics
    for key in ("val/loss", "val/l1", "val/ms_ssim", "train/loss", "train/hole_fraction"):
        assert torch.isfinite(metrics[key]), key
    assert 0 < float(metrics["val/ms_ssim"]) <= 1 and 0 < float(metrics["train/hole_fraction"]) < 0.8
    assert float(metrics["val/loss"]) == pytest.approx(float(metrics["val/l1"]) + 1 - float(metrics["val/ms_ssim"]))
    checkpoint = cli.trainer.checkpoint_callback
    assert checkpoint.monitor == "val/loss" and checkpoint.mode == "min"
    assert checkpoint.best_model_path.endswith("best.ckpt")
    assert math.isclose(float(checkpoint.best_model_score), cli.model.best_val_loss, rel_tol=1e-6)

    reloaded = Recon.load_from_checkpoint(checkpoint.best_model_path).eval()
    assert reloaded.num_classes == 8 and reloaded.student(torch.rand(1, 3, 32, 32)).shape[1] == 3

    module, messages = init_warnings(num_classes=8, init_from=checkpoint.best_model_path)
    best = torch.load(checkpoint.best_model_path, weights_only=False)["state_dict"]
    encoder = {k: v for k, v in module.student.state_dict().items() if k.startswith("model.encoder.")}
    assert encoder and all(torch.equal(v, best[f"student.{k}"]) for k, v in encoder.items())
    assert len(messages) == 1 and "model.segmentation_head.0.weight" in messages[0]
