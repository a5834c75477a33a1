"""What every datamodule of the suite shares: the dataset, the label split, the training streams' machinery,
diagnostics and evaluation loaders.

Datamodules are per method family and a method's YAML names its own (``data.class_path``):
`SupervisedDataModule` feeds the labeled stream alone, `SemiSupervisedDataModule` the labeled and
the unlabeled one. Both derive from `SegmentationDataModule` here, which takes the dataset by name.

Training is counted in steps. Each training stream is an independent infinite random sampler
(5 labeled images are cycled, never exhausted); the train loader is a dict of streams (``"labeled"``,
and ``"unlabeled"`` where there is one) whose batches Lightning zips together.

A stream is a pure function of its seed: the image at each position comes from the sampler's
permutations, and its augmentation from random state derived from (seed, position) alone. So
the data do not depend on the number of workers or on what they had prefetched, and a resumed
run continues every stream at the position its checkpoint's step implies.
"""

from __future__ import annotations

import itertools
import random
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from src.datamodules.transforms import diagnostic_transform, eval_transform, labeled_transform
from src.datasets import DATASETS, DatasetError, SegmentationDataset, get_dataset
from src.datasets.splits import PARTIAL_MODES, partial_mask, partial_rng, select_labeled, write_split
from src.datasets.views import LabeledView, UnlabeledView, pad_collate, pad_collate_with_valid

# Lightning warns that a loader without state_dict/load_state_dict cannot resume mid-epoch; the
# training streams resume from the restored step instead (`SegmentationDataModule.stream`).
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


