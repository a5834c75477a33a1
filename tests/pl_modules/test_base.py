import math

import pytest
import torch

from src.pl_modules.base import SemiSupervisedModule, iou_from_confusion, sliding_window_logits
from src.pl_modules.visualize import palette, prediction_grid


def test_iou_from_confusion_hand_example():
    # rows = truth, cols = prediction
    confusion = torch.tensor([[3, 1, 0], [1, 1, 0], [0, 0, 0]])
    iou, accuracy = iou_from_confusion(confusion)
    assert math.isclose(iou[0].item(), 3 / 5)
    assert math.isclose(iou[1].item(), 1 / 3)
    assert math.isnan(iou[2].item())  # absent from truth and prediction: not counted in the mean
    assert math.isclose(accuracy.item(), 4 / 6)


class PixelNet(torch.nn.Module):
    """A per-pixel network: sliding-window scores must equal whole-image scores."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)


def test_sliding_window_equals_whole_for_pixelwise_net():
    net = PixelNet()
    images = torch.rand(2, 3, 50, 37)
    whole = net(images).softmax(dim=1)
    sliding = sliding_window_logits(net, images, window=16, num_classes=4)
    assert torch.allclose(whole, sliding, atol=1e-6)


def test_palette_and_grid():
    colours = palette(21)
    assert tuple(colours[1]) == (128, 0, 0) and tuple(colours[255]) == (255, 255, 255)
    images = torch.rand(2, 3, 8, 10)
    masks = torch.zeros(2, 8, 10, dtype=torch.long)
    grid = prediction_grid([(images, masks, masks), (images[:1], masks[:1], masks[:1])], num_classes=3, min_size=1)
    assert grid.shape == (3, 8 * 3, 10 * 3)


def test_grid_tiles_are_enlarged_nearest_to_at_least_128_pixels():
    images = torch.rand(1, 3, 64, 48)
    labels = torch.randint(0, 3, (1, 64, 48))
    confident = labels == 1
    # image | pseudo-label | confidence mask | ground truth; the shorter side 48 becomes 144.
    grid = prediction_grid([(images, labels, confident, labels)], num_classes=3)
    assert grid.shape == (3, 64 * 3, 48 * 3 * 4)
    tiles = grid.split(48 * 3, dim=2)

    def enlarged(tile):
        return tile.repeat_interleave(3, dim=-2).repeat_interleave(3, dim=-1)

    assert torch.equal(tiles[0], enlarged(images[0]))
    assert torch.equal(tiles[2], enlarged(confident.float().expand(3, 64, 48)))  # white where confident
    assert torch.equal(tiles[1], tiles[3])


def _fast_path_module(**kwargs):
    from src.pl_modules import CutMix
    from tests.pl_modules.method_tester import tiny_kwargs

    torch.manual_seed(0)
    return CutMix(**tiny_kwargs(), **kwargs)


def test_channels_last_formats_networks_and_batch():
    # The same step in both formats: MethodTester.test_channels_last_gives_the_same_step, per method.
    from tests.pl_modules.method_tester import make_batch

    plain, fast = _fast_path_module(channels_last=False), _fast_path_module(channels_last=True)
    conv = next(m for m in fast.student.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    plain_conv = next(m for m in plain.student.modules() if isinstance(m, torch.nn.Conv2d))
    assert not plain_conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.on_after_batch_transfer(make_batch(2), 0)["unlabeled"]["image"].is_contiguous(
        memory_format=torch.channels_last
    )
    assert plain.on_after_batch_transfer(make_batch(2), 0)["unlabeled"]["image"].is_contiguous()


def test_compile_keeps_parameter_names_and_outputs():
    plain, compiled = _fast_path_module(), _fast_path_module(compile=True)
    assert list(plain.state_dict()) == list(compiled.state_dict())
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = plain.student.eval()(images)
        logits, _ = compiled.student.eval().forward_features(images)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert compiled.student.model.encoder._compiled_call_impl is not None


def test_forward_in_mode_runs_without_gradient_in_the_mode_asked_then_restores_it():
    module = _fast_path_module()
    images = torch.rand(2, 3, 32, 32)
    student = module.student.train()
    running = [m.running_mean.clone() for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    logits = module.forward_in_mode(student, images, train=False)
    assert student.training and all(m.training for m in student.modules())
    assert not logits.requires_grad
    with torch.no_grad():
        assert torch.equal(logits, student.eval()(images))  # running statistics, untouched by the call
    after = [m.running_mean for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(running, after))
    student.eval()
    logits, features = module.forward_in_mode(student, images, train=True, with_features=True)
    assert not student.training and features.shape[0] == 2
    assert any(not torch.equal(a, b) for a, b in zip(running, after))  # train mode: batch statistics, updated


def test_lr_factor_is_the_floored_poly_schedule():
    module = _fast_path_module(lr_power=0.9, min_lr_ratio=0.05)
    assert module.lr_factor(0, 100) == 1.0
    assert module.lr_factor(50, 100) == pytest.approx(0.5**0.9)
    assert module.lr_factor(99, 100) == 0.05 and module.lr_factor(150, 100) == 0.05


def test_a_method_with_an_unlabeled_loss_must_define_its_pseudo_label_rule():
    with pytest.raises(TypeError, match="NoRule sets uses_unlabeled but defines no pseudo_labels"):
        type("NoRule", (SemiSupervisedModule,), {"uses_unlabeled": True})
    supervised = type("SupervisedOnly", (SemiSupervisedModule,), {})  # no rule needed, and none inherited
    assert not hasattr(supervised, "pseudo_labels")


class MeanScored(SemiSupervisedModule):
    """A method scored by scalars: the mean absolute output and the mean output, no mIoU."""

    eval_scores = ("error", "mean")
    output_channels = 2

    def compute_losses(self, batch):
        return {"loss": self.student(batch["labeled"]["image"]).mean()}

    def score_batch(self, images, batch_idx):
        outputs = self.student(images)
        return {"error": outputs.abs().mean(), "mean": outputs.mean()}, (images,)


def test_a_method_with_eval_scores_must_define_score_batch():
    with pytest.raises(TypeError, match="NoScores sets eval_scores but defines no score_batch"):
        type("NoScores", (SemiSupervisedModule,), {"eval_scores": ("loss",)})


def test_a_method_with_eval_scores_averages_them_instead_of_the_miou_and_keeps_its_best():
    from tests.pl_modules.method_tester import tiny_kwargs

    torch.manual_seed(0)
    module = MeanScored(**{**tiny_kwargs(), "num_classes": 5}).eval()
    assert module.num_classes == 5 and module.student(torch.rand(1, 3, 32, 32)).shape[1] == 2
    assert not hasattr(module, "val_confusions") and not hasattr(module, "test_confusion")
    batches = [torch.rand(3, 3, 32, 32), torch.rand(1, 3, 32, 32)]
    for index, images in enumerate(batches):
        module.evaluate_batch("test", {"image": images}, index)
    with torch.no_grad():
        errors = [module.student(images).abs().mean() for images in batches]
    expected = (3 * errors[0] + errors[1]) / 4  # weighted by batch size
    assert module.score_means["test"]["error"].compute().item() == pytest.approx(expected.item(), rel=1e-5)

    module.trainer = type("T", (), {"callback_metrics": {}})()
    module.best_score = 0.25
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["best_val_error"] == 0.25 and math.isnan(checkpoint["best_miou"])
    fresh = MeanScored(**tiny_kwargs())
    assert fresh.best_score == math.inf
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.best_score == 0.25

