import pytest
import torch
import torch.nn.functional as F

from src.pl_modules import CPS
from tests.pl_modules.method_tester import (NUM_CLASSES, FixedLabeller, MethodTester, labeller_of, make_batch,
                                            probabilities, tiny_kwargs)


class TestCPS(MethodTester):
    method_cls = CPS
    permissive_kwargs: dict = {}  # no confidence rule: every pixel counts
    threshold_kwargs: dict = {}

    def make_with_labeller(self, labeller, **kwargs):
        module = self.make(**kwargs)
        module.student = module.student_b = labeller
        return module

    def test_unlabeled_loss_alone_moves_the_student(self):
        # The contract's version perturbs a teacher; here the two networks differ from the start.
        module = self.make()
        batch = make_batch(1)
        batch["labeled"]["mask"].fill_(255)
        losses = module.compute_losses(batch)
        assert losses["loss_sup"].item() == 0 and losses["loss_unsup"].item() > 0
        losses["loss"].backward()
        for network in (module.student, module.student_b):
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())

    def test_diagnostics_count_the_confidence_mask_by_hand(self):
        # CPS keeps every pixel: the mask is the whole image and its accuracy is the pseudo-labels'.
        labels = torch.tensor([[[0, 1, 2], [2, 1, 0]], [[1, 1, 0], [0, 2, 2]]])
        targets = torch.tensor([[[0, 1, 1], [2, 255, 0]], [[0, 1, 0], [0, 2, 2]]])
        valid = torch.ones_like(targets, dtype=torch.bool)
        valid[1, :, 2] = False
        module = self.make_with_labeller(labeller_of(probabilities(labels, torch.full(labels.shape, 0.4))))
        batch = {"image": torch.rand(2, 3, 2, 3), "mask": targets, "valid": valid}
        scores, (_, shown_labels, shown_mask, _) = module.pseudo_label_diagnostics([batch])
        assert scores["mask_ratio"] == 1.0 and scores["pseudo_acc"] == scores["mask_acc"] == pytest.approx(7 / 9)
        assert torch.equal(shown_labels, labels) and shown_mask.all()


def constant_logits(labels: torch.Tensor, batch: int = 2) -> torch.Tensor:
    """(batch, C, H, W) logits whose argmax is ``labels`` (H, W) in every image, softly (the CE is not ~0)."""
    one_hot = F.one_hot(labels, NUM_CLASSES).permute(2, 0, 1).float()
    return (one_hot + 0.3 * torch.randn(NUM_CLASSES, *labels.shape)).expand(batch, -1, -1, -1).contiguous()


@pytest.mark.parametrize("cutmix", [False, True])
def test_each_network_learns_the_other_networks_pseudo_labels(cutmix):
    torch.manual_seed(0)
    logits_a, logits_b = (constant_logits(labels) for labels in torch.randint(0, NUM_CLASSES, (2, 32, 32)))
    module = CPS(**{**tiny_kwargs(), "scale_range": (1.0, 1.0)}, cutmix=cutmix)
    module.student, module.student_b = FixedLabeller(logits_a), FixedLabeller(logits_b)
    losses = module.compute_losses(make_batch())
    # A learns B's argmax and B learns A's; self-made labels would give the (smaller) CE to the own argmax.
    cross_a, cross_b = F.cross_entropy(logits_a, logits_b.argmax(1)), F.cross_entropy(logits_b, logits_a.argmax(1))
    own_a = F.cross_entropy(logits_a, logits_a.argmax(1))
    torch.testing.assert_close(losses["loss_cps_a"], cross_a)
    torch.testing.assert_close(losses["loss_cps_b"], cross_b)
    assert not torch.isclose(cross_a, own_a)
    torch.testing.assert_close(losses["loss"], losses["loss_sup"] + 1.5 * (cross_a + cross_b))


def test_cutmix_pastes_the_partners_image_and_labels_with_the_same_boxes():
    torch.manual_seed(0)
    module = CPS(**tiny_kwargs(), cutmix=True)
    per_image = torch.tensor([0, 1]).view(2, 1, 1).expand(2, 32, 32)  # image i is all class i for both networks
    logits = 10.0 * F.one_hot(per_image, NUM_CLASSES).permute(0, 3, 1, 2).float()
    module.student = module.student_b = FixedLabeller(logits)
    images = torch.rand(2, 3, 32, 32)
    given, valid = torch.full((2, 32, 32), 255), torch.ones(2, 32, 32, dtype=torch.bool)
    mixed, (labels_a, labels_b) = module.cutmix_targets(images, given, valid)
    pasted = labels_a != per_image
    assert torch.equal(labels_a, labels_b) and 0 < pasted.float().mean() < 0.6
    torch.testing.assert_close(mixed, torch.where(pasted.unsqueeze(1), images.roll(-1, dims=0), images))


def test_networks_share_a_pretrained_encoder_and_differ_elsewhere(tmp_path):
    torch.manual_seed(0)
    source = CPS(**tiny_kwargs())
    weights = tmp_path / "encoder.pth"
    torch.save(source.student.model.encoder.state_dict(), weights)
    for encoder_weights, same_encoder in ((None, False), (str(weights), True)):
        module = CPS(**{**tiny_kwargs(), "encoder_weights": encoder_weights})
        a, b = module.student.state_dict(), module.student_b.state_dict()
        encoder = [k for k in a if k.startswith("model.encoder.") and a[k].is_floating_point() and a[k].numel() > 1]
        assert all(torch.equal(a[k], b[k]) for k in encoder) == same_encoder
        assert not torch.equal(a["model.segmentation_head.0.weight"], b["model.segmentation_head.0.weight"])
    module.trainer = type("T", (), {"max_steps": 10})()
    in_optimizer = {id(p) for group in module.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    assert all(id(p) in in_optimizer for p in module.student_b.parameters())


def test_cps_weight_is_validated():
    with pytest.raises(ValueError, match="cps_weight"):
        CPS(**tiny_kwargs(), cps_weight=-1.0)
