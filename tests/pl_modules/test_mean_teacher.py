import pytest
import torch

from src.pl_modules import ClassMix, CutMix, CutOut, MeanTeacher
from tests.pl_modules.method_tester import MethodTester, make_batch, tiny_kwargs


class TestMeanTeacher(MethodTester):
    method_cls = MeanTeacher


class TestCutOut(MethodTester):
    method_cls = CutOut


class TestCutMix(MethodTester):
    method_cls = CutMix


class TestClassMix(MethodTester):
    method_cls = ClassMix


def test_variants_only_change_the_mixing_mode():
    assert [cls(**tiny_kwargs()).mix_mode for cls in (MeanTeacher, CutOut, CutMix, ClassMix)] == [
        "none", "cutout", "cutmix", "classmix"]
    with pytest.raises(ValueError, match="mix_mode"):
        MeanTeacher(mix_mode="mixup", **tiny_kwargs())


def test_partial_labels_overwrite_pseudo_labels_with_confidence_one(monkeypatch):
    import src.pl_modules.mean_teacher as mean_teacher

    monkeypatch.setattr(mean_teacher, "strong_augment", lambda *tensors, **kw: tensors)
    module = MeanTeacher(**{**tiny_kwargs(), "scale_range": (1.0, 1.0)})
    images, labels, confidences = module.make_unlabeled_targets(make_batch(partial=True)["unlabeled"])
    # Scale 1, no mixing, no photometric step: the given pixel keeps its place.
    assert bool((labels[:, 10, 10] == 1).all()) and bool((confidences[:, 10, 10] == 1.0).all())
    assert bool((confidences < 1.0).any())  # the other pixels keep the teacher's confidences


def test_same_seed_same_first_twenty_losses(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from src.train import main
    from tests.conftest import smoke_args

    curves = []
    for run in range(2):
        main(["fit", *smoke_args("classmix", tmp_path / str(run), "--trainer.max_steps", "20",
                                 "--trainer.val_check_interval", "20", "--trainer.log_every_n_steps", "1")])
        events = EventAccumulator(str(tmp_path / str(run) / "run")).Reload()
        curves.append([e.value for e in events.Scalars("train/loss")])
    assert len(curves[0]) == 20
    assert curves[0] == curves[1]
