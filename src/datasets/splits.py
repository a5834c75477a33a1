"""Label budgets and partial labels (METHODS.md 1.2 to 1.4): pure functions with their own RNG.

- `select_labeled` is the one entry point for a label budget: it picks the labeled images of a
  train pool by a rule (``random``, or ReCo's class-balanced ``balanced``) or from a file of ids;
  every other image is in the unlabeled pool. `write_split` records the choice in ``split.json``.
- `partial_mask` turns a full mask into ReCo's sparse ``p0``/``p1``/``p5``/``p25`` labels on the
  fly, deterministic per (run seed, image) through `partial_rng`: no label files are written.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from src.datasets.base import IGNORE_INDEX, DatasetError, SegmentationDataset
from src.utils import atomic_write_json

STRATEGIES = ("random", "balanced")
# Fraction of each class's pixels a partial label keeps; p0 keeps a single pixel.
PARTIAL_FRACTIONS = {"p0": 0.0, "p1": 0.01, "p5": 0.05, "p25": 0.25}
PARTIAL_MODES = tuple(PARTIAL_FRACTIONS)
# Salt of the partial-label generator, so that its stream differs from other uses of (seed, index).
_PARTIAL_SALT = 0x9A27


def random_split(num_items: int, num_labeled: int, seed: int) -> tuple[list[int], list[int]]:
    """Choose ``num_labeled`` of ``range(num_items)`` uniformly without replacement.

    Args:
        num_items: Size of the pool.
        num_labeled: How many items to label, in ``[0, num_items]``.
        seed: Seed of the generator (a private ``random.Random``, no global state).

    Returns:
        The labeled indices (sorted) and the unlabeled ones (the rest, in original order).
    """
    if not 0 <= num_labeled <= num_items:
        raise ValueError(f"num_labeled={num_labeled} must be in [0, num_items={num_items}]")
    labeled = sorted(random.Random(seed).sample(range(num_items), num_labeled))
    chosen = set(labeled)
    return labeled, [i for i in range(num_items) if i not in chosen]


def balanced_split(
    class_sets: list[set[int]], num_classes: int, num_labeled: int, seed: int, min_unique: int = 1
) -> tuple[list[int], list[int]]:
    """ReCo's greedy class-balanced selection (METHODS.md 1.2), with a guard against looping forever.

    Candidates (images with a non-empty class set) are shuffled with ``random.Random(seed)`` and
    popped from the end. One is accepted when it shows at least ``min_unique`` classes and, unless
    it is the first pick, one of the least-seen classes so far (``fill``, recomputed after every
    candidate over all ``num_classes`` classes); otherwise it is deferred, and the deferred images
    are retried once the order runs out. Because ``fill`` spans every class, a class that no
    candidate shows ends the selection once all others are seen (then the guard raises, where
    ReCo would loop forever).

    Args:
        class_sets: For every image, the classes its label shows (ignore removed); empty if unlabeled.
        num_classes: Number of classes ``C``; class ids are in ``[0, C)``.
        num_labeled: How many images to select.
        seed: Seed of the shuffle.
        min_unique: Least number of classes a selected image must show (ReCo: Pascal 3, Cityscapes 12).

    Returns:
        The selected indices in selection order, and the others in original order.

    Raises:
        DatasetError: Fewer than ``num_labeled`` candidates, or no remaining candidate qualifies.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if min_unique < 1:
        raise ValueError(f"min_unique must be >= 1, got {min_unique}")
    if num_labeled < 0:
        raise ValueError(f"num_labeled must be >= 0, got {num_labeled}")
    for i, classes in enumerate(class_sets):
        if any(not 0 <= c < num_classes for c in classes):
            raise ValueError(f"class_sets[{i}]={sorted(classes)} holds ids outside [0, {num_classes})")
    order = [i for i, classes in enumerate(class_sets) if classes]
    if num_labeled > len(order):
        raise DatasetError(f"num_labeled={num_labeled} but only {len(order)} images have labeled pixels")
    random.Random(seed).shuffle(order)

    count = np.zeros(num_classes, dtype=np.int64)
    fill = set(range(num_classes))
    selected: list[int] = []
    deferred: list[int] = []
    # Rejections since the last acceptance: once every deferred image has been rejected under the
    # current fill (which only changes on an acceptance), another pass would reject them all again.
    rejected_since_accept = 0
    while len(selected) < num_labeled:
        if not order:
            if rejected_since_accept >= len(deferred):
                raise DatasetError(
                    f"balanced split: no remaining image qualifies after {len(selected)} of num_labeled={num_labeled} "
                    f"picks (an image needs >= min_unique={min_unique} classes and one of the least-seen classes "
                    f"{sorted(fill)}); lower min_unique or use the 'random' strategy"
                )
            order, deferred = deferred, []
        index = order.pop()
        classes = class_sets[index]
        if len(classes) >= min_unique and (not selected or classes & fill):
            selected.append(index)
            count[list(classes)] += 1
            rejected_since_accept = 0
        else:
            deferred.append(index)
            rejected_since_accept += 1
        fill = set(np.flatnonzero(count == count.min()).tolist())
    chosen = set(selected)
    return selected, [i for i in range(len(class_sets)) if i not in chosen]


