import pytest
import torch

from src.pl_modules import UniMatchV2
from src.pl_modules.unimatch_v2 import complementary_dropout_scales
from src.train import main
from tests.conftest import REPO, config
from tests.networks.test_segmenter import tiny_vit
from tests.pl_modules.method_tester import MethodTester, make_batch, tiny_kwargs


class TestUniMatchV2(MethodTester):
    method_cls = UniMatchV2
    permissive_kwargs = {"confidence_threshold": 0.0}
    threshold_kwargs = {"confidence_threshold": 0.6}


@pytest.mark.parametrize("num_pairs, fraction, clean", [(8, 0.5, 4), (5, 0.5, 2), (4, 0.0, 4), (4, 1.0, 0)])
def test_complementary_scales(num_pairs, fraction, clean):
    scales = complementary_dropout_scales(num_pairs, 64, fraction, generator=torch.Generator().manual_seed(0))
    first, second = scales.chunk(2)
    assert torch.equal(first + second, torch.full_like(first, 2.0))  # each view keeps what the other drops
    untouched = (first == 1).all(dim=1)
    assert int(untouched.sum()) == clean
    dropped = first[~untouched]
    assert ((dropped == 0) | (dropped == 2)).all()
    if len(dropped):  # about half of a dropped image's channels are kept
        assert 0.3 < float(dropped.mean()) / 2 < 0.7


def vit_module(**kwargs) -> UniMatchV2:
    torch.manual_seed(0)
    return UniMatchV2(**{**tiny_kwargs(), **tiny_vit(), **kwargs})


def test_strong_views_of_one_image_see_complementary_token_maps():
    module = vit_module().eval()  # eval: the ViT and DPT are then deterministic
    seen = []
    module.student.model.decoder.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    images = torch.rand(4, 3, 28, 28)
    with torch.no_grad():
        module.student(images)
        module.forward_strong(torch.cat([images, images]))  # s1 = s2: their maps differ only by the masks
    plain, scaled = seen
    for clean, (view_1, view_2) in zip(plain, (m.chunk(2) for m in scaled)):
        torch.testing.assert_close(view_1 + view_2, 2 * clean)
        kept = [torch.equal(a, b) for a, b in zip(view_1, view_2)]
        assert kept.count(True) == 2  # half the images keep both views clean
        for a, b, is_kept in zip(view_1, view_2, kept):
            zero_1, zero_2 = a.flatten(1).abs().amax(1) == 0, b.flatten(1).abs().amax(1) == 0  # per channel
            if not is_kept:  # every channel is dropped in exactly one view (and doubled in the other)
                assert torch.equal(zero_1, ~zero_2) and zero_1.any() and zero_2.any()


def test_a_step_on_a_vit_trains_the_encoder_on_the_teacher_labels():
    module = vit_module(confidence_threshold=0.0)
    losses = module.compute_losses(make_batch())
    assert torch.isfinite(losses["loss"]) and losses["loss_unsup"] > 0
    losses["loss"].backward()
    # Every encoder parameter learns (multi-GPU training needs no search for unused ones).
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student.encoder_parameters())
    # The weak view's pseudo-labels come from the teacher's logits.
    teacher_logits = torch.randn(2, 3, 32, 32)
    module.teacher.forward = lambda images: teacher_logits
    targets, seen = module.targets, []
    module.targets = lambda views, logits_w: seen.append(logits_w) or targets(views, logits_w)
    module.compute_losses(make_batch())
    assert seen == [teacher_logits]


def test_encoder_and_head_learning_rates_and_buffer_ema():
    module = vit_module()
    module.trainer = type("T", (), {"max_steps": 10})()
    encoder, head = module.configure_optimizers()["optimizer"].param_groups
    assert {id(p) for p in encoder["params"]} == {id(p) for p in module.student.encoder_parameters()}
    assert head["lr"] == pytest.approx(40 * encoder["lr"]) and len(head["params"]) > 0
    # One EMA step at decay 0.5 (step 1) averages the BatchNorm statistics as it does the weights.
    bn_student, bn_teacher = (next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
                              for net in (module.student, module.teacher))
    bn_student.running_mean.fill_(1.0)
    before = bn_teacher.running_mean.clone()
    module.update_teacher(1)
    torch.testing.assert_close(bn_teacher.running_mean, 0.5 * before + 0.5)


def test_options_are_validated():
    for bad in ({"drop_pair_fraction": 1.5}, {"head_lr_multiplier": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            UniMatchV2(**tiny_kwargs(), **bad)


def test_paper_overlay_sets_the_reference_network_and_learning_rates(tmp_path):
    overlays = [config("unimatch_v2"), str(REPO / "configs/data/pascal_voc.yaml"),
                str(REPO / "configs/data/pascal_voc_unimatch_v2.yaml")]
    args = [arg for path in overlays for arg in ("--config", path)] + [
        "--data.dataset", "synthetic", "--data.dataset_options", "{image_size: 32, num_train: 8}", "--data.train_split",
        "train", "--trainer.default_root_dir", str(tmp_path),
        # A small ViT for speed (DINOv2-B takes seconds to build); the overlay's DPT head and optimizer stay.
        "--model.init_args.encoder_weights", "null", "--model.init_args.encoder_name", "tu-test_vit"]
    model = main(args, run=False).model
    assert model.hparams.encoder_name == "tu-test_vit" and type(model.student.model).__name__ == "DPT"
    assert model.hparams.model_options["decoder_fusion_channels"] == 128 and model.hparams.eval_window == 518
    model.trainer = type("T", (), {"max_steps": 10})()
    encoder, head = model.configure_optimizers()["optimizer"].param_groups
    assert (encoder["lr"], head["lr"], encoder["weight_decay"]) == (pytest.approx(5e-6), pytest.approx(2e-4), 0.01)
