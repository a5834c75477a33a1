import json

import pytest
import torch

from src.datamodules import SegmentationDataModule, SemiSupervisedDataModule, SupervisedDataModule
from src.datamodules.base import InfiniteSampler, PositionSampler
from src.datasets import DatasetError
from tests.datasets.fixtures import make_folder_dataset

TINY = {"image_size": 32, "num_train": 30, "num_val": 6, "num_test": 6}


class FakeTrainer:
    def __init__(self, tmp_path, max_steps=5):
        self.max_steps = max_steps
        self.global_step = 0
        self.accumulate_grad_batches = 1
        self.global_rank = 0
        self.world_size = 1
        self.is_global_zero = True
        self.log_dir = str(tmp_path)
        self.default_root_dir = str(tmp_path)


def datamodule(tmp_path, cls=SemiSupervisedDataModule, **kw):
    args = dict(dataset_options=TINY, num_labeled=5, crop_size=24, batch_size_labeled=2,
                batch_size_unlabeled=3, num_workers=0)
    args.update(kw)
    dm = cls(**args)
    dm.trainer = FakeTrainer(tmp_path)
    dm.setup("fit")
    return dm


def test_infinite_sampler_cycles_through_permutations():
    indices = list(InfiniteSampler(5, 23, seed=0))
    assert len(indices) == 23
    for start in range(0, 20, 5):
        assert sorted(indices[start : start + 5]) == list(range(5))
    assert list(InfiniteSampler(5, 23, seed=0)) == indices
    assert list(InfiniteSampler(5, 23, seed=1)) != indices


def test_infinite_sampler_start_continues_the_stream():
    whole = list(InfiniteSampler(5, 27, seed=0))
    assert list(InfiniteSampler(5, 20, seed=0, start=7)) == whole[7:]
    assert list(PositionSampler(5, 20, seed=0, start=7)) == list(enumerate(whole[7:], 7))


def stream_batches(tmp_path, global_step=0, num_workers=0):
    """Every (labeled, unlabeled) batch pair of a 6-step fit that has done ``global_step`` steps."""
    dm = datamodule(tmp_path, num_workers=num_workers)
    dm.trainer.max_steps, dm.trainer.global_step = 6, global_step
    loaders = dm.train_dataloader()
    return list(zip(loaders["labeled"], loaders["unlabeled"]))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for pair_a, pair_b in zip(a, b):
        for batch_a, batch_b in zip(pair_a, pair_b):
            assert batch_a.keys() == batch_b.keys()
            for key in batch_a:
                assert torch.equal(batch_a[key], batch_b[key]), key


def test_streams_are_a_function_of_the_position(tmp_path):
    whole = stream_batches(tmp_path)
    # A fit resumed after step 2 gets batches 3, 4, ... of the uninterrupted fit (and enough of them).
    assert_same_batches(stream_batches(tmp_path, global_step=2)[:4], whole[2:])
    # Which worker augments a sample does not matter.
    assert_same_batches(stream_batches(tmp_path, num_workers=2), whole)
    # The same image at another position gets another augmentation (5 labeled images, 12 positions).
    labeled = torch.cat([pair[0]["image"] for pair in whole])
    indices = torch.cat([pair[0]["index"] for pair in whole]).tolist()
    repeats = [(i, j) for i in range(len(indices)) for j in range(i) if indices[i] == indices[j]]
    assert repeats and not any(torch.equal(labeled[i], labeled[j]) for i, j in repeats)


def test_pipeline_transforms_share_one_generator(tmp_path):
    # Per-transform copies of one seed's stream would make, e.g., flip and blur draw the same numbers.
    view = datamodule(tmp_path).train_dataloader()["labeled"].dataset
    view[(3, 0)]
    pipeline = view.view.transform
    assert all(t.random_generator is pipeline.random_generator for t in pipeline.transforms)
    assert all(t.py_random is pipeline.py_random for t in pipeline.transforms)


def test_loaders_leave_the_global_rng_alone(tmp_path):
    dm = datamodule(tmp_path, num_workers=2)
    state = torch.get_rng_state()
    next(iter(dm.train_dataloader()["labeled"]))
    next(iter(dm.val_dataloader()))
    assert torch.equal(torch.get_rng_state(), state)