def read_split_file(path: str | Path, ids: list[str]) -> list[int]:
    """Indices in ``ids`` of the ids a split file lists, in file order.

    Lines hold an id or paths whose first one names the image (the community lists of
    UniMatch/CPS/U2PL: ``JPEGImages/2007_000032.jpg SegmentationClass/2007_000032.png``); ids
    are matched by file stem. Blank lines and ``#`` comments are skipped.

    Args:
        path: The split file.
        ids: The ids of the pool, by index.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"data.split_file {path}: file not found (expected one labeled id per line)")
    position = {name: i for i, name in enumerate(ids)}
    indices: list[int] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        stem = Path(line.split()[0]).stem
        if stem not in position:
            raise DatasetError(f"{path}:{number}: id {stem!r} is not in the train pool ({len(ids)} images)")
        if stem in seen:
            raise DatasetError(f"{path}:{number}: id {stem!r} is already listed on line {seen[stem]}")
        seen[stem] = number
        indices.append(position[stem])
    if not indices:
        raise DatasetError(f"{path}: lists no ids")
    return indices


def select_labeled(
    dataset: SegmentationDataset,
    num_labeled: int | None,
    strategy: str = "random",
    seed: int = 0,
    min_unique: int = 1,
    split_file: str | None = None,
) -> tuple[list[int], list[int]]:
    """Labeled and unlabeled indices of a train pool.

    Only images with a mask can be labeled; images without one are always in the unlabeled pool.

    Args:
        dataset: The train split.
        num_labeled: Labeled images to choose. ``None`` or ``<= 0``: every image with a mask is
            labeled (full supervision) and the unlabeled pool is every image.
        strategy: ``random`` or ``balanced`` (ReCo's greedy class-balanced rule).
        seed: Seed of the rule.
        min_unique: For ``balanced``: least number of classes a labeled image must show.
        split_file: A file of labeled ids (see `read_split_file`); replaces the rule, and
            ``num_labeled`` is then ignored (with a warning if it disagrees).

    Returns:
        Labeled indices and unlabeled indices (original order).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"data.split_strategy={strategy!r}; expected one of {STRATEGIES}")
    labelable = [i for i in range(len(dataset)) if dataset.has_mask(i)]
    if split_file is not None:
        labeled = read_split_file(split_file, dataset.ids)
        capable = set(labelable)
        missing = [dataset.ids[i] for i in labeled if i not in capable]
        if missing:
            raise DatasetError(
                f"data.split_file {split_file}: ids without a label: {missing[:5]} ({len(missing)} in all)"
            )
        if num_labeled is not None and num_labeled > 0 and num_labeled != len(labeled):
            warnings.warn(
                f"data.split_file {split_file} lists {len(labeled)} ids; data.num_labeled={num_labeled} is ignored",
                stacklevel=2,
            )
    elif num_labeled is None or num_labeled <= 0:
        return labelable, list(range(len(dataset)))
    elif num_labeled > len(labelable):
        raise DatasetError(
            f"data.num_labeled={num_labeled} but the train pool has only {len(labelable)} labeled images"
        )
    elif strategy == "random":
        positions, _ = random_split(len(labelable), num_labeled, seed)
        labeled = [labelable[p] for p in positions]
    else:
        labeled, _ = balanced_split(dataset.class_sets(), dataset.num_classes, num_labeled, seed, min_unique)
    chosen = set(labeled)
    return labeled, [i for i in range(len(dataset)) if i not in chosen]


