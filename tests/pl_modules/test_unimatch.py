import pytest
import torch

from src.pl_modules import FixMatch, UniMatch
from tests.pl_modules.method_tester import TeacherFreeTester, make_batch, tiny_kwargs


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


def test_fp_weight_shares_the_unlabeled_loss_between_strong_views_and_perturbed_stream():
    logged = []
    for fp_weight in (0.0, 1.0, 0.25):
        torch.manual_seed(0)
        losses = UniMatch(**tiny_kwargs(), confidence_threshold=0.0, fp_weight=fp_weight).compute_losses(make_batch())
        logged.append(losses)
    only_strong, only_fp, mixed = logged
    assert only_strong["loss_unsup"] == only_strong["loss_strong"] and only_fp["loss_unsup"] == only_fp["loss_fp"]
    assert only_strong["loss_fp"] > 0 and only_strong["loss_strong"] > 0  # both terms count (threshold 0)
    assert torch.allclose(mixed["loss_unsup"], 0.75 * mixed["loss_strong"] + 0.25 * mixed["loss_fp"])


def test_options_are_validated():
    for bad in ({"fp_dropout": 1.0}, {"fp_weight": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            UniMatch(**tiny_kwargs(), **bad)
