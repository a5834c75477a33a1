"""The contract every method's test inherits (smp's BaseModelTester pattern).

A method's test sets ``method_cls`` (and ``init_kwargs`` if needed) and adds 1-3 checks of its own.
"""

from __future__ import annotations

import copy

import pytest
import torch

from src.pl_modules import SemiSupervisedModule
from src.pl_modules.ops import ema_decay, ema_update
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


class MethodTester:
    method_cls: type[SemiSupervisedModule]
    init_kwargs: dict = {}
    # Options under which a random teacher's pseudo-labels count in the unlabeled loss.
    permissive_kwargs: dict = {"strong_threshold": 0.0}

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

    def test_ema_step(self):
        module = self.make()
        if module.teacher is None:
            pytest.skip("method has no teacher")
        module.trainer = None
        before = copy.deepcopy(module.teacher.state_dict())
        with torch.no_grad():
            for p in module.student.parameters():
                p.add_(1.0)
        decay = ema_decay(50, module.hparams.ema_decay)
        ema_update(module.teacher, module.student, decay)
        student = module.student.state_dict()
        for (name, param) in module.teacher.named_parameters():
            expected = decay * before[name] + (1 - decay) * student[name]
            assert torch.allclose(param, expected, atol=1e-6), name

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
