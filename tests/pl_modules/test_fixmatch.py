import pytest
import torch

import src.pl_modules.fixmatch as fixmatch
from src.pl_modules import FixMatch, UniMatch
from tests.pl_modules.method_tester import TeacherFreeTester, make_batch, tiny_kwargs


class TestFixMatch(TeacherFreeTester):
    method_cls = FixMatch


@pytest.mark.parametrize("method_cls", [FixMatch, UniMatch])
def test_threshold_one_silences_the_unlabeled_loss(method_cls):
    torch.manual_seed(0)
    losses = method_cls(**tiny_kwargs(), confidence_threshold=1.0).compute_losses(make_batch())
    assert losses["loss_unsup"].item() == 0 and losses["mask_ratio"].item() == 0
    assert torch.allclose(losses["loss"], losses["loss_sup"] / 2)


def test_unlabeled_loss_is_the_strong_views_term_alone():
    module = FixMatch(**tiny_kwargs())
    loss_strong = torch.tensor(0.7)
    assert module.unlabeled_loss(loss_strong, None, ()) == (loss_strong, {})
    assert "fp_weight" not in module.hparams


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
    for bad in ({"confidence_threshold": 1.5}, {"cutmix_p": -0.1}, {"mix_source": "other"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FixMatch(**tiny_kwargs(), **bad)
