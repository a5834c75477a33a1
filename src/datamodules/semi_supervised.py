"""The semi-supervised datamodule: labeled and unlabeled training streams."""

from __future__ import annotations

from torch.utils.data import DataLoader

from src.datamodules.base import SegmentationDataModule
from src.datamodules.transforms import unlabeled_transform
from src.datasets import DatasetError
from src.datasets.views import UnlabeledView


class SemiSupervisedDataModule(SegmentationDataModule):
    """A labeled and an unlabeled stream from the split: the train loader is ``{"labeled", "unlabeled"}``.

    The unlabeled stream holds the images of the train pool outside the label budget (in
    partial-label mode, every image with its sparse labels), ``batch_size_unlabeled`` per step.
    It takes the arguments of `SegmentationDataModule`.
    """

    feeds_unlabeled = True

    def train_dataloader(self) -> dict[str, DataLoader]:
        hp = self.hparams
        loaders = {"labeled": self.labeled_stream()}
        if not self.unlabeled_indices:
            raise DatasetError(
                f"the unlabeled pool is empty (num_labeled={hp.num_labeled} takes every image of the train split); "
                "use a smaller data.num_labeled or a supervised method"
            )
        unlabeled = UnlabeledView(
            self.train_set, self.unlabeled_indices, unlabeled_transform(hp.crop_size, hp.train_resize),
            mask_hook=self.mask_hook(),
        )
        loaders["unlabeled"] = self.stream(unlabeled, hp.batch_size_unlabeled, self.stream_seed() + 1)
        return loaders
