"""The base LightningModule: everything methods share, so a method only writes its losses.

`SemiSupervisedModule` owns the student network, the optional EMA teacher, an optional
representation head, the optimizer and poly LR schedule, evaluation (mIoU and per-class
IoU at the last and the best validation, whole-image or sliding-window), TensorBoard
logging and the best-score bookkeeping. A method subclasses it and implements
`compute_losses(batch) -> {"loss": ..., other logged entries}`; hooks let it change what the
base does otherwise: `update_teacher` (the teacher's schedule), `lr_factor` (the LR schedule),
`eval_scores` with `score_batch` (scalar scores instead of the mIoU, e.g. a pretraining
method's loss) and `output_channels` (what the networks predict). For step timings a
method marks its phases (`phase`) and declares its floor (``step_floor``, `src.pl_modules.timing`).
"""

from __future__ import annotations

import contextlib
import copy
from abc import ABC, abstractmethod
import math
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassConfusionMatrix

from src.datasets.base import IGNORE_INDEX
from src.networks import RepresentationHead, Segmenter
from src.pl_modules.diagnostics import pseudo_label_counts, training_state_kept
from src.pl_modules.ops import ema_decay, ema_update
from src.pl_modules.relations import prototype_similarity, prototype_sums, relation_figure
from src.pl_modules.timing import PhaseRecorder, StepFloor
from src.pl_modules.visualize import prediction_grid
from src.utils import scalar_metrics

TEACHER_BN_MODES = ("train", "eval")
EVAL_MODES = ("whole", "sliding")
# What `SemiSupervisedModule.phase` returns without a recorder: entering it does nothing.
_NO_PHASE = contextlib.nullcontext()


def sgd_nesterov(params: Any) -> torch.optim.Optimizer:
    """The protocol's optimizer (METHODS.md 1.6): SGD, momentum 0.9, Nesterov, weight decay 5e-4."""
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)


def iou_from_confusion(confusion: Tensor) -> tuple[Tensor, Tensor]:
    """Per-class IoU (NaN for classes absent from both GT and prediction) and pixel accuracy.

    ``confusion[t, p]`` counts pixels of true class t predicted as p.
    """
    confusion = confusion.double()
    tp = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    accuracy = tp.sum() / confusion.sum().clamp(min=1)
    return iou, accuracy


def diagnostic_scores(counts: dict[str, Tensor]) -> dict[str, float]:
    """The ``diag/`` scores (`src.pl_modules.diagnostics`) from summed `pseudo_label_counts`.

    Accuracies and the mask ratio are fractions, the mIoU is in percent; a score with nothing
    to count (no labelled pixel, none inside the mask) is NaN, not 0.
    """
    iou, accuracy = iou_from_confusion(counts["confusion"])
    _, mask_accuracy = iou_from_confusion(counts["confusion_confident"])
    nan = float("nan")
    labelled = bool(counts["confusion"].sum() > 0)
    return {
        "pseudo_acc": float(accuracy) if labelled else nan,
        "pseudo_miou": _mean_iou(iou) if labelled else nan,
        "mask_ratio": float(counts["confident"] / counts["pixels"]) if counts["pixels"] > 0 else nan,
        "mask_acc": float(mask_accuracy) if counts["confusion_confident"].sum() > 0 else nan,
    }


def check_fractions(**options: float) -> None:
    """Raise a ValueError naming the first option (``model.<name>``) outside [0, 1]."""
    for name, value in options.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"model.{name} must be in [0, 1], got {value}")


def check_non_negative(**options: float) -> None:
    """Raise a ValueError naming the first option (``model.<name>``) below 0."""
    for name, value in options.items():
        if value < 0:
            raise ValueError(f"model.{name} must be >= 0, got {value}")


