import math

import pytest
import torch

from src.pl_modules.base import diagnostic_scores
from src.pl_modules.diagnostics import pseudo_label_counts


def test_counts_and_scores_by_hand():
    pseudo_labels = torch.tensor([[[0, 0, 1], [1, 2, 2]]])
    targets = torch.tensor([[[0, 1, 1], [1, 2, 255]]])
    confident = torch.tensor([[[True, True, False], [True, False, True]]])
    counts = pseudo_label_counts(pseudo_labels, confident, targets, torch.ones_like(confident), num_classes=3)
    # rows: truth, columns: pseudo-label; the pixel without ground truth counts only as an image pixel.
    assert counts["confusion"].tolist() == [[1, 0, 0], [1, 2, 0], [0, 0, 1]]
    assert counts["confusion_confident"].tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
    assert (int(counts["confident"]), int(counts["pixels"])) == (4, 6)
    scores = diagnostic_scores(counts)
    assert scores["pseudo_acc"] == pytest.approx(4 / 5)
    assert scores["pseudo_miou"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1) / 3)  # IoU 1/2, 2/3, 1
    assert scores["mask_ratio"] == pytest.approx(4 / 6)
    assert scores["mask_acc"] == pytest.approx(2 / 3)


def test_scores_are_nan_where_nothing_counts():
    pseudo_labels = torch.zeros(1, 2, 2, dtype=torch.long)
    nothing = torch.zeros(1, 2, 2, dtype=torch.bool)
    counts = pseudo_label_counts(pseudo_labels, nothing, torch.full((1, 2, 2), 255), ~nothing, num_classes=3)
    scores = diagnostic_scores(counts)
    assert scores["mask_ratio"] == 0.0  # a mask that never fires is a score, not a gap
    assert all(math.isnan(scores[name]) for name in ("pseudo_acc", "pseudo_miou", "mask_acc"))