def write_split(
    run_dir: str | Path,
    dataset: SegmentationDataset,
    labeled: list[int],
    unlabeled: list[int],
    info: dict[str, Any],
) -> Path:
    """Record a label split as ``run_dir/split.json``, written atomically.

    Args:
        run_dir: The run's folder (created if missing).
        dataset: The train split the indices refer to.
        labeled: Labeled indices.
        unlabeled: Unlabeled indices.
        info: How they were chosen, e.g. ``strategy``, ``seed`` and ``source`` (a split file or the rule).

    Returns:
        The path written.
    """
    path = Path(run_dir) / "split.json"
    atomic_write_json(
        path,
        {
            "dataset": dataset.name,
            "dataset_split": dataset.split,
            **info,
            "num_labeled_images": len(labeled),
            "num_unlabeled_images": len(unlabeled),
            "labeled_ids": [dataset.ids[i] for i in labeled],
            "unlabeled_ids": [dataset.ids[i] for i in unlabeled],
        },
    )
    return path


# ---------------------------------------------------------------------------------- partial labels
def partial_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image ``index``'s partial labels under run seed ``seed``.

    Each image gets its own stream, so its sparse label does not depend on which other images
    were loaded before it, nor on the data-loader worker that loads it.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"partial_rng needs seed >= 0 and index >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([_PARTIAL_SALT, seed, index])


def partial_mask(
    mask: np.ndarray, mode: str, rng: np.random.Generator, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """ReCo's sparse labels of one mask (METHODS.md 1.3); every other pixel becomes ``ignore_index``.

    For every class present (classes ascending, one seed pixel drawn uniformly per class):

    - ``p0``: only the seed pixel keeps its label.
    - ``p1``/``p5``/``p25`` (``p`` = 0.01/0.05/0.25): a binary map starting at the seed is
      dilated with a 5x5 kernel until its intersection with the class holds at least
      ``int(p * N_c)`` pixels; that intersection keeps its label (just the seed if the target <= 1).

    Args:
        mask: (H, W) class indices.
        mode: ``p0``, ``p1``, ``p5`` or ``p25``.
        rng: The image's generator, see `partial_rng`.
        ignore_index: Label of pixels without a class.

    Returns:
        The sparse mask, same shape and dtype as ``mask``.
    """
    if mode not in PARTIAL_FRACTIONS:
        raise ValueError(f"partial label mode {mode!r}; expected one of {PARTIAL_MODES}")
    if mask.ndim != 2:
        raise ValueError(f"partial_mask expects an (H, W) mask, got shape {mask.shape}")
    fraction = PARTIAL_FRACTIONS[mode]
    out = np.full_like(mask, ignore_index)
    for cls in np.unique(mask):
        if cls == ignore_index:
            continue
        ys, xs = np.nonzero(mask == cls)
        seed = int(rng.integers(len(ys)))
        target = int(fraction * len(ys))
        if target <= 1:
            out[ys[seed], xs[seed]] = cls
            continue
        # NOTE: ReCo dilates the map itself, not its intersection with the class (METHODS.md 1.3), so
        # after k dilations the map is the square of half-side 2k around the seed. Computing that
        # square directly from Chebyshev distances gives the same pixels as k calls of
        # cv2.dilate(kernel=ones(5, 5)) without the loop (checked against it in test_splits.py).
        distance = np.maximum(np.abs(ys - ys[seed]), np.abs(xs - xs[seed]))  # (N_c,)
        # Smallest even half-side 2k whose square holds >= target class pixels.
        reach = np.partition(distance, target - 1)[target - 1]
        half_side = 2 * int(np.ceil(reach / 2))
        keep = distance <= half_side
        out[ys[keep], xs[keep]] = cls
    return out
