import warnings

import numpy as np
import torch

from src.datasets.base import SegmentationDataset
from src.datasets.views import LabeledView, UnlabeledView, pad_collate_with_valid, to_tensors


def test_pad_collate_with_valid_marks_the_padding():
    samples = [
        {"image": torch.ones(3, h, w, dtype=torch.uint8), "mask": torch.zeros(h, w, dtype=torch.long), "index": torch.tensor(i)}
        for i, (h, w) in enumerate([(4, 5), (2, 6)])
    ]
    batch = pad_collate_with_valid(samples)
    assert batch["image"].shape == (2, 3, 4, 6) and batch["valid"].dtype == torch.bool
    assert torch.equal(batch["valid"], batch["mask"] != 255)  # here every image pixel is labelled
    assert int(batch["valid"][0].sum()) == 20 and int(batch["valid"][1].sum()) == 12


def test_read_only_arrays_become_tensors_without_a_warning():
    # PIL-backed arrays are read-only; an eval view without a resize hands them over untouched.
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    mask = np.arange(20, dtype=np.uint8).reshape(4, 5)
    image.setflags(write=False)
    mask.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample = to_tensors(image, mask)
    assert torch.equal(sample["image"], torch.from_numpy(image.transpose(2, 0, 1).copy()))
    assert torch.equal(sample["mask"], torch.from_numpy(mask.copy()).long())


def test_labeled_and_unlabeled_views_share_selection_and_length():
    masks = [np.full((2, 3), 1, np.uint8), None, np.full((2, 3), 2, np.uint8)]

    class Tiny(SegmentationDataset):
        def __init__(self) -> None:
            super().__init__("train")
            self.ids = ["a", "b", "c"]
            self.classes = ("zero", "one", "two")

        def load_image(self, index: int) -> np.ndarray:
            return np.full((2, 3, 3), index, np.uint8)

        def load_mask(self, index: int) -> np.ndarray | None:
            return masks[index]

    labeled = LabeledView(Tiny(), [2, 0])
    unlabeled = UnlabeledView(Tiny(), [1, 2, 0])
    assert (len(labeled), len(unlabeled)) == (2, 3)
    assert int(labeled[0]["index"]) == 2 and int(labeled[0]["mask"][0, 0]) == 2 and int(labeled[0]["image"].max()) == 2
    assert set(unlabeled[1]) == {"image", "index"} and int(unlabeled[1]["image"].max()) == 2
    partial = UnlabeledView(Tiny(), [1, 2], mask_hook=lambda mask, index: mask * 0)
    assert bool((partial[0]["mask"] == 255).all()) and bool((partial[1]["mask"] == 0).all())
