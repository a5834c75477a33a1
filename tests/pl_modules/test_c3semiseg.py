import math

import pytest
import torch

from src.losses.c3 import C3Consistency, C3Contrast, C3Thresholds
from src.networks import projection_head
from src.pl_modules import C3SemiSeg
from tests.pl_modules.method_tester import MethodTester, labeller_of, make_batch, probabilities, tiny_kwargs

# The unlabeled phase from the first step, without ramp-up, so the contract covers every term.
SEMI_NOW = {"unlabeled_start_step": 0, "consistency": C3Consistency(ramp_up_steps=0),
            "contrast": C3Contrast(ramp_up_steps=0, num_views=4)}


class TestC3SemiSeg(MethodTester):
    method_cls = C3SemiSeg
    init_kwargs = SEMI_NOW
    # A threshold of 0 is replaced by the first quantile: the top 80 % of each class's pixels pass.
    permissive_kwargs = {"thresholds": C3Thresholds(initial_threshold=0.0)}
    threshold_kwargs = {"thresholds": C3Thresholds(initial_threshold=0.6)}  # every class's, not updated by diagnostics


def make(**kwargs) -> C3SemiSeg:
    torch.manual_seed(0)
    return C3SemiSeg(**{**tiny_kwargs(), **SEMI_NOW, **kwargs})


def test_ramp_up_weights_follow_the_schedule():
    module = make(contrast=C3Contrast(weight=0.1, start_step=5, ramp_up_steps=10),
                  consistency=C3Consistency(weight=50.0, ramp_up_steps=40), unlabeled_start_step=20)
    assert module.loss_weights(4) == (0.0, 0.0)  # nothing before the starts
    assert module.loss_weights(5) == (pytest.approx(0.1 * math.exp(-5)), 0.0)
    assert module.loss_weights(10) == (pytest.approx(0.1 * math.exp(-1.25)), 0.0)
    assert module.loss_weights(20) == (pytest.approx(0.1), pytest.approx(50 * math.exp(-5)))
    assert module.loss_weights(40) == (pytest.approx(0.1), pytest.approx(50 * math.exp(-1.25)))
    assert module.loss_weights(60) == (pytest.approx(0.1), pytest.approx(50.0))


def test_supervised_phase_uses_labeled_images_only():
    module = make(unlabeled_start_step=10)
    batch = make_batch()
    batch["unlabeled"]["image"] = torch.full_like(batch["unlabeled"]["image"], float("nan"))  # must stay unread
    losses = module.compute_losses(batch)
    assert torch.isfinite(losses["loss"]) and "loss_unsup" not in losses and "loss_contrast" in losses
    assert module.class_thresholds.tolist() == pytest.approx([0.9] * 3)


def test_thresholds_are_updated_and_logged_per_class():
    module = make(class_names=["sky", "road", "car"])
    losses = module.compute_losses(make_batch())
    logged = torch.stack([losses[f"threshold/{name}"] for name in ("sky", "road", "car")])
    assert torch.equal(logged, module.class_thresholds)
    assert not torch.allclose(module.class_thresholds, torch.full((3,), 0.9))  # predicted classes moved
    assert 0 <= losses["mask_ratio"] <= 1


def test_only_pixels_above_their_class_threshold_are_learned():
    # Momentum 1 keeps every threshold at 1: no teacher pixel is that confident, nothing is learned.
    losses = make(thresholds=C3Thresholds(initial_threshold=1.0, threshold_momentum=1.0)).compute_losses(make_batch())
    assert losses["mask_ratio"] == 0 and losses["loss_unsup"] == 0
    module = make(thresholds=C3Thresholds(initial_threshold=1.0, dynamic_threshold=False))
    losses = module.compute_losses(make_batch())
    assert losses["mask_ratio"] == 1 and losses["loss_unsup"] > 0  # every valid pixel
    assert module.class_thresholds.tolist() == [1.0] * 3


def test_teacher_is_frozen_then_copied_then_averaged():
    module = make(unlabeled_start_step=3, ema_decay=0.99)
    initial = [p.clone() for p in module.teacher.parameters()]
    with torch.no_grad():
        for p in module.student.parameters():
            p.add_(1.0)
        for m in module.student.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(2.0)
    module.update_teacher(2)  # before the unlabeled phase: untouched
    assert all(torch.equal(a, b) for a, b in zip(initial, module.teacher.parameters()))
    module.update_teacher(3)  # its first step: a hard copy, BN buffers and projection head included
    assert all(torch.equal(t, s) for t, s in zip(module.teacher.state_dict().values(),
                                                 module.student.state_dict().values()))
    assert all(torch.equal(t, s) for t, s in zip(module.teacher_head.parameters(), module.rep_head.parameters()))
    before = [p.clone() for p in module.teacher.parameters()]
    with torch.no_grad():
        for p in module.student.parameters():
            p.add_(1.0)
    module.update_teacher(5)  # two steps later: alpha = 1 - 1/3
    for old, new, student in zip(before, module.teacher.parameters(), module.student.parameters()):
        assert torch.allclose(new, 2 / 3 * old + 1 / 3 * student, atol=1e-6)


