"""Label budgets (random, ReCo's class-balanced rule, split files), split.json and partial labels."""

from __future__ import annotations

import json
import random
from pathlib import Path

import cv2
import numpy as np
import pytest

from src.datasets.base import IGNORE_INDEX, DatasetError, SegmentationDataset
from src.datasets.splits import (
    PARTIAL_FRACTIONS,
    balanced_split,
    partial_mask,
    partial_rng,
    random_split,
    select_labeled,
    write_split,
)


class MemoryDataset(SegmentationDataset):
    """Masks held in memory (None = unlabeled image); images are blank."""

    name = "memory"

    def __init__(self, masks: list[np.ndarray | None], num_classes: int) -> None:
        super().__init__("train")
        self.masks = masks
        self.classes = tuple(f"c{c}" for c in range(num_classes))
        self.ids = [f"img{i}" for i in range(len(masks))]

    def load_image(self, index: int) -> np.ndarray:
        return np.zeros((4, 4, 3), np.uint8)

    def load_mask(self, index: int) -> np.ndarray | None:
        return self.masks[index]


def mask_of(*classes: int) -> np.ndarray:
    """A 4x4 mask showing exactly ``classes`` (and some ignore)."""
    mask = np.full((4, 4), IGNORE_INDEX, np.uint8)
    mask.ravel()[: len(classes)] = classes
    return mask


def shuffled(items: list[int], seed: int) -> list[int]:
    order = list(items)
    random.Random(seed).shuffle(order)
    return order


# ------------------------------------------------------------------------------------ random
def test_random_split_is_a_deterministic_partition() -> None:
    labeled, unlabeled = random_split(20, 5, seed=3)
    assert (labeled, unlabeled) == random_split(20, 5, seed=3)
    assert len(labeled) == 5 and labeled == sorted(labeled)
    assert unlabeled == [i for i in range(20) if i not in labeled]
    assert random_split(20, 5, seed=4)[0] != labeled


def test_random_split_budget_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"num_labeled=6 must be in \[0, num_items=5\]"):
        random_split(5, 6, seed=0)


# ------------------------------------------------------------------------------------ balanced
def test_balanced_min_unique_and_unlabeled_images() -> None:
    # With min_unique=2 only images 1, 2, 3 qualify, whatever the shuffle; 5 is unlabeled.
    class_sets = [{0}, {0, 1}, {1, 2}, {0, 2}, {2}, set()]
    for seed in range(5):
        labeled, unlabeled = balanced_split(class_sets, 3, 3, seed=seed, min_unique=2)
        assert sorted(labeled) == [1, 2, 3] and unlabeled == [0, 4, 5]


def test_balanced_covers_least_seen_classes() -> None:
    class_sets = [{c} for c in (0, 0, 0, 1, 1, 1, 2, 2, 2)]
    for seed in range(5):
        labeled, _ = balanced_split(class_sets, 3, 3, seed=seed)
        assert labeled[0] == shuffled(list(range(9)), seed)[-1]  # popped from the end
        assert sorted(next(iter(class_sets[i])) for i in labeled) == [0, 1, 2]
        labeled, _ = balanced_split(class_sets, 3, 6, seed=seed)
        assert sorted(next(iter(class_sets[i])) for i in labeled) == [0, 0, 1, 1, 2, 2]


def test_balanced_defers_and_retries() -> None:
    # Image 3 is the only one with class 1. Pick a seed that shuffles it to the front of the
    # order, so it is popped last: after the first pick (class 0) fill is {1}, the two class-0
    # images popped next are deferred, 3 is accepted, then the order is the deferred list.
    class_sets = [{0}, {0}, {0}, {1}]
    seed = next(s for s in range(100) if shuffled([0, 1, 2, 3], s)[0] == 3)
    order = shuffled([0, 1, 2, 3], seed)
    labeled, unlabeled = balanced_split(class_sets, 2, 3, seed=seed)
    assert labeled == [order[3], 3, order[1]]
    assert unlabeled == [order[2]]


def test_balanced_is_deterministic_per_seed() -> None:
    rng = np.random.default_rng(0)
    class_sets = [set(rng.choice(5, size=rng.integers(1, 4), replace=False).tolist()) for _ in range(40)]
    first = balanced_split(class_sets, 5, 8, seed=1)
    assert first == balanced_split(class_sets, 5, 8, seed=1)
    assert first[0] != balanced_split(class_sets, 5, 8, seed=2)[0]