def test_streams_shapes_and_split(tmp_path):
    dm = datamodule(tmp_path)
    assert dm.num_classes >= 7 and dm.ignore_index == 255
    assert len(dm.labeled_indices) == 5 and len(dm.unlabeled_indices) == 25
    assert not set(dm.labeled_indices) & set(dm.unlabeled_indices)
    loaders = dm.train_dataloader()
    assert set(loaders) == {"labeled", "unlabeled"}
    assert len(loaders["labeled"]) == 5  # one batch per step
    labeled = next(iter(loaders["labeled"]))
    unlabeled = next(iter(loaders["unlabeled"]))
    assert labeled["image"].shape == (2, 3, 24, 24) and labeled["image"].dtype == torch.uint8
    assert labeled["mask"].shape == (2, 24, 24) and labeled["mask"].dtype == torch.long
    assert unlabeled["image"].shape == (3, 3, 24, 24) and "mask" not in unlabeled
    assert set(labeled["index"].tolist()) <= set(dm.labeled_indices)
    assert set(unlabeled["index"].tolist()) <= set(dm.unlabeled_indices)
    split = json.loads((tmp_path / "split.json").read_text())
    assert len(split["labeled_ids"]) == 5


def test_five_labeled_images_are_cycled(tmp_path):
    dm = datamodule(tmp_path)
    dm.trainer.max_steps = 10
    seen = torch.cat([b["index"] for b in dm.train_dataloader()["labeled"]])
    assert len(seen) == 20 and set(seen.tolist()) == set(dm.labeled_indices)


def test_supervised_datamodule_has_the_semi_supervised_ones_labeled_stream_only(tmp_path):
    supervised = datamodule(tmp_path, cls=SupervisedDataModule).train_dataloader()
    semi = datamodule(tmp_path).train_dataloader()
    assert set(supervised) == {"labeled"} and set(semi) == {"labeled", "unlabeled"}
    assert not SupervisedDataModule.feeds_unlabeled and SemiSupervisedDataModule.feeds_unlabeled
    for batch_supervised, batch_semi in zip(supervised["labeled"], semi["labeled"]):
        assert torch.equal(batch_supervised["image"], batch_semi["image"])
    # A budget of all 30 images leaves no unlabeled pool: the labeled-only family trains, the other refuses.
    assert len(datamodule(tmp_path, cls=SupervisedDataModule, num_labeled=30).train_dataloader()["labeled"]) == 5
    with pytest.raises(DatasetError, match="unlabeled pool is empty"):
        datamodule(tmp_path, num_labeled=30).train_dataloader()


def test_the_base_datamodule_chooses_no_streams():
    with pytest.raises(TypeError, match="abstract"):
        SegmentationDataModule()


def test_split_is_deterministic_per_seed(tmp_path):
    a = datamodule(tmp_path, seed=3).labeled_indices
    assert datamodule(tmp_path, seed=3).labeled_indices == a
    assert datamodule(tmp_path, seed=4).labeled_indices != a


def test_a_split_seed_fixes_the_split_whatever_the_run_seed(tmp_path):
    fixed = datamodule(tmp_path, seed=3).labeled_indices
    assert datamodule(tmp_path, seed=4, split_seed=3).labeled_indices == fixed
    assert datamodule(tmp_path, seed=3, split_seed=4).labeled_indices == datamodule(tmp_path, seed=4).labeled_indices
    stream = datamodule(tmp_path, seed=4, split_seed=3).train_dataloader()["labeled"].sampler
    assert stream.seed == datamodule(tmp_path, seed=4).train_dataloader()["labeled"].sampler.seed  # training follows seed


def test_partial_labels_use_every_image_in_both_streams(tmp_path):
    dm = datamodule(tmp_path, partial_labels="p0")
    assert len(dm.labeled_indices) == 30 and len(dm.unlabeled_indices) == 30
    batch = next(iter(dm.train_dataloader()["unlabeled"]))
    assert "mask" in batch  # sparse labels travel with unlabeled images
    labeled = next(iter(dm.train_dataloader()["labeled"]))
    assert (labeled["mask"] != 255).float().mean() < 0.05


def test_eval_loader_full_size(tmp_path):
    dm = datamodule(tmp_path)
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape[-2:] == (32, 32)


def test_budget_larger_than_pool(tmp_path):
    with pytest.raises(DatasetError, match="num_labeled=99"):
        datamodule(tmp_path, num_labeled=99)


def test_root_required_for_real_datasets():
    with pytest.raises(DatasetError, match="data.root is required"):
        SemiSupervisedDataModule(dataset="folder")


def test_bad_partial_mode():
    with pytest.raises(ValueError, match="partial_labels"):
        SemiSupervisedDataModule(partial_labels="p3")


def test_train_split_selects_the_pool(tmp_path):
    from tests.datasets.fixtures import VOC_SBD_ONLY, VOC_TRAIN, make_voc

    root = make_voc(tmp_path / "voc")
    dm = datamodule(tmp_path, dataset="pascal_voc", root=str(root), dataset_options={}, num_labeled=2,
                    train_split="train_aug")
    assert sorted(dm.train_set.ids) == sorted(VOC_TRAIN + VOC_SBD_ONLY)
    assert len(dm.labeled_indices) == 2 and len(dm.unlabeled_indices) == len(dm.train_set) - 2


