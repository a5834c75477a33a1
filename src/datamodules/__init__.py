"""Datamodules per method family; a method's YAML names its own (``data.class_path``)."""

from src.datamodules.base import SegmentationDataModule
from src.datamodules.semi_supervised import SemiSupervisedDataModule
from src.datamodules.supervised import SupervisedDataModule

__all__ = ["SegmentationDataModule", "SemiSupervisedDataModule", "SupervisedDataModule"]
