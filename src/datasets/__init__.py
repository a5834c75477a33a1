"""Datasets by name: ``get_dataset("folder", root=..., split="train")``."""

from __future__ import annotations

from typing import Any

from src.datasets.base import IGNORE_INDEX, DatasetError, SegmentationDataset
from src.datasets.cityscapes import Cityscapes
from src.datasets.folder import FolderDataset
from src.datasets.pascal_voc import PascalVOC
from src.datasets.synthetic import SyntheticDataset

DATASETS: dict[str, type[SegmentationDataset]] = {
    cls.name: cls for cls in (SyntheticDataset, FolderDataset, PascalVOC, Cityscapes)
}


def get_dataset(name: str, **kwargs: Any) -> SegmentationDataset:
    """Build dataset ``name`` (a key of ``DATASETS``) with its keyword arguments."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name](**kwargs)


__all__ = ["DATASETS", "IGNORE_INDEX", "DatasetError", "SegmentationDataset", "get_dataset"]