def test_balanced_guard_when_nothing_qualifies() -> None:
    # After the first pick class 1 is the least seen, and no image shows it.
    with pytest.raises(DatasetError, match=r"no remaining image qualifies after 1 of num_labeled=2.*\[1\]"):
        balanced_split([{0}, {0}, {0}], 2, 2, seed=0)
    with pytest.raises(DatasetError, match=r"min_unique=3"):
        balanced_split([{0, 1}, {0, 1}], 2, 1, seed=0, min_unique=3)


# ------------------------------------------------------------------------------------ select_labeled
def make_pool() -> MemoryDataset:
    masks = [mask_of(0), mask_of(1), None, mask_of(0, 1), mask_of(1), None, mask_of(0)]
    return MemoryDataset(masks, num_classes=2)


@pytest.mark.parametrize("strategy", ["random", "balanced"])
def test_select_labeled_skips_unlabeled_images(strategy: str) -> None:
    dataset = make_pool()
    labeled, unlabeled = select_labeled(dataset, 3, strategy=strategy, seed=0)
    assert len(labeled) == 3 and not {2, 5} & set(labeled)
    assert unlabeled == [i for i in range(7) if i not in labeled]
    assert select_labeled(dataset, 3, strategy=strategy, seed=0) == (labeled, unlabeled)


@pytest.mark.parametrize("num_labeled", [0, -1, None])
def test_select_labeled_full_supervision(num_labeled: int | None) -> None:
    assert select_labeled(make_pool(), num_labeled) == ([0, 1, 3, 4, 6], list(range(7)))


def test_select_labeled_budget_larger_than_pool() -> None:
    with pytest.raises(DatasetError, match="num_labeled=6 but the train pool has only 5 labeled images"):
        select_labeled(make_pool(), 6)


def test_select_labeled_unknown_strategy() -> None:
    with pytest.raises(ValueError, match=r"'greedy'.*\('random', 'balanced'\)"):
        select_labeled(make_pool(), 2, strategy="greedy")


def test_split_file_lines(tmp_path: Path) -> None:
    split_file = tmp_path / "labeled.txt"
    split_file.write_text("# community format and plain ids\nJPEGImages/img4.jpg SegmentationClass/img4.png\n\nimg0\n")
    assert select_labeled(make_pool(), 0, split_file=str(split_file)) == ([4, 0], [1, 2, 3, 5, 6])


def test_split_file_unknown_id(tmp_path: Path) -> None:
    split_file = tmp_path / "labeled.txt"
    split_file.write_text("img0\nimg9\n")
    with pytest.raises(DatasetError, match=r"labeled\.txt:2: id 'img9' is not in the train pool"):
        select_labeled(make_pool(), 0, split_file=str(split_file))


def test_split_file_id_without_label(tmp_path: Path) -> None:
    split_file = tmp_path / "labeled.txt"
    split_file.write_text("img2\n")
    with pytest.raises(DatasetError, match=r"ids without a label: \['img2'\]"):
        select_labeled(make_pool(), 0, split_file=str(split_file))


def test_write_split(tmp_path: Path) -> None:
    dataset = make_pool()
    labeled, unlabeled = select_labeled(dataset, 2, seed=1)
    info = {"strategy": "random", "seed": 1, "source": "random"}
    path = write_split(tmp_path / "run", dataset, labeled, unlabeled, info)
    record = json.loads(path.read_text())
    assert record["labeled_ids"] == [dataset.ids[i] for i in labeled]
    assert record["num_unlabeled_images"] == 5 and len(record["unlabeled_ids"]) == 5
    assert {key: record[key] for key in info} == info and record["dataset"] == "memory"
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]  # no temp file left behind


