"""ReCo's class prototypes and the order of the class-relation figure (`src.pl_modules.relations`)."""

import math

import numpy as np
import pytest
import torch

from src.networks import RepresentationHead, Segmenter
from src.pl_modules.relations import prototype_similarity, prototype_sums, relation_order


def test_prototype_sums_match_a_loop_over_pixels():
    torch.manual_seed(0)
    student = Segmenter(3, "DeepLabV3Plus", "tu-test_resnet", model_options={"decoder_channels": 16}).eval()
    head = RepresentationHead(student.feature_channels, 4, hidden_channels=8).eval()
    # 40 px is not a multiple of the stride (16): the input is padded to 48, and the 10x10 cells over
    # the image make the representation grid.
    images = torch.rand(2, 3, 40, 40)
    masks = torch.randint(0, 3, (2, 40, 40))
    masks[:, :8] = 255
    masks[masks == 2] = 255  # class 2 absent
    sums, counts = prototype_sums(student, head, images, masks, num_classes=3, ignore_index=255)

    with torch.no_grad():
        rep = head(student.forward_features(images)[1])  # DeepLabV3+ features are at stride 4 already
    assert rep.shape[-2:] == (10, 10)
    expected_sums = torch.zeros(3, 4, dtype=torch.float64)
    expected_counts = torch.zeros(3, dtype=torch.long)
    for image in range(2):
        for row in range(10):
            for col in range(10):
                label = int(masks[image, row * 4, col * 4])  # the cell's top-left input pixel
                if label < 3:
                    expected_sums[label] += rep[image, :, row, col].double()
                    expected_counts[label] += 1
    assert torch.equal(counts, expected_counts) and counts[2] == 0 and counts[:2].min() > 0
    assert torch.allclose(sums, expected_sums, atol=1e-5)

    similarity = prototype_similarity(sums, counts)
    cosine = torch.cosine_similarity(sums[0], sums[1], dim=0)
    assert math.isclose(similarity[0, 1], cosine, rel_tol=1e-9) and similarity[0, 0] == pytest.approx(1.0)
    assert similarity[2].isnan().all() and similarity[:, 2].isnan().all()


def test_relation_order_keeps_each_cluster_contiguous():
    # Classes 0, 2, 4 are alike, and so are 1 and 3: average linkage joins each group first.
    similarity = np.full((5, 5), -0.5)
    for group in ((0, 2, 4), (1, 3)):
        similarity[np.ix_(group, group)] = 0.9
    np.fill_diagonal(similarity, 1.0)
    order, tree = relation_order(similarity)
    assert sorted(order) == list(range(5)) and tree.shape == (4, 4)
    first = {order[0], order[1], order[2]} if order[0] in (0, 2, 4) else {order[2], order[3], order[4]}
    assert first == {0, 2, 4}
    assert tree[:3, 2].max() == pytest.approx(0.1) and tree[3, 2] == pytest.approx(1.5)
    assert relation_order(np.ones((1, 1))) == ([0], None)
