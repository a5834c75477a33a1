"""Self-supervised pretraining by image reconstruction with coarse cutout (METHODS.md section 7).

Reference: github.com/p2irc/ir-ssl-for-semantic-segmentation (no paper text). Many small
rectangles of an image are blanked out (`ops.coarse_cutout`, section 7 "Corruption"); a U-Net
predicts the clean image from the corrupted one, with the loss ``L1 + (1 - MS-SSIM)``
(`src.losses.reconstruction`, section 7 "Loss") and a linear warm-up then cosine schedule
(`ops.warmup_cosine`, section 7 "Optimisation"). Its weights then initialise a segmentation
network (``--model.init_args.init_from``, `src.pl_modules.base.load_matching`; ``recon+<method>``
in ``benchmarks/run.py``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from src.losses.reconstruction import MS_SSIM_WEIGHTS, ReconstructionLoss
from src.pl_modules.base import SemiSupervisedModule, check_fractions, check_non_negative
from src.pl_modules.ops import coarse_cutout, warmup_cosine
from src.pl_modules.timing import StepFloor

# Dataset statistics of the reference (VOC JPEGImages, computed by its authors).
REFERENCE_MEAN = (0.4529, 0.4317, 0.3999)
REFERENCE_STD = (0.4443, 0.4665, 0.4887)
LR_SCHEDULES = ("warmup_cosine", "poly")


class Recon(SemiSupervisedModule):
    """Pretraining of a segmentation network as a denoiser of images with coarse cutout.

    Trains on the labeled stream with its labels unused: ``data.num_labeled: 0`` (the YAML's value)
    makes it every train image with a label. Validation and test score reconstructions of images with
    fixed holes (`score_batch`), no mIoU; ``val/loss`` is the checkpoint monitor of configs/recon.yaml,
    mode min: the reference keeps the lowest validation loss.

    Args:
        hole_size: Least and largest hole side in pixels (both inclusive).
        hole_area_fraction: Summed hole area (overlaps counted again) at which holes stop, as a fraction
            of H*W (whole-pixel holes) or 3*H*W (per-channel ones); less is covered (about 40 % at 0.5).
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
    eval_scores = ("loss", "l1", "ms_ssim")  # logged as val/loss, val/l1, val/ms_ssim (and test/...)
    preview_tag = "val/reconstructions"  # clean | corrupted | reconstruction, one row each
    output_channels = 3  # RGB; num_classes and class_names only record the dataset's
    step_floor = StepFloor()  # one pass of its images
    pretraining_only = True  # benchmarks/run.py trains it once per seed to initialise "recon+<method>"

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
        check_fractions(hole_area_fraction=hole_area_fraction, channel_hole_probability=channel_hole_probability)
        if len(image_mean) != 3 or len(image_std) != 3 or min(image_std) <= 0:
            raise ValueError(f"model.image_mean/image_std need 3 values, std > 0; got {image_mean}, {image_std}")
        check_non_negative(ssim_weight=ssim_weight)
        if not 1 <= ssim_scales <= len(MS_SSIM_WEIGHTS):
            raise ValueError(f"model.ssim_scales must be in [1, {len(MS_SSIM_WEIGHTS)}], got {ssim_scales}")
        if ssim_window < 1 or ssim_window % 2 == 0:
            raise ValueError(f"model.ssim_window must be odd and >= 1, got {ssim_window}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"model.lr_schedule={lr_schedule!r}; expected one of {LR_SCHEDULES}")
        if not 0.0 <= warmup_fraction < 1.0 or not 0.0 < final_lr_ratio <= 1.0:
            raise ValueError("model.warmup_fraction must be in [0, 1) and final_lr_ratio in (0, 1]; "
                             f"got {warmup_fraction}, {final_lr_ratio}")
        super().__init__(arch=arch, encoder_name=encoder_name, **kwargs)
        self.reconstruction_loss = ReconstructionLoss(image_mean, image_std, ssim_weight, ssim_scales, ssim_window)

    def corrupt(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Images with coarse cutout (B, 3, H, W) and the hole masks (B, 3, H, W) bool."""
        hp = self.hparams
        return coarse_cutout(
            images, self.reconstruction_loss.image_mean.flatten(), tuple(hp.hole_size), hp.hole_area_fraction,
            hp.channel_hole_probability, generator,
        )

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

    def lr_factor(self, step: int, total_steps: int) -> float:
        """``warmup_cosine`` over ``warmup_fraction`` of the steps, or the base's poly schedule."""
        hp = self.hparams
        if hp.lr_schedule == "poly":
            return super().lr_factor(step, total_steps)
        return warmup_cosine(step, total_steps, round(hp.warmup_fraction * total_steps), hp.final_lr_ratio)

    @torch.no_grad()
    def score_batch(self, images: Tensor, batch_idx: int) -> tuple[dict[str, Tensor], tuple[Tensor, ...]]:
        """``eval_scores`` with holes seeded by the batch index (the same at every evaluation, so that scores
        compare), and the clean, corrupted and restored images. NOTE: a mixed-size batch's black padding counts too."""
        corrupted, _ = self.corrupt(images, torch.Generator().manual_seed(batch_idx))
        prediction = self.student(corrupted)
        scores = dict(zip(self.eval_scores, self.reconstruction_loss(prediction, images)))
        return scores, (images, corrupted, self.reconstruction_loss.restore(prediction))

    @property
    def best_val_loss(self) -> float:
        """The lowest ``val/loss`` so far (the checkpoint's ``best_val_loss``)."""
        return self.best_score

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """The network's clean image, back in [0, 1]."""
        return self.reconstruction_loss.restore(self.student(batch["image"]))
