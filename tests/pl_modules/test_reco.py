import torch

from src.pl_modules import ReCo
from src.pl_modules.reco import labeled_reco_targets
from tests.pl_modules.method_tester import MethodTester, make_batch


class TestReCo(MethodTester):
    method_cls = ReCo
    init_kwargs = {"num_queries": 16, "num_negatives": 8}


def test_reco_default_is_classmix_with_a_representation_head():
    module = TestReCo().make()
    assert module.mix_mode == "classmix" and module.rep_head is not None
    losses = module.compute_losses(make_batch())
    assert losses["loss_reco"] > 0
    assert 0 <= losses["weak_ratio"] <= 1


def test_labeled_targets_partial_mode_adds_confident_predictions():
    masks = torch.full((1, 2, 2), 255)
    masks[0, 0, 0] = 1
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 2, 1, 1] = 20.0  # confident class 2 at (1, 1)
    labels, valid = labeled_reco_targets(logits, masks, 255, 0.97, partial=False)
    assert valid.tolist() == [[[True, False], [False, False]]]
    labels, valid = labeled_reco_targets(logits, masks, 255, 0.97, partial=True)
    assert valid.tolist() == [[[True, False], [False, True]]]
    assert labels[0, 0, 0] == 1 and labels[0, 1, 1] == 2
