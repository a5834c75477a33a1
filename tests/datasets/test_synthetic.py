"""The synthetic dataset: deterministic, well-formed, and hard in the ways the benchmark needs."""

from __future__ import annotations

import numpy as np
import pytest

from src.datasets import DATASETS, DatasetError
from src.datasets.base import SegmentationDataset
from src.datasets.splits import select_labeled
from src.datasets.synthetic import CLASSES, VARIANTS, SyntheticDataset, generate_scene

SIZE = 64  # smaller than the default 96 to keep the suite fast; shapes scale with the size
# Pixel sums of train scene 2 at SIZE, seed 0: any change to how benchmark scenes are drawn shows here.
PINNED_SCENE_2 = (1527039, 10024)


def small(split: str = "train", seed: int = 0, size: int = SIZE, count: int = 60) -> SyntheticDataset:
    return SyntheticDataset(split=split, image_size=size, num_train=count, num_val=count, num_test=count, seed=seed)


def test_registered_with_the_classes_it_draws() -> None:
    assert DATASETS["synthetic"] is SyntheticDataset
    dataset = SyntheticDataset()
    assert dataset.classes == CLASSES and CLASSES[0] == "background"
    assert 7 <= dataset.num_classes <= 9
    assert (len(SyntheticDataset()), len(SyntheticDataset(split="val")), len(SyntheticDataset(split="test"))) == (
        2000, 300, 300)
    assert dataset.ids[42] == "train_00042"


def test_samples_are_deterministic_per_seed_split_and_index() -> None:
    first, again = small(), small()
    image, mask = first[3]
    # A fresh dataset, and the same one after visiting another index (the one-scene cache), agree.
    first[5]
    for other in (again[3], first[3]):
        np.testing.assert_array_equal(other[0], image)
        np.testing.assert_array_equal(other[1], mask)
    assert not np.array_equal(first[4][0], image)
    assert not np.array_equal(small(seed=1)[3][0], image)
    assert not np.array_equal(small(split="val")[3][0], image)
    assert not np.array_equal(small(split="test")[3][0], small(split="val")[3][0])


def test_generate_scene_is_a_pure_function_of_the_generator_state() -> None:
    a = generate_scene(np.random.default_rng(7), 48)
    b = generate_scene(np.random.default_rng(7), 48)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("size", [48, 96])
def test_dtypes_shapes_and_label_values(size: int) -> None:
    dataset = small(size=size, count=8)
    for i in range(len(dataset)):
        image, mask = dataset[i]
        assert image.dtype == np.uint8 and image.shape == (size, size, 3)
        assert mask.dtype == np.uint8 and mask.shape == (size, size)
        assert mask.max() < len(CLASSES)  # every pixel is labeled: no ignore index
        assert 0 in mask  # background always shows


def test_every_foreground_class_appears_and_scenes_hold_several_objects() -> None:
    dataset = small(count=50)
    masks = [dataset.load_mask(i) for i in range(len(dataset))]
    seen = set(np.unique(np.stack(masks)).tolist())
    assert seen == set(range(len(CLASSES)))
    # Several objects per image: on average at least 2.5 distinct foreground classes.
    assert np.mean([len(np.unique(m)) - 1 for m in masks]) >= 2.5


def test_a_class_has_no_fixed_colour() -> None:
    dataset = small(count=50)
    means = []
    for i in range(len(dataset)):
        image, mask = dataset[i]
        if (mask == 1).sum() >= 20:
            means.append(image[mask == 1].mean(axis=0))
    assert len(means) >= 5
    # The mean colour of the "disc" pixels spreads over much of the range, in every channel.
    assert np.all(np.std(means, axis=0) > 20)


def test_class_sets_match_the_masks() -> None:
    dataset = small(count=20)
    assert dataset.class_sets() == SegmentationDataset.class_sets(dataset)


def test_splitting_by_label_budget_paints_no_scene() -> None:
    """Every scene is labeled; the split (and its class-balanced rule) must not paint them to find out."""
    dataset = small(count=20)
    labeled, unlabeled = select_labeled(dataset, 5, strategy="balanced")
    assert len(labeled) == 5 and len(unlabeled) == 15
    assert dataset._cache == {}
    assert all(dataset.has_mask(i) == (dataset.load_mask(i) is not None) for i in range(3))
    with pytest.raises(IndexError):
        dataset.has_mask(20)


def test_bad_arguments_raise() -> None:
    with pytest.raises(DatasetError, match="'train'"):
        SyntheticDataset(split="validation")
    with pytest.raises(ValueError, match="image_size"):
        SyntheticDataset(image_size=8)
    with pytest.raises(ValueError, match="num_val"):
        SyntheticDataset(num_val=0)
    with pytest.raises(ValueError, match="seed"):
        SyntheticDataset(seed=-1)
    with pytest.raises(IndexError):
        small(count=3).load_image(3)


def test_source_variant_shares_no_class_texture_or_image_with_the_benchmark() -> None:
    """The upstream task of the pretrained encoder (src/pretrain.py) must not leak the benchmark."""
    benchmark, source = VARIANTS["benchmark"], VARIANTS["source"]
    assert set(benchmark.classes[1:]).isdisjoint(source.classes[1:])
    assert set(benchmark.textures.values()).isdisjoint(source.textures.values())
    data = SyntheticDataset(split="train", image_size=SIZE, num_train=20, variant="source")
    assert data.classes == source.classes
    images = [data[i][0] for i in range(20)]
    benchmark_images = [small(count=20)[i][0] for i in range(20)]
    assert not any(np.array_equal(a, b) for a in images for b in benchmark_images)
    masks = np.stack([data[i][1] for i in range(20)])
    assert set(np.unique(masks)) == set(range(len(source.classes)))  # every source class is drawn
    assert data.class_sets()[3] == set(np.unique(data[3][1]).tolist())  # layout-only masks agree


def test_benchmark_scenes_do_not_depend_on_the_variant_code() -> None:
    """The default variant draws the scenes it drew before variants existed (pinned pixel sums)."""
    image, mask = small(count=3)[2]
    assert (int(image.astype(np.int64).sum()), int(mask.astype(np.int64).sum())) == PINNED_SCENE_2
