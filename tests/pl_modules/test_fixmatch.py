import pytest
import torch
import torch.nn.functional as F

import src.pl_modules.fixmatch as fixmatch
from src.pl_modules import FixMatch, UniMatch
from src.pl_modules.fixmatch import cutmix_boxes, thresholded_ce
from tests.pl_modules.method_tester import MethodTester, make_batch, tiny_kwargs


class TeacherFreeTester(MethodTester):
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


class TestFixMatch(TeacherFreeTester):
    method_cls = FixMatch


class TestUniMatch(TeacherFreeTester):
    method_cls = UniMatch


def test_feature_perturbation_only_in_the_perturbed_stream():
    module = UniMatch(**tiny_kwargs()).eval()  # eval: BN and smp's own dropout are deterministic
    g = torch.Generator().manual_seed(0)
    images_l, images_w = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        logits_l, logits_w, logits_fp = module.forward_labeled_and_weak(images_l, images_w)
        assert torch.allclose(logits_l, module.student(images_l), atol=1e-5)
        assert torch.allclose(logits_w, module.student(images_w), atol=1e-5)
        assert (logits_fp - logits_w).abs().max() > 1e-3
        module.hparams.fp_dropout = 0.0  # no dropout: the perturbed stream is the clean one
        assert torch.allclose(module.forward_labeled_and_weak(images_l, images_w)[2], logits_w, atol=1e-5)
    assert FixMatch(**tiny_kwargs()).forward_labeled_and_weak(images_l, images_w)[2] is None


def test_pixels_under_the_threshold_contribute_nothing():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 3, (2, 8, 8), generator=g)
    confidences = torch.rand(2, 8, 8, generator=g)
    valid = torch.rand(2, 8, 8, generator=g) > 0.2
    loss = thresholded_ce(logits, labels, confidences, valid, threshold=0.5)
    loss.backward()
    kept = valid & (confidences >= 0.5)
    assert 0 < kept.sum() < valid.sum()
    # Denominator: every valid pixel, confident or not (METHODS.md 8 step 5).
    expected = F.cross_entropy(logits, labels, reduction="none")[kept].sum() / valid.sum()
    assert torch.allclose(loss, expected)
    grad_per_pixel = logits.grad.abs().sum(1)
    assert (grad_per_pixel[~kept] == 0).all() and (grad_per_pixel[kept] > 0).all()
    with torch.no_grad():  # changing the ignored pixels' logits leaves the loss unchanged
        changed = torch.where(kept.unsqueeze(1), logits, torch.randn_like(logits) * 10)
        assert torch.equal(thresholded_ce(changed, labels, confidences, valid, 0.5), loss.detach())
    nothing_valid = thresholded_ce(logits, labels, confidences, torch.zeros_like(valid), 0.5)
    assert nothing_valid.item() == 0 and nothing_valid.requires_grad


@pytest.mark.parametrize("method_cls", [FixMatch, UniMatch])
def test_threshold_one_silences_the_unlabeled_loss(method_cls):
    torch.manual_seed(0)
    losses = method_cls(**tiny_kwargs(), confidence_threshold=1.0).compute_losses(make_batch())
    assert losses["loss_unsup"].item() == 0 and losses["mask_ratio"].item() == 0
    assert torch.allclose(losses["loss"], losses["loss_sup"] / 2)


def test_cutmix_boxes_follow_the_reference_ranges():
    g = torch.Generator().manual_seed(0)
    boxes = cutmix_boxes(400, 32, 48, g, p=1.0)
    area = boxes.flatten(1).sum(1).double() / (32 * 48)
    assert boxes.any(1).any(1).all() and area.max() <= 0.4 and area.min() > 0.005
    rows, cols = boxes.any(2).sum(1), boxes.any(1).sum(1)
    assert torch.equal(rows * cols, boxes.flatten(1).sum(1))  # each mask is one rectangle
    assert not cutmix_boxes(50, 32, 32, g, p=0.0).any()
    half = cutmix_boxes(400, 32, 32, g, p=0.5).flatten(1).any(1).float().mean()
    assert 0.4 < half < 0.6
    assert cutmix_boxes(4, 2, 512, g, p=1.0).any(1).any(1).all()  # no box can fit: clamped, no endless loop


def test_batch_mix_pastes_the_partners_strong_view(monkeypatch):
    monkeypatch.setattr(fixmatch, "strong_photometric", lambda images: images)
    module = UniMatch(**{**tiny_kwargs(), "scale_range": (1.0, 1.0)}, cutmix_p=1.0, mix_source="batch")
    views = module.make_views(make_batch()["unlabeled"])
    partner = torch.roll(views.weak, -1, dims=0)
    for strong, box in zip(views.strong, views.boxes):
        assert box.any() and not box.all()
        assert torch.equal(strong, torch.where(box.unsqueeze(1), partner, views.weak))
    assert views.mix is None and views.valid_w.all()  # scale 1: nothing padded


def test_options_are_validated():
    for bad in ({"confidence_threshold": 1.5}, {"cutmix_p": -0.1}, {"mix_source": "other"}, {"fp_dropout": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            UniMatch(**tiny_kwargs(), **bad)
