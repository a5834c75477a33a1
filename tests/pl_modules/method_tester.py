"""The contract every method's test inherits (smp's BaseModelTester pattern).

A method's test sets ``method_cls`` (and ``init_kwargs`` if needed) and adds 1-3 checks of its own.
"""

from __future__ import annotations

import copy
import json

import pytest
import pytorch_lightning as pl
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor
from torch.utils.data import DataLoader

from src.pl_modules import SemiSupervisedModule
from src.pl_modules.diagnostics import DIAGNOSTICS
from src.train import main
from tests.conftest import smoke_args
from tests.pl_modules.plain_ops import use_plain_ops

NUM_CLASSES = 3


def tiny_kwargs() -> dict:
    return dict(
        num_classes=NUM_CLASSES,
        arch="DeepLabV3Plus",
        encoder_name="tu-test_resnet",
        model_options={"decoder_channels": 32},
        representation_dim=16,
        scale_range=(0.8, 1.2),
    )


def make_batch(seed: int = 0, partial: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    masks_l = torch.randint(0, NUM_CLASSES, (2, 32, 32), generator=g)
    masks_l[:, :4] = 255
    batch = {
        "labeled": {"image": torch.rand(2, 3, 32, 32, generator=g), "mask": masks_l},
        "unlabeled": {"image": torch.rand(2, 3, 32, 32, generator=g)},
    }
    if partial:
        sparse = torch.full((2, 32, 32), 255, dtype=torch.long)
        sparse[:, 10, 10] = 1
        batch["unlabeled"]["mask"] = sparse
    return batch


def losses_and_grads(module: SemiSupervisedModule, batch: dict) -> tuple[dict, list]:
    """One step's losses (detached) and the student's gradients, the step's draws seeded."""
    torch.manual_seed(1)
    losses = module.compute_losses(batch)
    losses["loss"].backward()
    grads = [p.grad for p in module.student.parameters() if p.grad is not None]
    return {k: v.detach() for k, v in losses.items()}, grads


class FixedLabeller(torch.nn.Module):
    """A stand-in teacher (or student) whose logits are fixed, whatever the images."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, images: Tensor) -> Tensor:
        return self.logits

    def forward_features(self, images: Tensor) -> tuple[Tensor, None]:
        return self.logits, None


def labeller_of(probs: Tensor) -> FixedLabeller:
    """A labeller whose softmax is ``probs`` (B, C, H, W)."""
    return FixedLabeller(probs.log())


def probabilities(labels: Tensor, confidences: Tensor) -> Tensor:
    """(B, C, H, W) probabilities: ``confidences`` on ``labels``, the rest shared by the other classes."""
    one_hot = torch.nn.functional.one_hot(labels, NUM_CLASSES).permute(0, 3, 1, 2).float()
    rest = ((1 - confidences) / (NUM_CLASSES - 1)).unsqueeze(1)
    return one_hot * confidences.unsqueeze(1) + (1 - one_hot) * rest


class MethodTester:
    method_cls: type[SemiSupervisedModule]
    init_kwargs: dict = {}
    # Options under which a random teacher's pseudo-labels count in the unlabeled loss.
    permissive_kwargs: dict = {"strong_threshold": 0.0}
    # Options that make the method's confidence rule "confidence >= 0.6" (the hand-counted test).
    threshold_kwargs: dict = {"strong_threshold": 0.6}

    def make_with_labeller(self, labeller: torch.nn.Module, **kwargs) -> SemiSupervisedModule:
        """The method with ``labeller`` as its pseudo-labelling network (teacher and student)."""
        module = self.make(**kwargs)
        module.student = labeller
        if module.teacher is not None:
            module.teacher = labeller
        return module

    def make(self, **kwargs) -> SemiSupervisedModule:
        torch.manual_seed(0)
        return self.method_cls(**{**tiny_kwargs(), **self.init_kwargs, **kwargs})

    def test_losses_are_finite_scalars(self):
        module = self.make()
        losses = module.compute_losses(make_batch())
        assert "loss" in losses and losses["loss"].requires_grad
        for key, value in losses.items():
            assert value.ndim == 0 and torch.isfinite(value), key

    def test_channels_last_reaches_every_convolution(self):
        # The default format: every network and head the method builds, its teacher's included
        # (1x1 kernels have one layout in both formats; their outputs follow their inputs').
        module = self.make()
        convs = [(name, m) for name, m in module.named_modules() if isinstance(m, torch.nn.Conv2d)]
        assert any(conv.kernel_size != (1, 1) for _, conv in convs)
        for name, conv in convs:
            assert conv.weight.is_contiguous(memory_format=torch.channels_last), name

    def test_channels_last_gives_the_same_step(self):
        # The default format changes no loss and no gradient beyond float rounding. No ASPP dropout:
        # its elementwise mask is drawn in memory order (UniMatch's channel dropout is not).
        options = {**tiny_kwargs()["model_options"], "decoder_aspp_dropout": 0.0}
        results = []
        for channels_last in (False, True):
            module = self.make(**self.permissive_kwargs, model_options=options, channels_last=channels_last)
            results.append(losses_and_grads(module, module.on_after_batch_transfer(make_batch(3), 0)))
        (plain, plain_grads), (last, last_grads) = results
        assert plain.keys() == last.keys()
        for key in plain:
            torch.testing.assert_close(last[key], plain[key], rtol=1e-4, atol=1e-5, msg=key)
        # The convolutions' backward sums in another order: a few near-zero entries differ by 1e-5
        # (relative 0.05); as whole tensors the gradients agree to 1e-3 (2.5e-4 seen), a layout bug is O(1).
        assert len(last_grads) == len(plain_grads) > 0
        for i, (a, b) in enumerate(zip(last_grads, plain_grads)):
            assert float((a - b).norm()) <= 1e-3 * float(b.norm()) + 1e-8, f"parameter {i}"

    def test_same_step_with_the_plain_reference_ops(self, monkeypatch):
        # The vectorised ops (no loops, no host syncs, the dense ReCo matmul) change no loss and
        # no gradient: the same step on the same seed with plain per-image / per-anchor versions.
        batch = make_batch(3)

        def step():
            return losses_and_grads(self.make(**self.permissive_kwargs), batch)

        fast, fast_grads = step()
        calls = use_plain_ops(monkeypatch)
        plain, plain_grads = step()
        if not calls:
            pytest.skip(f"{self.method_cls.name} uses none of the vectorised ops")
        assert fast.keys() == plain.keys()
        for key in fast:
            torch.testing.assert_close(fast[key], plain[key], rtol=1e-4, atol=1e-6, msg=key)
        assert len(fast_grads) == len(plain_grads) > 0
        for a, b in zip(fast_grads, plain_grads):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)

    def test_partial_labels_batch(self):
        losses = self.make().compute_losses(make_batch(partial=True))
        assert torch.isfinite(losses["loss"])

    def test_student_gets_gradients_teacher_none(self):
        module = self.make()
        module.compute_losses(make_batch())["loss"].backward()
        grads = [p.grad for p in module.student.parameters()]
        assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
        if module.teacher is not None:
            assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())

    def test_optimizer_excludes_teacher(self):
        module = self.make()
        module.trainer = type("T", (), {"max_steps": 10})()
        optimizer = module.configure_optimizers()["optimizer"]
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert all(id(p) in in_optimizer for p in module.student.parameters())
        if module.teacher is not None:
            assert not any(id(p) in in_optimizer for p in module.teacher.parameters())

    def test_unlabeled_loss_alone_moves_the_student(self):
        if not self.method_cls.uses_unlabeled:
            pytest.skip("method has no unlabeled loss")
        module = self.make(**self.permissive_kwargs)
        if not module.uses_unlabeled:
            pytest.skip("method has no unlabeled loss")
        # The teacher differs from the student, as it does after a few steps.
        with torch.no_grad():
            for p in module.teacher.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        batch = make_batch(1)
        batch["labeled"]["mask"].fill_(255)  # no labeled pixel: the supervised terms are exactly 0
        losses = module.compute_losses(batch)
        assert losses["loss_sup"].item() == 0 and losses["loss_unsup"].item() > 0
        losses["loss"].backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student.parameters())

    def test_ema_step(self, tmp_path):
        # Two real training steps through Lightning: the teacher's last update, after the last step
        # (or before it, for a method that updates its teacher before each step), is one EMA step
        # with decay ema_decay(1) = 0.5 from the teacher before it toward the student.
        module = self.make()
        if module.teacher is None:
            pytest.skip("method has no teacher")

        class Snapshot(pl.Callback):  # callbacks' hooks run before the module's
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                self.teacher = {n: p.detach().clone() for n, p in pl_module.teacher.named_parameters()}
                self.student = {n: p.detach().clone() for n, p in pl_module.student.named_parameters()}

        snapshot = Snapshot()
        trainer = pl.Trainer(
            max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[snapshot],
            default_root_dir=tmp_path,
        )
        trainer.fit(module, train_dataloaders=DataLoader([make_batch(seed) for seed in range(2)], batch_size=None))
        assert trainer.global_step == 2
        student = snapshot.student if module.teacher_update_before_step else dict(module.student.named_parameters())
        moved = 0
        for name, param in module.teacher.named_parameters():
            expected = 0.5 * snapshot.teacher[name] + 0.5 * student[name]
            assert torch.allclose(param, expected, atol=1e-6), name
            moved += not torch.equal(param, snapshot.teacher[name])
        assert moved > 0

    def test_teacher_bn_mode_holds(self):
        for mode in ("train", "eval"):
            module = self.make(teacher_bn=mode)
            if module.teacher is None:
                pytest.skip("method has no teacher")
            module.eval()  # what Lightning does for validation
            module.teacher_predict(torch.rand(2, 3, 32, 32))
            bn = [m for m in module.teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
            assert all(m.training == (mode == "train") for m in bn)

    def test_short_fit_logs_val_miou(self, tmp_path):
        cli = main(["fit", *smoke_args(self.method_cls.name, tmp_path)])
        metrics = cli.trainer.callback_metrics
        assert "val/miou" in metrics and 0 <= float(metrics["val/miou"]) <= 100
        for key in ("train/loss", "train/loss_sup"):
            assert torch.isfinite(metrics[key]), key
        if cli.model.teacher is not None:
            assert "val/miou_teacher" in metrics and "val/miou_student" in metrics
        summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
        diagnostics = {k: v for k, v in summary.items() if k.startswith("diag_")}
        # 32 px smoke scenes: tiles enlarged 4x to 128 px; 4 validation images (and a training example
        # once the method has trained on unlabeled images).
        images = EventAccumulator(str(tmp_path / "run"), size_guidance={"images": 0}).Reload().Images
        shown = images("val/predictions")[0]
        assert shown.width == 3 * 128 and shown.height in (4 * 128, 5 * 128)
        if not cli.model.uses_unlabeled:
            assert diagnostics == {} and not any(k.startswith("diag/") for k in metrics)
            return
        assert set(diagnostics) == {f"diag_{name}" for name in DIAGNOSTICS}
        assert 0 <= diagnostics["diag_pseudo_acc"] <= 1 and 0 <= diagnostics["diag_mask_ratio"] <= 1
        assert diagnostics["diag_pseudo_acc"] == pytest.approx(float(metrics["diag/pseudo_acc"]))
        # image | pseudo-label | confidence mask | ground truth of the first 4 diagnostic images.
        pseudo_labels = images("diag/pseudo_labels")[0]
        assert (pseudo_labels.height, pseudo_labels.width) == (4 * 128, 4 * 128)

    # ------------------------------------------------------------------ pseudo-label diagnostics
    def test_diagnostics_of_a_labeller_that_outputs_the_ground_truth(self):
        if not self.method_cls.uses_unlabeled:
            pytest.skip("method makes no pseudo-labels")
        targets = torch.randint(0, NUM_CLASSES, (2, 8, 8), generator=torch.Generator().manual_seed(0))
        logits = 30.0 * torch.nn.functional.one_hot(targets, NUM_CLASSES).permute(0, 3, 1, 2).float()
        targets[:, 0] = 255  # unknown ground truth counts nowhere
        module = self.make_with_labeller(FixedLabeller(logits))
        scores, _ = module.pseudo_label_diagnostics([{"image": torch.rand(2, 3, 8, 8), "mask": targets}])
        assert scores == {"pseudo_acc": 1.0, "pseudo_miou": 100.0, "mask_ratio": 1.0, "mask_acc": 1.0}

    def test_diagnostics_count_the_confidence_mask_by_hand(self):
        if not self.method_cls.uses_unlabeled:
            pytest.skip("method makes no pseudo-labels")
        labels = torch.tensor([[[0, 1, 2], [2, 1, 0]], [[1, 1, 0], [0, 2, 2]]])
        confidences = torch.tensor([[[0.9, 0.5, 0.7], [0.65, 0.4, 0.95]], [[0.35, 0.99, 0.61], [0.8, 0.55, 0.9]]])
        targets = torch.tensor([[[0, 1, 1], [2, 255, 0]], [[0, 1, 0], [0, 2, 2]]])
        valid = torch.ones_like(targets, dtype=torch.bool)
        valid[1, :, 2] = False  # batch padding of a narrower second image
        module = self.make_with_labeller(labeller_of(probabilities(labels, confidences)), **self.threshold_kwargs)
        batch = {"image": torch.rand(2, 3, 2, 3), "mask": targets, "valid": valid}
        scores, (images, shown_labels, shown_mask, shown_targets) = module.pseudo_label_diagnostics([batch])
        # Confident (>= 0.6) image pixels: 0.9, 0.7, 0.65, 0.95 in the first image, 0.99, 0.8 in the
        # second: 6 of 10. Labelled: 9 pixels, 7 right; 6 of them confident, 5 right.
        assert scores["mask_ratio"] == pytest.approx(6 / 10)
        assert scores["pseudo_acc"] == pytest.approx(7 / 9)
        assert scores["mask_acc"] == pytest.approx(5 / 6)
        assert torch.equal(shown_labels, labels) and torch.equal(shown_mask, confidences >= 0.6)
        assert torch.equal(shown_targets, targets)

    def test_diagnostics_leave_the_training_state_as_it_was(self):
        if not self.method_cls.uses_unlabeled:
            pytest.skip("method makes no pseudo-labels")
        module = self.make(teacher_bn="train")
        module.eval()  # as Lightning leaves it for validation
        batch = {"image": torch.rand(2, 3, 32, 32), "mask": torch.randint(0, NUM_CLASSES, (2, 32, 32))}
        state = copy.deepcopy(module.state_dict())
        modes = [m.training for m in module.modules()]
        rng = torch.get_rng_state()
        scores, _ = module.pseudo_label_diagnostics([batch])
        assert set(scores) == set(DIAGNOSTICS) and 0 <= scores["mask_ratio"] <= 1
        assert torch.equal(torch.get_rng_state(), rng)
        assert [m.training for m in module.modules()] == modes
        for name, value in module.state_dict().items():
            assert torch.equal(value, state[name]), name
        if module.teacher is not None:
            # Unprotected, the same rule moves the train-mode teacher's statistics and draws
            # dropout masks: what the diagnostics must undo.
            module.pseudo_labels(batch["image"])
            assert not torch.equal(torch.get_rng_state(), rng)
            moved = [k for k, v in module.state_dict().items() if k.startswith("teacher.") and not torch.equal(v, state[k])]
            assert any("running_mean" in k for k in moved)


class TeacherFreeTester(MethodTester):
    """The contract for methods whose student labels for itself (FixMatch, UniMatch)."""

    permissive_kwargs = {"confidence_threshold": 0.0}
    threshold_kwargs = {"confidence_threshold": 0.6}

    def test_unlabeled_loss_alone_moves_the_student(self):
        # The contract's version perturbs a teacher; here the weak and strong views already differ.
        module = self.make(**self.permissive_kwargs)
        assert module.teacher is None
        batch = make_batch(1)
        batch["labeled"]["mask"].fill_(255)
        losses = module.compute_losses(batch)
        assert losses["loss_sup"].item() == 0 and losses["loss_unsup"].item() > 0
        losses["loss"].backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student.parameters())
