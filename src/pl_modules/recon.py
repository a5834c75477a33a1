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

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

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
    evaluates_miou = False
    step_floor = StepFloor()  # one pass of its images
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
        self.reconstruction_loss = ReconstructionLoss(image_mean, image_std, ssim_weight, ssim_scales, ssim_window)
        self.means = nn.ModuleDict(
            {stage: nn.ModuleDict({k: MeanMetric() for k in ("loss", "l1", "ms_ssim")}) for stage in ("val", "test")}
        )
        self.best_val_loss = math.inf

    # ------------------------------------------------------------------ pieces
    def corrupt(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Images with coarse cutout (B, 3, H, W) and the hole masks (B, 3, H, W) bool."""
        hp = self.hparams
        return coarse_cutout(
            images, self.reconstruction_loss.image_mean.flatten(), tuple(hp.hole_size), hp.hole_area_fraction,
            hp.channel_hole_probability, generator,
        )

    def reconstruct(self, images: Tensor) -> Tensor:
        """The network's clean image, back in [0, 1]."""
        return self.reconstruction_loss.restore(self.student(images))

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

    def lr_factor(self, step: int, total_steps: int) -> float:
        """``warmup_cosine`` over ``warmup_fraction`` of the steps, or the base's poly schedule."""
        hp = self.hparams
        if hp.lr_schedule == "poly":
            return super().lr_factor(step, total_steps)
        return warmup_cosine(step, total_steps, round(hp.warmup_fraction * total_steps), hp.final_lr_ratio)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate_batch(self, stage: str, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Reconstruction scores of ``stage`` (``val`` or ``test``), with holes seeded by the batch index.

        The same holes at every evaluation, so that scores of different steps compare. NOTE: padding
        of a mixed-size batch (black) is reconstructed too.
        """
        images = batch["image"]
        corrupted, _ = self.corrupt(images, torch.Generator().manual_seed(batch_idx))
        prediction = self.student(corrupted)
        for key, value in zip(("loss", "l1", "ms_ssim"), self.reconstruction_loss(prediction, images)):
            self.means[stage][key].update(value, weight=images.shape[0])
        if stage == "val" and batch_idx == 0 and self._should_log_images():
            n = self.hparams.num_log_images
            restored = self.reconstruction_loss.restore(prediction[:n]).float()
            self._val_preview = [(images[:n].cpu(), corrupted[:n].cpu(), restored.cpu())]

    def end_evaluation(self, stage: str) -> None:
        """Log ``<stage>/loss``, ``/l1`` and ``/ms_ssim``; after a validation also the best loss and the grid."""
        scores = {key: mean.compute() for key, mean in self.means[stage].items()}
        for mean in self.means[stage].values():
            mean.reset()
        if stage == "test":
            self.log_dict({f"test/{key}": value for key, value in scores.items()})
            return
        if self.trainer.sanity_checking:
            return
        self._num_validations += 1
        if float(scores["loss"]) < self.best_val_loss:
            self.best_val_loss, self.best_step = float(scores["loss"]), int(self.global_step)
        self.log("val/loss", scores["loss"], prog_bar=True)
        self.log_dict({"val/l1": scores["l1"], "val/ms_ssim": scores["ms_ssim"], "val/loss_best": self.best_val_loss})
        if self._val_preview:
            from torchvision.utils import make_grid

            rows = self._val_preview[0]  # clean | corrupted | reconstruction, one row each
            grid = make_grid(torch.cat(rows), nrow=len(rows[0]), padding=2, pad_value=1.0)
            self.logger.experiment.add_image("val/reconstructions", grid, self.global_step)
            self._val_preview = []

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.reconstruct(batch["image"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["best_val_loss"] = self.best_val_loss

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.best_val_loss = checkpoint.get("best_val_loss", math.inf)
