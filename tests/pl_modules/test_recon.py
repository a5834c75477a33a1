import math
import warnings

import pytest
import torch

from src.pl_modules import Recon, Supervised
from src.train import main
from tests.conftest import smoke_args
from tests.pl_modules.method_tester import MethodTester, tiny_kwargs


class TestRecon(MethodTester):
    method_cls = Recon
    permissive_kwargs: dict = {}  # no pseudo-labels, no threshold

    def test_short_fit_logs_val_miou(self):
        pytest.skip("recon has no mIoU: see test_short_fit_logs_val_loss_and_its_best_checkpoint_transfers")


def test_loss_is_zero_for_a_perfect_reconstruction_and_uses_the_normalised_target():
    module = Recon(**tiny_kwargs())
    images = torch.rand(2, 3, 32, 32)
    normalisation = module.reconstruction_loss
    target = (images - normalisation.image_mean) / normalisation.image_std
    loss, l1, similarity = module.reconstruction_loss(target, images)
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and similarity.item() == pytest.approx(1.0, abs=1e-6)
    loss, l1, similarity = module.reconstruction_loss(target + 0.1, images)
    assert l1.item() == pytest.approx(0.1, abs=1e-5) and loss.item() > l1.item()
    assert module.student(images).shape == (2, 3, 32, 32)  # RGB out, whatever num_classes says


def init_warnings(**kwargs) -> tuple[Supervised, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = Supervised(**{**tiny_kwargs(), **kwargs})
    return module, [str(w.message) for w in caught if "model.init_from" in str(w.message)]


def test_recon_checkpoint_transfers_all_but_the_head_and_reports_it_once(tmp_path):
    torch.manual_seed(0)
    recon = Recon(**tiny_kwargs())
    with torch.no_grad():  # non-default values everywhere, BatchNorm statistics included
        for tensor in recon.student.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor))
    path = tmp_path / "recon.ckpt"
    torch.save({"state_dict": recon.state_dict(), "method": "recon"}, path)

    module, messages = init_warnings(num_classes=5, init_from=str(path))
    source, loaded = recon.student.state_dict(), module.student.state_dict()
    head = sorted(k for k in loaded if k.startswith("model.segmentation_head."))
    assert head == ["model.segmentation_head.0.bias", "model.segmentation_head.0.weight"]
    encoder = [k for k in loaded if k.startswith("model.encoder.")]
    assert len(encoder) > 10 and all(torch.equal(loaded[k], source[k]) for k in encoder)
    assert all(torch.equal(loaded[k], source[k]) for k in loaded if k not in head)  # the decoder too
    assert not torch.equal(loaded[head[1]][:3], source[head[1]])
    assert len(messages) == 1
    assert f"copied {len(loaded) - 2} of {len(loaded)} tensors" in messages[0]
    assert "2 of another shape" in messages[0] and "not in the checkpoint" not in messages[0]
    assert all(name in messages[0] for name in head)
    assert f"{head[1]} (3, 32, 1, 1) -> (5, 32, 1, 1)" in messages[0]

    unrelated = tmp_path / "unrelated.ckpt"
    torch.save({"state_dict": {"student.model.other.weight": torch.zeros(2, 2)}}, unrelated)
    with pytest.raises(ValueError, match="no tensor matches"):
        init_warnings(init_from=str(unrelated))


def test_short_fit_logs_val_loss_and_its_best_checkpoint_transfers(tmp_path, capsys):
    cli = main(["fit", *smoke_args("recon", tmp_path)])
    assert "val/loss: " in capsys.readouterr().out  # the summary prints the monitored metric, not an mIoU
    metrics = cli.trainer.callback_metrics
    assert "val/miou" not in metrics
    for key in ("val/loss", "val/l1", "val/ms_ssim", "train/loss", "train/hole_fraction"):
        assert torch.isfinite(metrics[key]), key
    assert 0 < float(metrics["val/ms_ssim"]) <= 1 and 0 < float(metrics["train/hole_fraction"]) < 0.8
    assert float(metrics["val/loss"]) == pytest.approx(float(metrics["val/l1"]) + 1 - float(metrics["val/ms_ssim"]))
    checkpoint = cli.trainer.checkpoint_callback
    assert checkpoint.monitor == "val/loss" and checkpoint.mode == "min"
    assert checkpoint.best_model_path.endswith("best.ckpt")
    assert math.isclose(float(checkpoint.best_model_score), cli.model.best_val_loss, rel_tol=1e-6)

    reloaded = Recon.load_from_checkpoint(checkpoint.best_model_path).eval()
    assert reloaded.num_classes == 8 and reloaded.student(torch.rand(1, 3, 32, 32)).shape[1] == 3

    module, messages = init_warnings(num_classes=8, init_from=checkpoint.best_model_path)
    best = torch.load(checkpoint.best_model_path, weights_only=False)["state_dict"]
    encoder = {k: v for k, v in module.student.state_dict().items() if k.startswith("model.encoder.")}
    assert encoder and all(torch.equal(v, best[f"student.{k}"]) for k, v in encoder.items())
    assert len(messages) == 1 and "model.segmentation_head.0.weight" in messages[0]


def test_lr_factor_warms_up_then_follows_a_cosine_or_the_base_poly():
    module = Recon(**tiny_kwargs(), warmup_fraction=0.1, final_lr_ratio=0.01)
    assert [module.lr_factor(step, 100) for step in (0, 10, 100)] == pytest.approx([0.01, 1.0, 0.01])
    poly = Recon(**tiny_kwargs(), lr_schedule="poly", min_lr_ratio=0.05)
    assert poly.lr_factor(50, 100) == pytest.approx(0.5**0.9) and poly.lr_factor(100, 100) == 0.05


def test_evaluation_is_the_reconstruction_scores_not_the_miou():
    module = Recon(**tiny_kwargs(), ssim_scales=1).eval()  # as Lightning evaluates
    assert not hasattr(module, "val_confusions") and not hasattr(module, "test_confusion")
    images = torch.rand(2, 3, 32, 32)
    module.evaluate_batch("test", {"image": images}, 0)
    module.evaluate_batch("test", {"image": images}, 0)  # the same holes: the same scores
    corrupted, _ = module.corrupt(images, torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module.reconstruction_loss(module.student(corrupted), images)
    for key, value in zip(("loss", "l1", "ms_ssim"), expected):
        assert module.score_means["test"][key].compute().item() == pytest.approx(value.item(), rel=1e-5)