def test_without_ema_the_student_is_its_own_teacher():
    module = make(ema_teacher=False, thresholds=C3Thresholds(initial_threshold=0.0))
    assert module.teacher is None and module.teacher_head is None
    losses = module.compute_losses(make_batch())
    assert losses["loss_unsup"] > 0 and torch.isfinite(losses["loss_contrast"])
    assert module.student.training  # restored after the eval-mode teacher pass


def test_cross_set_cutmix_is_undone_on_the_outputs():
    # A pixel-wise network: permuting, mixing, un-mixing and un-permuting give its plain outputs.
    module = make(contrast=C3Contrast(embedding_stride=1))
    module.student.forward_features = lambda images: (images[:, :3] * 2, images)
    module.rep_head = projection_head(3, 4)
    images = torch.rand(5, 3, 8, 8)
    logits, embeddings = module.forward_student(images, with_embeddings=True)
    assert torch.equal(logits, images * 2)
    assert torch.allclose(embeddings, module.rep_head(images), atol=1e-6)


def test_fit_with_an_early_unlabeled_phase_logs_thresholds(tmp_path):
    from src.train import main
    from tests.conftest import smoke_args

    cli = main(["fit", *smoke_args("c3semiseg", tmp_path, "--model.init_args.unlabeled_start_step", "1",
                                   "--model.init_args.contrast.num_views", "4")])
    metrics = cli.trainer.callback_metrics
    for key in ("train/loss_unsup", "train/loss_contrast", "train/mask_ratio"):
        assert torch.isfinite(metrics[key]), key
    names = cli.model.class_names
    assert all(f"train/threshold/{name}" in metrics for name in names)
    assert not torch.allclose(cli.model.class_thresholds, torch.full((len(names),), 0.9))
    # The option groups: the YAML's and the command line's fields, the others' defaults.
    model = cli.model
    assert model.contrast == C3Contrast(ramp_up_steps=8, num_views=4) and model.thresholds == C3Thresholds()
    assert model.consistency == C3Consistency(weight=50.0, ramp_up_steps=128)
    # A checkpoint keeps them: it reloads as LightningCLI's --ckpt_path reads it (weights_only) and as a module.
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(path, map_location="cpu", weights_only=True)["hyper_parameters"]["contrast"]["num_views"] == 4
    reloaded = C3SemiSeg.load_from_checkpoint(path)
    assert (reloaded.consistency, reloaded.thresholds, reloaded.contrast) == (
        model.consistency, model.thresholds, model.contrast)
    assert torch.equal(reloaded.class_thresholds, model.class_thresholds)


def test_a_module_built_in_python_reloads_from_its_checkpoint(tmp_path):
    # Its hparams hold the option objects themselves (the CLI's hold dicts).
    module = make(thresholds=C3Thresholds(end_percent=0.5), contrast=C3Contrast(num_views=6))
    path = tmp_path / "c3.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": "2.6.0"}, path)
    assert torch.load(path, weights_only=True)["hyper_parameters"]["thresholds"] == C3Thresholds(end_percent=0.5)
    reloaded = C3SemiSeg.load_from_checkpoint(path)
    assert reloaded.thresholds == C3Thresholds(end_percent=0.5) and reloaded.contrast == C3Contrast(num_views=6)


def test_invalid_options_are_rejected(tmp_path, capsys):
    with pytest.raises(ValueError, match="model.unlabeled_start_step"):
        make(unlabeled_start_step=-1)
    # On the command line, an option group's own check is the one error line.
    from src.train import cli_entry
    from tests.conftest import smoke_args

    args = smoke_args("c3semiseg", tmp_path, "--model.init_args.thresholds.end_percent", "1.2")
    assert cli_entry(["fit", *args]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: model.thresholds.end_percent must be in [0, 1], got 1.2")


@pytest.mark.parametrize("dynamic_threshold", [True, False])
def test_pseudo_labels_pass_their_class_threshold_which_stays_as_it_is(dynamic_threshold):
    module = make(thresholds=C3Thresholds(dynamic_threshold=dynamic_threshold))
    module.class_thresholds.copy_(torch.tensor([0.5, 0.9, 0.7]))
    labels = torch.tensor([[[0, 0, 1, 1, 2, 2]]])
    confidences = torch.tensor([[[0.6, 0.4, 0.95, 0.8, 0.75, 0.65]]])
    module.teacher = labeller_of(probabilities(labels, confidences))
    pseudo_labels, confidence_mask = module.pseudo_labels(torch.rand(1, 3, 1, 6))
    assert torch.equal(pseudo_labels, labels)
    expected = [True, False, True, False, True, False] if dynamic_threshold else [True] * 6
    assert confidence_mask.flatten().tolist() == expected
    assert module.class_thresholds.tolist() == pytest.approx([0.5, 0.9, 0.7])
