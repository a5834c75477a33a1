"""Self-supervised pretraining by image reconstruction with coarse cutout (METHODS.md section 7).

Reference: p2irc `ir-ssl-for-semantic-segmentation` @0832843 (no paper text). Many small
rectangles of an image are blanked out; a U-Net predicts the clean image from the corrupted
one. Its weights then initialise a segmentation network (``--model.init_args.init_from``,
`src.pl_modules.base.load_matching`; ``recon+<method>`` in ``benchmarks/run.py``).

- Corruption (section 7 "Corruption"): per image, with equal probability, whole-pixel holes
  filled with the mean colour, or per-channel holes that blank one random channel with that
  channel's mean; hole sides ~ UniformInt[2, 16], holes added until their summed area
  (overlaps counted again) reaches 50 % of H*W (whole-pixel) or of 3*H*W (per-channel).
- Loss (section 7 "Loss"): ``L1 + (1 - MS-SSIM)`` over every pixel, on normalised tensors with
  data range 1 (the reference's quirk), MS-SSIM as pytorch_msssim computes it.
- Schedule (section 7 "Optimisation"): linear warm-up then cosine, as per-step multipliers.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from src.pl_modules.base import SemiSupervisedModule

# Dataset statistics of the reference (VOC JPEGImages, computed by its authors).
REFERENCE_MEAN = (0.4529, 0.4317, 0.3999)
REFERENCE_STD = (0.4443, 0.4665, 0.4887)
# Per-scale exponents of MS-SSIM (Wang et al., 2003), finest scale first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
LR_SCHEDULES = ("warmup_cosine", "poly")
ALL_CHANNELS = 3  # channel index of a whole-pixel hole in `sample_holes`


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
    """Corrupted copies of ``images`` (B, 3, H, W) and their hole masks (B, 3, H, W) bool.

    A masked channel value becomes that channel's ``fill`` value (3,), the dataset mean.
    """
    batch, _, height, width = images.shape
    holes = sample_holes(batch, height, width, hole_size, area_fraction, channel_hole_probability, generator)
    mask = paint_holes(holes, batch, height, width, images.device)
    return torch.where(mask, fill.to(images).view(1, 3, 1, 1), images), mask


# ---------------------------------------------------------------------------------------- loss
def gaussian_window(size: int, sigma: float = 1.5) -> Tensor:
    """Normalised 1-D Gaussian (size,) centred on the middle tap (pytorch_msssim's `_fspecial_gauss_1d`)."""
    coords = torch.arange(size, dtype=torch.float32) - size // 2
    window = torch.exp(-(coords**2) / (2 * sigma**2))
    return window / window.sum()


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
    window = gaussian_window(window_size).to(x)
    channels = x.shape[1]

    def blur(*ts: Tensor) -> tuple[Tensor, ...]:
        # The valid (unpadded) separable Gaussian blur as two banded matmuls, all five maps of a
        # scale at once: on CPU several times faster than depthwise convolutions of these sizes.
        stacked = torch.cat(ts, dim=1)
        with torch.autocast(stacked.device.type, enabled=False):
            blurred = _band(stacked.shape[-2], window) @ stacked @ _band(stacked.shape[-1], window).T
        return blurred.split(channels, dim=1)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=x.dtype, device=x.device)
    weights = weights / weights.sum()
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


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, floor: float) -> float:
    """LR multiplier: linear from ``floor`` to 1 over ``warmup_steps``, then cosine down to ``floor`` at the end."""
    if step < warmup_steps:
        return floor + (1.0 - floor) * step / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Recon(SemiSupervisedModule):
    """Pretraining of a segmentation network as a denoiser of images with coarse cutout.

    Trains on the labeled stream with its labels unused: ``data.num_labeled: 0`` (the YAML's
    value) makes that stream every train image with a label, the whole train pool of the
    built-in datasets. Validation and test corrupt their images with fixed holes (seeded by
    batch index) and log ``val/loss`` (the checkpoint monitor of configs/recon.yaml, mode min:
    the reference keeps the lowest validation loss), ``val/l1`` and ``val/ms_ssim``; there is no
    mIoU. The network predicts RGB (3 channels); ``num_classes`` and ``class_names`` only record
    the dataset's.

    Args:
        hole_size: Least and largest hole side in pixels (both inclusive).
        hole_area_fraction: Summed hole area (overlaps counted again) at which holes stop, as a
            fraction of H*W (whole-pixel holes) or 3*H*W (per-channel holes). The covered fraction
            is lower (about 40 % at 0.5).
        channel_hole_probability: Chance that an image gets per-channel holes instead of whole-pixel ones.
        image_mean: Dataset mean colour in [0, 1]: the hole fill, and the target's normalisation.
        image_std: Dataset std: the target is ``(image - image_mean) / image_std``. The defaults are the
            reference's VOC statistics; mean 0 and std 1 give a loss on [0, 1] images (then MS-SSIM's
            data range of 1 is the true one).
        ssim_weight: Weight of ``1 - MS-SSIM`` beside the L1 term (the reference: 1; 0 = L1 only).
        ssim_scales: MS-SSIM scales (the reference: 5, which needs images over 160 px). Images too small
            get as many as fit, with a warning (see `fitting_scales`).
        ssim_window: Side of MS-SSIM's Gaussian window.
        lr_schedule: ``warmup_cosine`` (the reference) or ``poly`` (the suite's, options of the base).
        warmup_fraction: Share of ``max_steps`` warming up (the reference: 10 of 1,000 epochs).
        final_lr_ratio: LR multiplier at the start of warm-up and at the last step.
        arch: smp architecture (the reference's is a U-Net).
        encoder_name: Encoder (the reference's is ResNet-34; use the downstream model's to transfer).
        **kwargs: Shared options of `SemiSupervisedModule`.
    """

    name = "recon"
    # Read by benchmarks/run.py: trained once per seed, then initialises another method ("recon+<method>").
    pretraining_only = True

    def __init__(
        self,
        hole_size: tuple[int, int] = (2, 16),
        hole_area_fraction: float = 0.5,
        channel_hole_probability: float = 0.5,
        image_mean: tuple[float, float, float] = REFERENCE_MEAN,
        image_std: tuple[float, float, float] = REFERENCE_STD,
        ssim_weight: float = 1.0,
        ssim_scales: int = 5,
        ssim_window: int = 11,
        lr_schedule: str = "warmup_cosine",
        warmup_fraction: float = 0.01,
        final_lr_ratio: float = 0.01,
        arch: str = "Unet",
        encoder_name: str = "resnet34",
        **kwargs: Any,
    ) -> None:
        if not 1 <= hole_size[0] <= hole_size[1]:
            raise ValueError(f"model.hole_size must satisfy 1 <= low <= high, got {hole_size}")
        if not 0.0 <= hole_area_fraction <= 1.0:
            raise ValueError(f"model.hole_area_fraction must be in [0, 1], got {hole_area_fraction}")
        if not 0.0 <= channel_hole_probability <= 1.0:
            raise ValueError(f"model.channel_hole_probability must be in [0, 1], got {channel_hole_probability}")
        if len(image_mean) != 3 or len(image_std) != 3 or min(image_std) <= 0:
            raise ValueError(f"model.image_mean/image_std need 3 values, std > 0; got {image_mean}, {image_std}")
        if ssim_weight < 0:
            raise ValueError(f"model.ssim_weight must be >= 0, got {ssim_weight}")
        if not 1 <= ssim_scales <= len(MS_SSIM_WEIGHTS):
            raise ValueError(f"model.ssim_scales must be in [1, {len(MS_SSIM_WEIGHTS)}], got {ssim_scales}")
        if ssim_window < 1 or ssim_window % 2 == 0:
            raise ValueError(f"model.ssim_window must be odd and >= 1, got {ssim_window}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"model.lr_schedule={lr_schedule!r}; expected one of {LR_SCHEDULES}")
        if not 0.0 <= warmup_fraction < 1.0 or not 0.0 < final_lr_ratio <= 1.0:
            raise ValueError(
                "model.warmup_fraction must be in [0, 1) and final_lr_ratio in (0, 1]; "
                f"got {warmup_fraction}, {final_lr_ratio}"
            )
        # The network predicts RGB; num_classes and class_names keep recording the dataset's (linked by the CLI).
        dataset = {"num_classes": kwargs.get("num_classes", 3), "class_names": kwargs.get("class_names")}
        kwargs.update(num_classes=3, class_names=None)
        super().__init__(arch=arch, encoder_name=encoder_name, **kwargs)
        self.hparams.update(dataset)
        self.num_classes = dataset["num_classes"]
        self.class_names = list(dataset["class_names"] or map(str, range(self.num_classes)))
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        keys = ("loss", "l1", "ms_ssim")
        self.val_means = nn.ModuleDict({k: MeanMetric() for k in keys})
        self.test_means = nn.ModuleDict({k: MeanMetric() for k in keys})
        self.best_val_loss = math.inf
        self._warned_sizes: set[tuple[int, int]] = set()
        self._preview: list[Tensor] = []

    # ------------------------------------------------------------------ pieces
    def corrupt(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Images with coarse cutout (B, 3, H, W) and the hole masks (B, 3, H, W) bool."""
        hp = self.hparams
        return coarse_cutout(
            images, self.image_mean.flatten(), tuple(hp.hole_size), hp.hole_area_fraction,
            hp.channel_hole_probability, generator,
        )

    def reconstruct(self, images: Tensor) -> Tensor:
        """The network's clean image, back in [0, 1]."""
        return (self.student(images) * self.image_std + self.image_mean).clamp(0.0, 1.0)

    def reconstruction_loss(self, prediction: Tensor, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``L1 + ssim_weight * (1 - MS-SSIM)`` of the prediction against the normalised clean images."""
        hp = self.hparams
        target = (images - self.image_mean) / self.image_std
        prediction = prediction.float()
        l1 = F.l1_loss(prediction, target)
        if hp.ssim_weight == 0:
            similarity = prediction.new_zeros(())
            return l1, l1, similarity
        similarity = ms_ssim(prediction, target, self._ssim_scales(*images.shape[-2:]), hp.ssim_window)
        return l1 + hp.ssim_weight * (1.0 - similarity), l1, similarity

    def _ssim_scales(self, height: int, width: int) -> int:
        hp = self.hparams
        scales = fitting_scales(height, width, hp.ssim_window, hp.ssim_scales)
        if scales < hp.ssim_scales and (height, width) not in self._warned_sizes:
            self._warned_sizes.add((height, width))
            warnings.warn(
                f"model.ssim_scales={hp.ssim_scales}: {height}x{width} images allow {scales} MS-SSIM scale(s) "
                f"with a {hp.ssim_window}-tap window; using {scales}",
                stacklevel=2,
            )
        if scales == 0:
            raise ValueError(f"{height}x{width} images are smaller than model.ssim_window={hp.ssim_window}")
        return scales

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        labeled, pool = getattr(datamodule, "labeled_indices", None), getattr(datamodule, "train_set", None)
        if labeled and pool is not None and len(labeled) < len(pool):
            warnings.warn(
                f"recon trains on the labeled stream: {len(labeled)} of {len(pool)} train images; "
                "data.num_labeled 0 takes every image with a label",
                stacklevel=2,
            )

    def compute_losses(self, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        images = batch["labeled"]["image"]  # its mask is unused
        corrupted, mask = self.corrupt(images)
        loss, l1, similarity = self.reconstruction_loss(self.student(corrupted), images)
        return {"loss": loss, "l1": l1.detach(), "ms_ssim": similarity.detach(), "hole_fraction": mask.float().mean()}

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        if hp.lr_schedule == "poly":
            return super().configure_optimizers()
        optimizer = self.optimizer_factory(self.trainable_parameters())
        total = max(int(self.trainer.max_steps), 1)
        warmup = round(hp.warmup_fraction * total)

        def schedule(step: int) -> float:
            return warmup_cosine(step, total, warmup, hp.final_lr_ratio)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _evaluate(self, images: Tensor, batch_idx: int, means: nn.ModuleDict) -> tuple[Tensor, Tensor]:
        # The same holes at every evaluation, so that scores of different steps compare.
        # NOTE: padding of a mixed-size batch (black) is reconstructed too.
        corrupted, _ = self.corrupt(images, torch.Generator().manual_seed(batch_idx))
        prediction = self.student(corrupted)
        for key, value in zip(("loss", "l1", "ms_ssim"), self.reconstruction_loss(prediction, images)):
            means[key].update(value, weight=images.shape[0])
        return corrupted, prediction

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        images = batch["image"]
        corrupted, prediction = self._evaluate(images, batch_idx, self.val_means)
        if batch_idx == 0 and self._should_log_images():
            n = self.hparams.num_log_images
            restored = (prediction[:n] * self.image_std + self.image_mean).clamp(0.0, 1.0)
            self._preview = [images[:n].cpu(), corrupted[:n].cpu(), restored.float().cpu()]

    def on_validation_epoch_end(self) -> None:
        scores = {key: mean.compute() for key, mean in self.val_means.items()}
        for mean in self.val_means.values():
            mean.reset()
        if self.trainer.sanity_checking:
            return
        self._num_validations += 1
        if float(scores["loss"]) < self.best_val_loss:
            self.best_val_loss, self.best_step = float(scores["loss"]), int(self.global_step)
        self.log("val/loss", scores["loss"], prog_bar=True)
        self.log_dict({"val/l1": scores["l1"], "val/ms_ssim": scores["ms_ssim"], "val/loss_best": self.best_val_loss})
        if self._preview:
            from torchvision.utils import make_grid

            rows = self._preview  # clean | corrupted | reconstruction, one row each
            grid = make_grid(torch.cat(rows), nrow=len(rows[0]), padding=2, pad_value=1.0)
            self.logger.experiment.add_image("val/reconstructions", grid, self.global_step)
            self._preview = []

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch["image"], batch_idx, self.test_means)

    def on_test_epoch_end(self) -> None:
        for key, mean in self.test_means.items():
            self.log(f"test/{key}", mean.compute())
            mean.reset()

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.reconstruct(batch["image"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["best_val_loss"] = self.best_val_loss

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.best_val_loss = checkpoint.get("best_val_loss", math.inf)
