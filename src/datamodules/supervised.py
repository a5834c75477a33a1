"""The labeled-only datamodule: for methods that train on labeled images alone."""

from __future__ import annotations

from torch.utils.data import DataLoader

from src.datamodules.base import SegmentationDataModule


class SupervisedDataModule(SegmentationDataModule):
    """The labeled stream of the split alone: the supervised baseline, and reconstruction pretraining
    (``num_labeled: 0`` makes that stream every train image with a label).

    It takes the arguments of `SegmentationDataModule` and ignores ``batch_size_unlabeled``.
    """

    feeds_unlabeled = False

    def train_dataloader(self) -> dict[str, DataLoader]:
        return {"labeled": self.labeled_stream()}
