import torch

from src.pl_modules import Supervised
from tests.pl_modules.method_tester import MethodTester, make_batch


class TestSupervised(MethodTester):
    permissive_kwargs: dict = {"reco_weight": 1.0}  # no pseudo-labels; the ReCo term exercises reco_loss
    method_cls = Supervised


def test_perfect_prediction_gives_near_zero_loss():
    module = Supervised(num_classes=3, encoder_name="tu-test_resnet", model_options={"decoder_channels": 32})
    masks = torch.randint(0, 3, (2, 8, 8))
    perfect = torch.nn.functional.one_hot(masks, 3).permute(0, 3, 1, 2).float() * 50
    wrong = torch.roll(perfect, 1, dims=1)
    assert module.supervised_loss(perfect, masks) < 1e-6 < module.supervised_loss(wrong, masks)


def test_reco_can_be_added_to_supervised():
    module = Supervised(num_classes=3, encoder_name="tu-test_resnet", model_options={"decoder_channels": 32},
                        representation_dim=16, reco_weight=1.0, reco_options={"num_queries": 8, "num_negatives": 4})
    assert module.rep_head is not None
    losses = module.compute_losses(make_batch())
    assert "loss_reco" in losses and torch.isfinite(losses["loss_reco"])
    losses["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.rep_head.parameters())