class SemiSupervisedModule(pl.LightningModule, ABC):
    """Base of every method: networks, EMA teacher, optimizer, evaluation and logging.

    Args:
        num_classes: Number of classes (linked from the datamodule by the CLI).
        ignore_index: Label of unlabeled pixels (linked from the datamodule).
        class_names: Names for per-class IoU logs (linked from the datamodule).
        arch: smp architecture, e.g. ``DeepLabV3Plus`` or ``Unet``.
        encoder_name: smp encoder (``resnet18``) or timm encoder (``tu-resnet10t``).
        encoder_weights: None (random init), a weight name smp or timm knows for the encoder (``imagenet``,
            smp's ``ssl``/``swsl``, a timm tag such as ``a1_in1k``; from their caches, see `Segmenter`), or
            the path of a local encoder weights file.
        model_options: Extra keyword arguments of the smp architecture.
        optimizer: Optimizer factory applied to the trainable parameters (never the teacher's).
        lr_power: Exponent of the poly schedule ``lr * (1 - step / max_steps) ** lr_power``, stepped per step.
        min_lr_ratio: Floor of the poly factor (ReCo floors the lr at 1e-6 of 2.5e-3).
        ema_decay: Upper bound alpha of the EMA decay ``min(1 - 1/(step+1), alpha)`` (methods with a teacher).
        teacher_bn: BatchNorm mode of the teacher when it makes pseudo-labels: ``train`` (batch statistics,
            ReCo's reference semantics, METHODS.md 3) or ``eval`` (running statistics).
        eval_teacher: Report the teacher as ``val/miou`` when there is one (the paper's choice); the student's
            score is logged as ``val/miou_student`` either way.
        eval_mode: ``whole`` (full image at once) or ``sliding`` (windows of ``eval_window``, stride 2/3 of it).
        eval_window: Sliding-window size (the CLI links it to the training crop size).
        log_images_every_n_val: Log an image | ground truth | prediction grid every N validations (0 = never),
            and for methods with an unlabeled loss an image | pseudo-label | confidence mask | ground truth
            grid of the diagnostic images (``diag/pseudo_labels``); for methods with a representation head, the
            cosine similarity of its class prototypes on the validation set (``val/class_relations``,
            `src.pl_modules.relations.relation_figure`).
        num_log_images: Rows in that grid.
        representation_dim: Output dimension of the representation head (methods that use one).
        scale_range: Random rescale range of batch-level augmentation of unlabeled images (the CLI links
            ``data.scale_range``, the labeled images' range, as the reference does).
        init_from: Checkpoint (any method's, or a reconstruction pretraining run's) whose matching
            parameters initialise the student; the others are listed in one warning.
        channels_last: Keep the networks and the input images in channels-last memory format: faster
            convolutions on CPUs (oneDNN) and on GPUs with tensor cores. ``False`` takes the same steps
            up to float rounding, except that an elementwise dropout mask is drawn in memory order,
            so a seed draws another (equally random) mask in each format.
        compile: ``torch.compile`` the networks' encoder, decoder and head in place (parameter
            names, checkpoints and every forward path unchanged); the first steps pay for compiling.
    """

    name = "base"
    uses_teacher = False
    # A method with an unlabeled loss sets True and defines its pseudo-labelling rule,
    # ``pseudo_labels(images) -> (pseudo-labels (B, H, W) long, confidence mask (B, H, W) bool)``,
    # through the code its loss uses: teacher-based methods label with the teacher in its
    # ``teacher_bn`` mode; teacher-free ones (FixMatch, UniMatch) with the student itself, in eval
    # mode, so that their labeller's validation mIoU is ``val/miou``. The rule may update BatchNorm
    # statistics and draw random numbers; `pseudo_label_diagnostics` puts them back. Only these
    # methods get the ``diag/`` scores (`src.pl_modules.diagnostics`).
    uses_unlabeled = False
    uses_representation = False
    # The teacher follows the student after each optimizer step (ReCo), or before it (C3-SemiSeg).
    teacher_update_before_step = False
    # What validation and test score: the mIoU (empty), or the batch-size-weighted means of the
    # scalar scores `score_batch` returns, by these names (a pretraining method has no classes to
    # score). Lower is better for the first: it is the one to monitor (``val/<first>``, e.g.
    # ``checkpoint: {monitor: val/loss, mode: min}``), its best is ``val/<first>_best`` and the
    # checkpoint's ``best_val_<first>``. `score_batch` also returns RGB image rows (B, 3, H, W),
    # shown one row each in the ``preview_tag`` grid.
    eval_scores: tuple[str, ...] = ()
    # The TensorBoard tag of the validation image grid.
    preview_tag = "val/predictions"
    # Channels the networks predict; None: ``num_classes`` (a method that predicts something else,
    # e.g. RGB images, sets it; ``num_classes`` and ``class_names`` then only record the dataset's).
    output_channels: int | None = None
    # The floor that step timings (benchmarks/bench_step.py) measure the training step against; None: none.
    step_floor: StepFloor | None = None
    # init_args that put the method in its steady state from its first step, for timings of a few
    # steps (C3-SemiSeg starts with a supervised phase).
    steady_state: dict[str, Any] = {}
    # Where `phase` reports; set by a recorder (`src.callbacks.PhaseTimer`) while it is attached.
    phase_recorder: PhaseRecorder | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.uses_unlabeled and not callable(getattr(cls, "pseudo_labels", None)):
            raise TypeError(f"{cls.__name__} sets uses_unlabeled but defines no pseudo_labels(images) rule")
        if cls.eval_scores and not callable(getattr(cls, "score_batch", None)):
            raise TypeError(f"{cls.__name__} sets eval_scores but defines no score_batch(images, batch_idx)")

    def __init__(
        self,
        num_classes: int = 8,
        ignore_index: int = IGNORE_INDEX,
        class_names: list[str] | None = None,
        arch: str = "DeepLabV3Plus",
        encoder_name: str = "resnet18",
        encoder_weights: str | None = None,
        model_options: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = sgd_nesterov,
        lr_power: float = 0.9,
        min_lr_ratio: float = 4e-4,
        ema_decay: float = 0.99,
        teacher_bn: str = "train",
        eval_teacher: bool = True,
        eval_mode: str = "whole",
        eval_window: int = 64,
        log_images_every_n_val: int = 5,
        num_log_images: int = 4,
        representation_dim: int = 256,
        scale_range: tuple[float, float] = (0.75, 1.25),
        init_from: str | None = None,
        channels_last: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if teacher_bn not in TEACHER_BN_MODES:
            raise ValueError(f"model.teacher_bn={teacher_bn!r}; expected one of {TEACHER_BN_MODES}")
        if eval_mode not in EVAL_MODES:
            raise ValueError(f"model.eval_mode={eval_mode!r}; expected one of {EVAL_MODES}")
        check_fractions(ema_decay=ema_decay)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"model.class_names has {len(class_names)} names for num_classes={num_classes}")
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names else [str(c) for c in range(num_classes)]

        self.student = self.build_network()
        self.rep_head = (
            RepresentationHead(self.student.feature_channels, representation_dim) if self.uses_representation else None
        )
        self.teacher: Segmenter | None = None
        if channels_last:
            if self.rep_head is not None:
                self.rep_head.to(memory_format=torch.channels_last)
        if self.uses_teacher:
            self.teacher = copy.deepcopy(self.student).requires_grad_(False)
            self.set_teacher_mode()
        if compile:
            for network in (self.student, self.teacher):
                if network is not None:
                    network.compile_parts()

        if self.eval_scores:
            self.score_means = nn.ModuleDict(
                {stage: nn.ModuleDict({k: MeanMetric() for k in self.eval_scores}) for stage in ("val", "test")}
            )
        else:
            roles = ["student"] + (["teacher"] if self.teacher is not None else [])
            self.val_confusions = nn.ModuleDict(
                {role: MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index) for role in roles}
            )
            self.test_confusion = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index)
        self.best_miou = float("nan")
        self.best_score = math.inf  # of the first of ``eval_scores``
        self.best_step = -1
        self._num_validations = 0
        # (step, mIoU) of every validation of the fit, oldest first; checkpoints carry it.
        self.val_history: list[tuple[int, float]] = []
        # Scalar metrics restored from a checkpoint (those logged when it was saved).
        self.checkpoint_metrics: dict[str, float] = {}
        self._val_preview: list[tuple[Tensor, ...]] = []  # rows of the next validation's image grid
        self._val_prototypes: tuple[Tensor, Tensor] | None = None  # its class-relation figure's (sums, counts)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))

    # ------------------------------------------------------------------ networks
    def forward(self, images: Tensor) -> Tensor:
        """Logits of the evaluated network (teacher if reported, else student) for [0, 1] images."""
        return self.eval_network()(images)

    def eval_network(self) -> Segmenter:
        if self.teacher is not None and self.hparams.eval_teacher:
            return self.teacher
        return self.student

    def build_network(self) -> Segmenter:
        """A network of this module's settings: its arch, encoder and weights, ``init_from`` loaded, channels-last."""
        hp = self.hparams
        network = Segmenter(self.output_channels or self.num_classes, hp.arch, hp.encoder_name, hp.encoder_weights,
                            hp.model_options)
        if hp.init_from is not None:
            load_matching(network, hp.init_from)
        if hp.channels_last:
            network.to(memory_format=torch.channels_last)
        return network

    def given_labels(self, unlabeled: dict[str, Tensor]) -> Tensor:
        """(B, H, W) long labels given with unlabeled images (partial-label mode), else ignore everywhere."""
        images = unlabeled["image"]
        return unlabeled.get("mask", torch.full_like(images[:, 0], self.ignore_index, dtype=torch.long))

    def set_teacher_mode(self) -> None:
        """Put the teacher in its configured BN mode (Lightning restores module modes after validation)."""
        if self.teacher is not None:
            self.teacher.train(self.hparams.teacher_bn == "train")

    @torch.no_grad()
    def forward_in_mode(
        self, network: nn.Module, images: Tensor, train: bool, with_features: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``network``'s logits, or logits and decoder features, without gradient, in a BatchNorm mode.

        Args:
            network: A `Segmenter` (the teacher, or the student labelling for itself).
            images: (B, 3, H, W) float images.
            train: Train mode (batch statistics, and the running ones updated) or eval mode (running statistics).
            with_features: Return ``forward_features``'s (logits, decoder features) instead of the logits.

        The network's mode is put back afterwards, so a student labelling in eval mode trains on.
        """
        was_training = network.training
        network.train(train)
        try:
            return network.forward_features(images) if with_features else network(images)
        finally:
            network.train(was_training)

    @torch.no_grad()
    def teacher_predict(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Teacher probabilities (B, C, H, W), confidences (B, H, W) and pseudo-labels (B, H, W)."""
        if self.teacher is None:
            raise RuntimeError(f"{type(self).__name__} has no teacher (uses_teacher = False)")
        with self.phase("teacher"):
            self.set_teacher_mode()
            logits = self.forward_in_mode(self.teacher, images, self.hparams.teacher_bn == "train")
            probs = logits.float().softmax(dim=1)
            confidences, pseudo_labels = probs.max(dim=1)
        return probs, confidences, pseudo_labels

    def gather_ranks(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """``tensors`` of every rank under DDP (`all_gather`: a new first dimension of size world_size), for
        statistics that must see the whole batch; as they are in a single process."""
        if self._trainer is None or self.trainer.world_size == 1:
            return tensors
        return tuple(self.all_gather(t) for t in tensors)

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        """A context that times what it encloses as phase ``name`` of the training step.

        It records only while a recorder is attached (``phase_recorder``, e.g. `src.callbacks.PhaseTimer`);
        otherwise it does nothing. Step timings show the phases of `src.pl_modules.timing.TIMED_PHASES`
        (``teacher``, ``mix+aug``, ``contrast``); a phase opened inside another pauses it.
        """
        recorder = self.phase_recorder
        return _NO_PHASE if recorder is None else recorder.timing(name)

    def supervised_loss(self, logits: Tensor, masks: Tensor) -> Tensor:
        """Mean cross-entropy over labeled pixels; 0 (graph kept) if a batch has none (sparse labels)."""
        # Sum over labeled pixels / their count (at least 1): the mean, without a host sync to test for none.
        total = F.cross_entropy(logits.float(), masks, ignore_index=self.ignore_index, reduction="sum")
        return total / (masks != self.ignore_index).sum().clamp(min=1)

    # ------------------------------------------------------------------ training
    @abstractmethod
    def compute_losses(self, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        """Losses of one step: ``"loss"`` is optimised, every entry is logged as ``train/<key>``."""

    def setup(self, stage: str) -> None:
        """Refuse, before training, a datamodule that has no unlabeled stream for a method that needs one."""
        datamodule = self.trainer.datamodule
        if stage == "fit" and self.uses_unlabeled and getattr(datamodule, "feeds_unlabeled", True) is False:
            raise ValueError(
                f"model {type(self).__name__} trains on unlabeled images, but data {type(datamodule).__name__} "
                "has no unlabeled stream; use data.class_path SemiSupervisedDataModule"
            )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 images from the loaders become float [0, 1] on the device (channels-last if asked)."""
        return _images_to_float(batch, self.hparams.channels_last)

    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> Tensor:
        losses = self.compute_losses(batch)
        batch_size = batch["labeled"]["image"].shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=batch_size)
        self.log_dict(
            {f"train/{k}": v.detach() for k, v in losses.items() if k != "loss"}, batch_size=batch_size
        )
        return losses["loss"]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.teacher is not None and self.teacher_update_before_step:
            self.update_teacher(int(self.global_step))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.teacher is not None and not self.teacher_update_before_step:
            # global_step counts optimizer steps already taken: the step just done is t = global_step - 1.
            self.update_teacher(int(self.global_step) - 1)

    @torch.no_grad()
    def update_teacher(self, step: int) -> None:
        """Move the teacher toward the student around training step ``step``: after it, or before it
        with ``teacher_update_before_step``. Here ReCo's EMA of the parameters, decay `ema_decay` (step)."""
        ema_update(self.teacher, self.student, ema_decay(step, self.hparams.ema_decay))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter the optimizer updates: all but the teacher's."""
        return [p for n, p in self.named_parameters() if not n.startswith("teacher.") and p.requires_grad]

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The trainable parameters as optimizer groups, ``{"params": [...], "lr_multiplier": m}``: each
        group learns at m times the optimizer's lr. Here one group; a method may split it (UniMatch V2)."""
        return [{"params": self.trainable_parameters(), "lr_multiplier": 1.0}]

    def configure_optimizers(self) -> dict[str, Any]:
        groups = self.parameter_groups()
        optimizer = self.optimizer_factory([{"params": group["params"]} for group in groups])
        for group, wanted in zip(optimizer.param_groups, groups):
            group["lr"] *= wanted["lr_multiplier"]  # before the scheduler takes it as the initial lr
        total = max(int(self.trainer.max_steps), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_factor(step, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_factor(self, step: int, total_steps: int) -> float:
        """The LR multiplier at optimizer step ``step`` of ``total_steps``: the poly schedule, floored."""
        progress = min(step, total_steps) / total_steps
        return max((1.0 - progress) ** self.hparams.lr_power, self.hparams.min_lr_ratio)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict_logits(self, network: nn.Module, images: Tensor) -> Tensor:
        """Logits for whole images, or by sliding window (window = crop, stride 2/3, softmax averaged)."""
        if self.hparams.eval_mode == "whole":
            return network(images)
        return sliding_window_logits(network, images, self.hparams.eval_window, self.num_classes)

    def on_validation_epoch_start(self) -> None:
        """Log the ``diag/`` scores of the pseudo-labels (`src.pl_modules.diagnostics`) before validating."""
        loader = self.diagnostic_loader()
        if loader is None:
            return
        batches = (self.on_after_batch_transfer(self.transfer_batch_to_device(b, self.device, 0), 0) for b in loader)
        with self.trainer.precision_plugin.forward_context():
            scores, preview = self.pseudo_label_diagnostics(batches)
        self.log_dict({f"diag/{name}": value for name, value in scores.items()}, sync_dist=True)
        if preview is not None and self._should_log_images():
            self._log_grid("diag/pseudo_labels", [preview])

    def diagnostic_loader(self) -> Iterable[dict[str, Tensor]] | None:
        """The datamodule's ``diagnostic_dataloader()`` for a method with an unlabeled loss, else None."""
        if not self.uses_unlabeled or self.trainer.sanity_checking:
            return None
        make_loader = getattr(self.trainer.datamodule, "diagnostic_dataloader", None)
        return make_loader() if make_loader is not None else None

    @torch.no_grad()
    def pseudo_label_diagnostics(
        self, batches: Iterable[dict[str, Tensor]]
    ) -> tuple[dict[str, float], tuple[Tensor, ...] | None]:
        """Scores of `pseudo_labels` against the ground truth of ``batches``, leaving training as it was.

        Every buffer (the teacher's BatchNorm statistics, C3's class thresholds), every module's
        mode and torch's random state are the same after the call as before it.

        Args:
            batches: Un-augmented images (float, on the device) with their ``mask`` (ground truth)
                and optionally ``valid`` (B, H, W) bool, False on batch padding.

        Returns:
            The scores by name (`diagnostic_scores`; empty without a batch) and, for the image grid,
            (images, pseudo-labels, confidence mask, ground truth) of the first ``num_log_images``
            images on the CPU (None without a batch).
        """
        totals: dict[str, Tensor] = {}
        shown: list[tuple[Tensor, ...]] = []
        n = self.hparams.num_log_images
        with training_state_kept(self, self.device):
            for batch in batches:
                images, targets = batch["image"], batch["mask"]
                valid = batch.get("valid", torch.ones_like(targets, dtype=torch.bool))
                pseudo_labels, confidence_mask = self.pseudo_labels(images)
                counts = pseudo_label_counts(
                    pseudo_labels, confidence_mask, targets, valid, self.num_classes, self.ignore_index
                )
                for name, count in counts.items():
                    totals[name] = totals[name] + count if name in totals else count
                room = n - sum(len(rows[0]) for rows in shown)
                if room > 0:
                    shown.append(tuple(t[:room].cpu() for t in (images, pseudo_labels, confidence_mask, targets)))
        preview = tuple(torch.cat(rows) for rows in zip(*shown)) if shown else None  # crops share one size
        return (diagnostic_scores(totals) if totals else {}), preview

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.evaluate_batch("val", batch, batch_idx)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.evaluate_batch("test", batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self.end_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self.end_evaluation("test")

    def evaluate_batch(self, stage: str, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Add an evaluation batch of ``stage`` (``val`` or ``test``) to its scores.

        Here the mIoU's confusion matrices: of every network at validation, of the reported one at
        test; with ``eval_scores``, the means of `score_batch`'s scores.
        """
        if self.eval_scores:
            images = batch["image"]
            scores, rows = self.score_batch(images, batch_idx)
            for key, mean in self.score_means[stage].items():
                mean.update(scores[key], weight=images.shape[0])
            if stage == "val" and batch_idx == 0 and self._should_log_images():
                n = self.hparams.num_log_images
                self._val_preview = [tuple(row[:n].float().cpu() for row in rows)]
            return
        images, masks = batch["image"], batch["mask"]
        if stage == "test":
            self.test_confusion.update(self.predict_logits(self.eval_network(), images).argmax(dim=1), masks)
            return
        reported = "teacher" if self.eval_network() is self.teacher else "student"
        for role, confusion in self.val_confusions.items():
            predictions = self.predict_logits(getattr(self, role), images).argmax(dim=1)
            confusion.update(predictions, masks)
            if role == reported and batch_idx == 0 and self._should_log_images():
                n = self.hparams.num_log_images
                self._val_preview = [(images[:n].cpu(), masks[:n].cpu(), predictions[:n].cpu())]
        if self.uses_representation and self._should_log_images():
            # The head embeds the student's features; one more student pass, at image-grid validations only.
            sums, counts = prototype_sums(
                self.student, self.rep_head, images, masks, self.num_classes, self.ignore_index
            )
            if self._val_prototypes is not None:
                sums, counts = sums + self._val_prototypes[0], counts + self._val_prototypes[1]
            self._val_prototypes = (sums, counts)

    def end_evaluation(self, stage: str) -> None:
        """Log the scores of ``stage`` at the end of its loop and reset them.

        Here mIoU, pixel accuracy and per-class IoU, and after a validation (not the sanity check)
        its entry in ``val_history``, the best mIoU and the image grid; with ``eval_scores``,
        `end_scores`.
        """
        if self.eval_scores:
            self.end_scores(stage)
            return
        if stage == "test":
            iou, accuracy = iou_from_confusion(self.test_confusion.compute())
            self.test_confusion.reset()
            self.log("test/miou", _mean_iou(iou))
            self.log("test/pixel_acc", float(accuracy) * 100)
            self.log_dict({f"test/iou/{name}": v * 100 for name, v in zip(self.class_names, iou.nan_to_num(0.0).tolist())})
            self.last_test_iou = iou
            return
        scores = {}
        for role, confusion in self.val_confusions.items():
            scores[role] = iou_from_confusion(confusion.compute())
            confusion.reset()
        if self.trainer.sanity_checking:
            return
        reported = "teacher" if self.eval_network() is self.teacher else "student"
        iou, accuracy = scores[reported]
        miou = _mean_iou(iou)
        self._num_validations += 1
        # One entry per step: validating a restored checkpoint again replaces its step's entry.
        step = int(self.global_step)
        self.val_history = [entry for entry in self.val_history if entry[0] != step] + [(step, miou)]
        if math.isnan(self.best_miou) or miou > self.best_miou:
            self.best_miou, self.best_step = miou, int(self.global_step)
        self.log("val/miou", miou, prog_bar=True)
        self.log("val/miou_best", self.best_miou)
        self.log("val/pixel_acc", float(accuracy) * 100)
        if self.teacher is not None:
            self.log_dict({f"val/miou_{role}": _mean_iou(role_iou) for role, (role_iou, _) in scores.items()})
        self.log_dict({f"val/iou/{name}": v * 100 for name, v in zip(self.class_names, iou.nan_to_num(0.0).tolist())})
        self.last_val_iou = iou
        if self._val_preview:
            rows = list(self._val_preview)
            example = getattr(self, "_train_example", None)
            if example is not None:  # unlabeled image | pseudo-label | student prediction
                rows.append((example[0].cpu(), example[1].cpu(), example[2].argmax(dim=1).cpu()))
            self._log_grid(self.preview_tag, rows)
            self._val_preview = []
        if self._val_prototypes is not None:
            sums, counts = (self.trainer.strategy.reduce(t, reduce_op="sum") for t in self._val_prototypes)
            self._val_prototypes = None
            if self.trainer.is_global_zero:
                similarity = prototype_similarity(sums, counts)
                figure = relation_figure(similarity, self.class_names, f"step {self.global_step}")
                self.logger.experiment.add_figure("val/class_relations", figure, self.global_step)

    def end_scores(self, stage: str) -> None:
        """Log the means of ``eval_scores`` as ``<stage>/<name>`` and reset them.

        After a validation (not the sanity check) also the best of the first score so far
        (``val/<first>_best``, at ``best_step``) and the image grid: one row per image tensor.
        """
        scores = {key: mean.compute() for key, mean in self.score_means[stage].items()}
        for mean in self.score_means[stage].values():
            mean.reset()
        if stage == "test":
            self.log_dict({f"test/{key}": value for key, value in scores.items()})
            return
        if self.trainer.sanity_checking:
            return
        self._num_validations += 1
        monitored, *others = self.eval_scores
        if float(scores[monitored]) < self.best_score:
            self.best_score, self.best_step = float(scores[monitored]), int(self.global_step)
        self.log(f"val/{monitored}", scores[monitored], prog_bar=True)
        self.log_dict({**{f"val/{key}": scores[key] for key in others}, f"val/{monitored}_best": self.best_score})
        if self._val_preview:
            from torchvision.utils import make_grid

            rows = self._val_preview[0]
            grid = make_grid(torch.cat(rows), nrow=len(rows[0]), padding=2, pad_value=1.0)
            self.logger.experiment.add_image(self.preview_tag, grid, self.global_step)
            self._val_preview = []

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.predict_logits(self.eval_network(), batch["image"]).argmax(dim=1)

    # ------------------------------------------------------------------ logging helpers
    def remember_unlabeled(self, images: Tensor, pseudo_labels: Tensor, logits: Tensor) -> None:
        """Keep one unlabeled image, its pseudo-label and the student's logits for the image grid.

        Only references are kept (no copy, no device sync); they are coloured at logging time.
        """
        if self.hparams.log_images_every_n_val > 0:
            self._train_example = (images[:1].detach(), pseudo_labels[:1].detach(), logits[:1].detach())


    def _should_log_images(self) -> bool:
        every = self.hparams.log_images_every_n_val
        logger = self.logger
        return (
            every > 0
            and logger is not None
            and hasattr(logger.experiment, "add_image")
            and not self.trainer.sanity_checking
            and self._num_validations % every == 0
        )

    def _log_grid(self, tag: str, rows: list[tuple[Tensor, ...]]) -> None:
        grid = prediction_grid(rows, self.num_classes, self.ignore_index)
        self.logger.experiment.add_image(tag, grid, self.global_step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["method"] = self.name
        checkpoint["best_miou"] = self.best_miou
        checkpoint["best_step"] = self.best_step
        if self.eval_scores:
            checkpoint[f"best_val_{self.eval_scores[0]}"] = self.best_score
        checkpoint["num_validations"] = self._num_validations
        checkpoint["val_history"] = [list(entry) for entry in self.val_history]
        last_iou = getattr(self, "last_val_iou", None)
        checkpoint["last_val_iou"] = None if last_iou is None else last_iou.tolist()
        # What a run that resumes from this checkpoint and has nothing left to train reports.
        checkpoint["metrics"] = scalar_metrics(self.trainer.callback_metrics)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.best_miou = checkpoint.get("best_miou", float("nan"))
        self.best_step = checkpoint.get("best_step", -1)
        if self.eval_scores:
            self.best_score = checkpoint.get(f"best_val_{self.eval_scores[0]}", math.inf)
        self._num_validations = checkpoint.get("num_validations", 0)
        self.val_history = [(int(step), float(miou)) for step, miou in checkpoint.get("val_history", [])]
        if checkpoint.get("last_val_iou") is not None:
            self.last_val_iou = torch.tensor(checkpoint["last_val_iou"], dtype=torch.float64)
        self.checkpoint_metrics = dict(checkpoint.get("metrics", {}))


def load_matching(network: nn.Module, checkpoint_path: str) -> list[str]:
    """Copy every parameter/buffer of a checkpoint's student whose name and shape match ``network``.

    Accepts a Lightning checkpoint of any method (its ``student.*`` entries), e.g. a reconstruction
    pretraining run's, or a bare state dict. Tensors of ``network`` left as initialised are listed in
    one warning, split into those of another shape (e.g. the output layer: 3 RGB channels vs C
    classes, with both shapes) and those the checkpoint lacks; unused checkpoint tensors are counted.
    Returns the names left as initialised. Raises ``ValueError`` when nothing matches (another
    architecture or encoder).
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise ValueError(f"model.init_from={checkpoint_path!r}: no such checkpoint file")
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state)
    prefix = "student."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = network.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not any(v.ndim > 0 for v in matching.values()):  # BatchNorm's scalar step counters match any network
        raise ValueError(
            f"model.init_from={checkpoint_path!r}: no tensor matches this network by name and shape "
            "(was it trained with another arch or encoder_name?)"
        )
    network.load_state_dict(matching, strict=False)
    reshaped = sorted(k for k in own if k in state and k not in matching)
    missing = sorted(k for k in own if k not in state)
    unused = [k for k in state if k not in own]
    if reshaped or missing or unused:
        parts = [f"copied {len(matching)} of {len(own)} tensors"]
        if reshaped:
            shapes = (f"{k} {tuple(state[k].shape)} -> {tuple(own[k].shape)}" for k in reshaped)
            parts.append(f"{len(reshaped)} of another shape, left as initialised: {', '.join(shapes)}")
        if missing:
            parts.append(f"{len(missing)} not in the checkpoint, left as initialised: {', '.join(missing)}")
        if unused:
            parts.append(f"{len(unused)} checkpoint tensors unused (e.g. {', '.join(unused[:3])})")
        warnings.warn(f"model.init_from={checkpoint_path}: " + "; ".join(parts), stacklevel=2)
    return sorted(reshaped + missing)


def _mean_iou(iou: Tensor) -> float:
    """Mean over classes present in GT or prediction, in percent (0 if none is)."""
    return 0.0 if torch.isnan(iou).all() else float(torch.nanmean(iou)) * 100


def _images_to_float(batch: Any, channels_last: bool = False) -> Any:
    if isinstance(batch, dict):
        return {k: _image_to_float(v, channels_last) if k == "image" else _images_to_float(v, channels_last)
                for k, v in batch.items()}
    return batch


def _image_to_float(images: Tensor, channels_last: bool) -> Tensor:
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


@torch.no_grad()
def sliding_window_logits(network: nn.Module, images: Tensor, window: int, num_classes: int) -> Tensor:
    """Average of softmax scores over windows of side ``window`` with stride ceil(2/3 window).

    Images smaller than the window are predicted whole. Returns (B, C, H, W) scores.
    """
    batch, _, height, width = images.shape
    if height <= window and width <= window:
        return network(images)
    stride = math.ceil(window * 2 / 3)
    scores = images.new_zeros(batch, num_classes, height, width)
    counts = images.new_zeros(1, 1, height, width)
    win_h, win_w = min(window, height), min(window, width)
    tops = list(range(0, max(height - win_h, 0) + 1, stride))
    lefts = list(range(0, max(width - win_w, 0) + 1, stride))
    # The last window is flush with the border so every pixel is covered.
    if tops[-1] != height - win_h:
        tops.append(height - win_h)
    if lefts[-1] != width - win_w:
        lefts.append(width - win_w)
    for top in tops:
        for left in lefts:
            crop = images[:, :, top : top + win_h, left : left + win_w]
            scores[:, :, top : top + win_h, left : left + win_w] += network(crop).float().softmax(dim=1)
            counts[:, :, top : top + win_h, left : left + win_w] += 1
    return scores / counts