@pytest.mark.parametrize("photometric", [True, False])
def test_photometric_switch_of_labeled_crops(tmp_path, photometric):
    view = datamodule(tmp_path, photometric=photometric).train_dataloader()["labeled"].dataset.view
    names = [type(t).__name__ for t in view.transform.transforms]
    assert ("ColorJitter" in names) == photometric and ("GaussianBlur" in names) == photometric
    assert "HorizontalFlip" in names and "RandomCrop" in names


def test_train_resize_shrinks_images_before_the_crop(tmp_path):
    # 32x32 scenes, no rescale, 24 crops: the labels only hold padding (255) if the images were shrunk first.
    plain = datamodule(tmp_path, scale_range=(1.0, 1.0), crop_size=24).train_dataloader()["labeled"]
    shrunk = datamodule(tmp_path, scale_range=(1.0, 1.0), crop_size=24, train_resize=16).train_dataloader()["labeled"]
    assert not (next(iter(plain))["mask"] == 255).any()
    masks = next(iter(shrunk))["mask"]
    assert masks.shape[-2:] == (24, 24)
    for mask in masks:
        if (mask[:, 0] == 255).all():  # flipped: the image sits at the right edge
            mask = mask.flip(-1)
        assert (mask[16:, :] == 255).all() and (mask[:, 16:] == 255).all() and not (mask[:16, :16] == 255).any()


def test_diagnostic_images_are_centre_crops_of_the_first_unlabeled_ones_batched_as_in_training(tmp_path):
    # 32x32 scenes, 24-pixel crops, 3 unlabeled images a step; val_batch_size plays no part.
    dm = datamodule(tmp_path, num_diagnostic_images=7, val_batch_size=2)
    assert dm.diagnostic_indices() == dm.unlabeled_indices[:7]
    batches = list(dm.diagnostic_dataloader())
    # Whole batches only (the seventh image is left out), unless fewer images than one batch.
    assert [b["index"].tolist() for b in batches] == [dm.unlabeled_indices[:3], dm.unlabeled_indices[3:6]]
    few = datamodule(tmp_path, num_diagnostic_images=2).diagnostic_dataloader()
    assert [b["index"].tolist() for b in few] == [dm.unlabeled_indices[:2]]
    image, mask = dm.train_set[dm.unlabeled_indices[0]]
    assert image.shape[:2] == (32, 32)
    assert torch.equal(batches[0]["image"][0], torch.from_numpy(image[4:28, 4:28]).permute(2, 0, 1))
    assert torch.equal(batches[0]["mask"][0], torch.from_numpy(mask[4:28, 4:28]).long())
    assert batches[0]["valid"].all()
    again = next(iter(dm.diagnostic_dataloader()))
    assert torch.equal(again["image"], batches[0]["image"])  # the same crops at every validation
    assert datamodule(tmp_path, num_diagnostic_images=0).diagnostic_dataloader() is None
    with pytest.raises(ValueError, match="data.num_diagnostic_images"):
        datamodule(tmp_path, num_diagnostic_images=-1)


def test_diagnostic_crops_of_small_images_are_padded_as_training_crops_are(tmp_path):
    dm = datamodule(tmp_path, num_diagnostic_images=1, crop_size=40)
    batch = next(iter(dm.diagnostic_dataloader()))
    image, mask = dm.train_set[dm.unlabeled_indices[0]]
    assert batch["image"].shape[-2:] == (40, 40)
    assert torch.equal(batch["image"][0, :, :32, :32], torch.from_numpy(image).permute(2, 0, 1))
    assert (batch["image"][0, :, 32:] == 0).all() and (batch["mask"][0, 32:] == 255).all()
    assert torch.equal(batch["mask"][0, :32, :32], torch.from_numpy(mask).long())


def test_diagnostic_images_are_unlabeled_images_with_ground_truth(tmp_path):
    # Train pool: train_0..2 with a label file, train_u0 and train_u1 without.
    root = make_folder_dataset(tmp_path / "data", num_unlabeled_train=2)
    dm = datamodule(tmp_path, dataset="folder", root=str(root), dataset_options=None, num_labeled=1, crop_size=16,
                    num_diagnostic_images=3)
    chosen = [dm.train_set.ids[i] for i in dm.diagnostic_indices()]
    assert len(chosen) == 2 and all(dm.train_set.has_mask(i) for i in dm.diagnostic_indices())
    assert not set(dm.diagnostic_indices()) & set(dm.labeled_indices)