# ------------------------------------------------------------------------------------ partial labels
def random_mask(seed: int, shape: tuple[int, int] = (30, 40)) -> np.ndarray:
    """Blocky classes 0..3 (several pieces per class) with some ignore."""
    rng = np.random.default_rng(seed)
    coarse = rng.choice([0, 1, 2, 3, IGNORE_INDEX], size=(shape[0] // 5, shape[1] // 5), p=[0.3, 0.2, 0.2, 0.2, 0.1])
    return np.kron(coarse, np.ones((5, 5), int)).astype(np.uint8)


def reference_partial(mask: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """ReCo's loop, written plainly: dilate the seed map until its overlap with the class is big enough."""
    out = np.full_like(mask, IGNORE_INDEX)
    for cls in np.unique(mask):
        if cls == IGNORE_INDEX:
            continue
        region = mask == cls
        ys, xs = np.nonzero(region)
        pick = int(rng.integers(len(ys)))
        grown = np.zeros(mask.shape, np.uint8)
        grown[ys[pick], xs[pick]] = 1
        while (grown.astype(bool) & region).sum() < int(fraction * len(ys)):
            grown = cv2.dilate(grown, np.ones((5, 5), np.uint8))
        out[grown.astype(bool) & region] = cls
    return out


def test_partial_p0_keeps_one_pixel_per_class() -> None:
    mask = random_mask(0)
    sparse = partial_mask(mask, "p0", partial_rng(0, 0))
    assert sparse.shape == mask.shape and sparse.dtype == mask.dtype
    classes = [c for c in np.unique(mask) if c != IGNORE_INDEX]
    for cls in classes:
        kept = sparse == cls
        assert kept.sum() == 1 and mask[kept].item() == cls
    assert (sparse != IGNORE_INDEX).sum() == len(classes)


@pytest.mark.parametrize("mode", ["p1", "p5", "p25"])
def test_partial_region_grown_from_a_seed(mode: str) -> None:
    mask = random_mask(1)
    sparse = partial_mask(mask, mode, partial_rng(0, 7))
    for cls in (c for c in np.unique(mask) if c != IGNORE_INDEX):
        region = mask == cls
        kept = sparse == cls
        target = int(PARTIAL_FRACTIONS[mode] * region.sum())
        assert kept.sum() >= max(target, 1) and not (kept & ~region).any()
        # kept = the class inside the smallest square of even half-side around one seed pixel that
        # holds >= target class pixels (what repeated 5x5 dilations of the seed reach).
        rows, cols = np.indices(mask.shape)

        def grown_from(y: int, x: int) -> np.ndarray:
            half = 0
            while True:
                inside = region & (np.abs(rows - y) <= half) & (np.abs(cols - x) <= half)
                if inside.sum() >= target:
                    return inside
                half += 2

        assert any(np.array_equal(kept, grown_from(y, x)) for y, x in zip(*np.nonzero(kept))), (
            f"class {cls}: the kept pixels are not the region grown from any one seed"
        )


def test_partial_one_connected_region_on_a_convex_class() -> None:
    mask = np.zeros((24, 30), np.uint8)
    mask[4:20, 6:26] = 1
    sparse = partial_mask(mask, "p25", partial_rng(3, 0))
    count, _ = cv2.connectedComponents((sparse == 1).astype(np.uint8), connectivity=8)
    assert count - 1 == 1 and (sparse == 1).sum() >= int(0.25 * 16 * 20)


@pytest.mark.parametrize("mode", ["p0", "p1", "p5", "p25"])
def test_partial_matches_dilation_loop(mode: str) -> None:
    for seed in range(3):
        mask = random_mask(10 + seed)
        expected = reference_partial(mask, PARTIAL_FRACTIONS[mode], partial_rng(seed, 5))
        np.testing.assert_array_equal(partial_mask(mask, mode, partial_rng(seed, 5)), expected)


def test_partial_small_target_keeps_the_seed() -> None:
    mask = np.zeros((10, 10), np.uint8)  # 100 pixels: int(0.01 * 100) = 1
    assert (partial_mask(mask, "p1", partial_rng(0, 0)) == 0).sum() == 1


def test_partial_rng_is_deterministic_per_seed_and_image() -> None:
    mask = random_mask(2)
    first = partial_mask(mask, "p5", partial_rng(1, 4))
    np.testing.assert_array_equal(first, partial_mask(mask, "p5", partial_rng(1, 4)))
    others = [partial_mask(mask, "p5", partial_rng(s, i)) for s, i in ((2, 4), (1, 5))]
    assert all(not np.array_equal(first, other) for other in others)


def test_partial_unknown_mode() -> None:
    with pytest.raises(ValueError, match=r"'p10'.*\('p0', 'p1', 'p5', 'p25'\)"):
        partial_mask(np.zeros((4, 4), np.uint8), "p10", partial_rng(0, 0))