class InfiniteSampler(Sampler[int]):
    """Random permutations of ``range(num_items)`` back to back: ``num_samples`` indices from position ``start``.

    Every item is seen once per pass before any repeats (a tighter cycle than sampling with
    replacement); the permutation stream depends only on ``seed``, and ``start`` skips its first
    positions (those a resumed run has already trained on).
    """

    def __init__(self, num_items: int, num_samples: int, seed: int, start: int = 0) -> None:
        if num_items < 1:
            raise ValueError("InfiniteSampler needs at least one item")
        self.num_items = num_items
        self.num_samples = num_samples
        self.seed = seed
        self.start = start

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(self._stream(), self.start, self.start + self.num_samples)

    def _stream(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield from torch.randperm(self.num_items, generator=generator).tolist()


class PositionSampler(InfiniteSampler):
    """An `InfiniteSampler` whose items are ``(position, index)``: each index with its place in the stream."""

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        return enumerate(super().__iter__(), self.start)


class StreamView(Dataset):
    """A training view read at stream positions, each sample augmented with random state of its own.

    Item ``(position, i)`` is ``view[i]`` with the view's albumentations pipeline reseeded from
    ``(seed, position)``: which worker makes a sample, how many workers there are and what they
    had prefetched when a checkpoint was taken do not change it.

    Args:
        view: A `LabeledView` or `UnlabeledView` (its transform is an albumentations pipeline or None).
        seed: The stream's seed.
    """

    def __init__(self, view: LabeledView | UnlabeledView, seed: int) -> None:
        self.view = view
        self.seed = seed

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        position, i = key
        if self.view.transform is not None:
            sequence = np.random.SeedSequence([self.seed, position])
            # One generator pair for the whole pipeline: `set_random_seed` would give each
            # transform its own copy of the same stream, so their draws would coincide.
            self.view.transform.set_random_state(
                np.random.default_rng(sequence), random.Random(int(sequence.generate_state(1)[0]))
            )
        return self.view[i]


class PartialLabels:
    """Mask hook for partial-label mode: the sparse mask of image ``index`` under ``seed``.

    A picklable object (data-loader workers copy it); deterministic per (seed, index).
    """

    def __init__(self, mode: str, seed: int, ignore_index: int) -> None:
        self.mode, self.seed, self.ignore_index = mode, seed, ignore_index

    def __call__(self, mask: np.ndarray, index: int) -> np.ndarray:
        return partial_mask(mask, self.mode, partial_rng(self.seed, index), ignore_index=self.ignore_index)


class SegmentationDataModule(pl.LightningDataModule, ABC):
    """One dataset's train split with a label budget, its training streams and its evaluation loaders.

    A subclass chooses the training streams (`train_dataloader`) and says whether one of them holds
    unlabeled images (``feeds_unlabeled``); a method that trains on unlabeled images refuses a
    datamodule without them (`SemiSupervisedModule.setup`).

    Args:
        dataset: Dataset name: ``synthetic`` (embedded, default), ``folder``, ``pascal_voc``, ``cityscapes``.
        root: Dataset folder (not needed for ``synthetic``).
        dataset_options: Extra keyword arguments of the dataset class (e.g. ``image_size`` for synthetic).
        num_labeled: Labeled images taken from the train pool; the rest is the unlabeled pool.
            0 means every image with a label is labeled (full supervision).
        split_strategy: ``random`` or ``balanced`` (ReCo's greedy class-balanced rule).
        min_unique: For ``balanced``: least number of classes a chosen image must show.
        split_file: A file of labeled ids (e.g. a community split list); overrides the sampling rule.
        partial_labels: None, or ``p0``/``p1``/``p5``/``p25``: train on sparse labels of every image.
        seed: Seed of the label split and partial labels (the CLI links it to ``seed_everything``).
        split_seed: Seed of the label split alone, when it must not follow ``seed``: e.g. one fixed
            split per budget, as the community split lists are, with the run seed varying training only.
        crop_size: Side of the square training crops; also the sliding-window size.
        scale_range: Random rescale range of labeled training images.
        photometric: Colour jitter and Gaussian blur of labeled training crops (METHODS.md 1.5).
        batch_size_labeled: Labeled images per step.
        batch_size_unlabeled: Unlabeled images per step, where there is an unlabeled stream (a
            labeled-only datamodule takes the option and ignores it, so that one overlay serves every method).
        val_batch_size: Images per evaluation batch (padded to the largest; padding is ignored).
        num_workers: Data-loader worker processes per loader.
        eval_resize: None to evaluate at full size, or the longest side to resize eval images to.
        train_resize: None, or the longest side training images are resized to before scale and crop
            (the ReCo protocol trains Cityscapes at 1024x512).
        train_split: Split of the train pool (labeled and unlabeled images), e.g. ``train_aug`` for VOC.
        val_split: Split used for validation.
        test_split: Split used by ``test``.
        num_diagnostic_images: How many images of the unlabeled pool with ground truth (the first
            ones, in pool order) every validation labels with the method's pseudo-labeller for the
            ``diag/`` scores (`src.pl_modules.diagnostics`); their labels serve nothing else. 0: off.
    """

    # Whether the train loader has an ``"unlabeled"`` stream.
    feeds_unlabeled = False

    def __init__(
        self,
        dataset: str = "synthetic",
        root: str | None = None,
        dataset_options: dict[str, Any] | None = None,
        num_labeled: int = 15,
        split_strategy: str = "random",
        min_unique: int = 1,
        split_file: str | None = None,
        partial_labels: str | None = None,
        seed: int = 0,
        split_seed: int | None = None,
        crop_size: int = 64,
        scale_range: tuple[float, float] = (0.75, 1.25),
        photometric: bool = True,
        batch_size_labeled: int = 8,
        batch_size_unlabeled: int = 8,
        val_batch_size: int = 16,
        num_workers: int = 2,
        eval_resize: int | None = None,
        train_resize: int | None = None,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        num_diagnostic_images: int = 64,
    ) -> None:
        super().__init__()
        if partial_labels is not None and partial_labels not in PARTIAL_MODES:
            raise ValueError(f"data.partial_labels={partial_labels!r}; expected None or one of {PARTIAL_MODES}")
        for name, value in (("crop_size", crop_size), ("batch_size_labeled", batch_size_labeled),
                            ("batch_size_unlabeled", batch_size_unlabeled), ("val_batch_size", val_batch_size)):
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        if num_diagnostic_images < 0:
            raise ValueError(f"data.num_diagnostic_images must be >= 0 (0 = off), got {num_diagnostic_images}")
        self.save_hyperparameters()
        self.dataset_name = dataset
        self.dataset_kwargs = {"root": root, **(dataset_options or {})}
        self.train_set = self._make_dataset(train_split)
        self.num_classes = self.train_set.num_classes
        self.ignore_index = self.train_set.ignore_index
        self.class_names = list(self.train_set.classes)
        self.labeled_indices: list[int] = []
        self.unlabeled_indices: list[int] = []

    def _make_dataset(self, split: str) -> SegmentationDataset:
        if self.dataset_name not in DATASETS:
            raise DatasetError(f"data.dataset: unknown dataset {self.dataset_name!r}; expected one of {sorted(DATASETS)}")
        if self.dataset_name != "synthetic" and self.dataset_kwargs.get("root") is None:
            raise DatasetError(f"data.root is required for dataset {self.dataset_name!r} (the folder that holds it)")
        return get_dataset(self.dataset_name, split=split, **self.dataset_kwargs)

    # ---------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        hp = self.hparams
        if stage == "fit" and not self.labeled_indices:
            if hp.partial_labels is not None:
                # Partial-label mode trains on every labeled image in both streams (METHODS.md 1.3).
                labeled, _ = select_labeled(self.train_set, 0)
                unlabeled = list(range(len(self.train_set)))
                source = f"partial labels {hp.partial_labels}"
            else:
                labeled, unlabeled = select_labeled(
                    self.train_set,
                    hp.num_labeled,
                    strategy=hp.split_strategy,
                    seed=hp.seed if hp.split_seed is None else hp.split_seed,
                    min_unique=hp.min_unique,
                    split_file=hp.split_file,
                )
                source = hp.split_file or hp.split_strategy
            self.labeled_indices, self.unlabeled_indices = labeled, unlabeled
            run_dir = self._run_dir()
            if run_dir is not None:
                write_split(
                    run_dir,
                    self.train_set,
                    labeled,
                    unlabeled,
                    {"dataset": self.dataset_name, "source": source, "strategy": hp.split_strategy,
                     "seed": hp.seed, "split_seed": hp.split_seed, "num_labeled": hp.num_labeled,
                     "partial_labels": hp.partial_labels},
                )
        if stage in ("fit", "validate"):
            self.val_set = self._make_dataset(hp.val_split)
        if stage == "test":
            self.test_set = self._make_dataset(hp.test_split)
        if stage == "predict":
            self.val_set = self._make_dataset(hp.val_split)

    def _run_dir(self) -> Path | None:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return None
        # `trainer.log_dir` broadcasts from rank 0, so every rank must ask for it.
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        return run_dir if trainer.is_global_zero else None

    # ---------------------------------------------------------------- loaders
    def mask_hook(self) -> PartialLabels | None:
        """The partial-label mask hook of the training views (None without partial labels)."""
        if self.hparams.partial_labels is None:
            return None
        return PartialLabels(self.hparams.partial_labels, self.hparams.seed, self.ignore_index)

    def stream(self, view: LabeledView | UnlabeledView, batch_size: int, seed: int) -> DataLoader:
        """An infinite training stream of ``view``, ``batch_size`` per step, for ``trainer.max_steps`` steps."""
        num_steps = self._num_steps()
        workers = self.hparams.num_workers
        # A resumed run goes on where its checkpoint's step left the stream (a batch per training batch).
        trainer = self.trainer
        start = trainer.global_step * trainer.accumulate_grad_batches * batch_size
        return DataLoader(
            StreamView(view, seed),
            batch_size=batch_size,
            sampler=PositionSampler(len(view), num_steps * batch_size, seed, start),
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=True,
            # Without a generator of its own, each new iterator would draw its seed from the global RNG.
            generator=torch.Generator().manual_seed(seed),
        )

    def _num_steps(self) -> int:
        trainer = getattr(self, "trainer", None)
        max_steps = trainer.max_steps if trainer is not None else -1
        if max_steps is None or max_steps < 1:
            raise ValueError("trainer.max_steps must be set (training is counted in steps), e.g. --trainer.max_steps 1500")
        # Lightning also calls the loader after a resume: any length >= the remaining steps works.
        return max_steps

    @abstractmethod
    def train_dataloader(self) -> dict[str, DataLoader]:
        """The training streams by name: ``"labeled"`` (`labeled_stream`), and ``"unlabeled"`` where there is one."""

    def stream_seed(self) -> int:
        """The labeled stream's seed; the unlabeled stream takes the next one.

        Distinct seeds per stream and per rank: every rank and stream draws its own order, so
        Lightning's distributed sampler is not needed (the CLI sets use_distributed_sampler=False).
        """
        rank = self.trainer.global_rank if getattr(self, "trainer", None) is not None else 0
        return self.hparams.seed * 1000 + rank * 2

    def labeled_stream(self) -> DataLoader:
        """The labeled images of the split, augmented for training, ``batch_size_labeled`` per step."""
        hp = self.hparams
        labeled = LabeledView(
            self.train_set,
            self.labeled_indices,
            labeled_transform(hp.crop_size, tuple(hp.scale_range), hp.photometric, hp.train_resize),
            mask_hook=self.mask_hook(),
        )
        return self.stream(labeled, hp.batch_size_labeled, self.stream_seed())

    def _eval_loader(self, dataset: SegmentationDataset) -> DataLoader:
        view = LabeledView(dataset, range(len(dataset)), eval_transform(self.hparams.eval_resize))
        trainer = getattr(self, "trainer", None)
        # The CLI turns Lightning's sampler replacement off (the training streams are rank-aware
        # already), so evaluation is sharded here. DistributedSampler repeats a few images to even
        # out the shards, as Lightning's own would.
        sampler = None
        if trainer is not None and trainer.world_size > 1:
            sampler = DistributedSampler(view, trainer.world_size, trainer.global_rank, shuffle=False)
        return DataLoader(
            view,
            batch_size=self.hparams.val_batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
            collate_fn=pad_collate,
            # Keeps the global RNG untouched: persistent workers make one iterator per fit, so a
            # resumed fit would otherwise draw once more from it than an uninterrupted one.
            generator=torch.Generator(),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    def diagnostic_indices(self) -> list[int]:
        """The first ``num_diagnostic_images`` images of the unlabeled pool that have ground truth, in pool order."""
        with_mask = (i for i in self.unlabeled_indices if self.train_set.has_mask(i))
        return list(itertools.islice(with_mask, self.hparams.num_diagnostic_images))

    def diagnostic_dataloader(self) -> DataLoader | None:
        """The diagnostic images, with ground truth and ``valid``; None if none.

        Each is its centre crop at the training crop size (`diagnostic_transform`), in whole batches
        of the unlabeled batch size (the images past the last whole one are left out, unless there
        are fewer than one batch): what a method labels in training, without the randomness. A
        train-mode BatchNorm cannot normalise a batch of one. Every rank reads them all; they are
        read in this process (a few dozen images per validation).
        """
        indices = self.diagnostic_indices()
        if not indices:
            return None
        hp = self.hparams
        view = LabeledView(self.train_set, indices, diagnostic_transform(hp.crop_size, hp.train_resize))
        return DataLoader(
            view,
            batch_size=min(hp.batch_size_unlabeled, len(indices)),
            drop_last=True,
            shuffle=False,
            num_workers=0,
            collate_fn=pad_collate_with_valid,
            generator=torch.Generator(),  # iterating leaves the global RNG alone
        )
