"""C3-SemiSeg's thresholds, consistency and contrastive loss on hand-made inputs with known answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from src.losses.c3 import (
    C3Consistency,
    C3Contrast,
    C3Thresholds,
    class_balanced_mask,
    class_confidence_quantiles,
    cross_set_contrastive_loss,
    pixel_contrastive_loss,
    sample_anchors,
    soft_consistency_loss,
    update_class_thresholds,
)

# Class 0: five pixels, class 1: two, class 2: none (confidences deliberately unsorted).
CONFIDENCES = torch.tensor([[0.7, 0.99, 0.5, 0.9], [0.6, 0.95, 0.8, 0.3]])
PREDICTIONS = torch.tensor([[0, 1, 0, 0], [0, 1, 0, 0]])  # class 0 also gets 0.3 (7 pixels with it)


def test_thresholds_take_the_per_class_rank_and_average():
    confidences = CONFIDENCES.clone()
    predictions = PREDICTIONS.clone()
    predictions[1, 3] = 2  # the 0.3 pixel becomes class 2's only pixel
    # class 0: 0.9 0.8 0.7 0.6 0.5 -> rank floor(5 * 0.8) = 4 -> 0.5; class 1: 0.99 0.95 -> rank 1 -> 0.95;
    # class 2: one pixel -> rank floor(0.8) = 0 -> 0.3.
    values, counts = class_confidence_quantiles(confidences, predictions, torch.full((4,), 0.8))
    assert counts.tolist() == [5, 2, 1, 0]
    assert values.tolist() == pytest.approx([0.5, 0.95, 0.3, 0.0])
    new = update_class_thresholds(torch.full((4,), 0.9), confidences, predictions, end_percent=0.8)
    assert new.tolist() == pytest.approx([0.9 * 0.9 + 0.1 * 0.5, 0.9 * 0.9 + 0.1 * 0.95, 0.9 * 0.9 + 0.1 * 0.3, 0.9])


def test_thresholds_gamma_zero_start_valid_and_clamping():
    thresholds = torch.tensor([0.9, 0.0, 0.7])
    # gamma = 1: class 0's rank is floor(5 * 0.8 * 0.9) = 3 -> 0.6; class 1 starts at 0 and takes its
    # value directly: rank floor(2 * 0.8 * 0 ** 1) = 0 -> 0.99; class 2 is not predicted and keeps 0.7.
    confidences = CONFIDENCES.clone()
    confidences[1, 3] = 0.55  # the eighth pixel, class 0
    new = update_class_thresholds(thresholds, confidences, PREDICTIONS, 0.8, gamma=1.0, momentum=0.9,
                                  valid=torch.tensor([[True] * 4, [True, True, True, False]]))
    assert new.tolist() == pytest.approx([0.9 * 0.9 + 0.1 * 0.6, 0.99, 0.7])
    # Without the valid mask the 0.55 pixel counts: six pixels, rank floor(6 * 0.8 * 0.9) = 4 -> 0.55.
    new = update_class_thresholds(thresholds, confidences, PREDICTIONS, 0.8, gamma=1.0)
    assert new[0].item() == pytest.approx(0.9 * 0.9 + 0.1 * 0.55)
    # end_percent = 1 ranks past the end: clamped to the class's lowest confidence.
    values, _ = class_confidence_quantiles(confidences, PREDICTIONS, torch.ones(3))
    assert values[:2].tolist() == pytest.approx([0.5, 0.95])
    with pytest.raises(ValueError, match="end_percent"):
        update_class_thresholds(thresholds, confidences, PREDICTIONS, end_percent=1.5)


def test_gamma_zero_keeps_about_end_percent_of_every_class():
    gen = torch.Generator().manual_seed(0)
    confidences = torch.rand(4, 50, 50, generator=gen)
    predictions = torch.randint(0, 3, (4, 50, 50), generator=gen)
    thresholds = torch.zeros(3)  # first update: the quantile itself
    thresholds = update_class_thresholds(thresholds, confidences, predictions, end_percent=0.4)
    kept = class_balanced_mask(confidences, predictions, thresholds)
    for c in range(3):
        fraction = kept[predictions == c].float().mean().item()
        assert fraction == pytest.approx(0.4, abs=0.002)


def test_class_balanced_mask_uses_the_predicted_class_threshold():
    confidences = torch.tensor([[0.5, 0.5, 0.95]])
    predictions = torch.tensor([[0, 1, 1]])
    mask = class_balanced_mask(confidences, predictions, torch.tensor([0.4, 0.9]))
    assert mask.tolist() == [[True, False, True]]


def test_soft_consistency_loss_value_and_empty_mask():
    logits = torch.zeros(1, 2, 1, 4, requires_grad=True)  # p_S = 0.5 everywhere
    target = torch.zeros(1, 2, 1, 4)
    target[:, 0] = 1.0
    mask = torch.tensor([[[True, True, False, False]]])
    # -sum_c p_T log p_S = log 2 on each kept pixel; averaged over the 2 kept pixels, then 1/C.
    assert soft_consistency_loss(logits, target, mask).item() == pytest.approx(math.log(2) / 2, rel=1e-6)
    assert soft_consistency_loss(logits, target, mask, class_mean=False).item() == pytest.approx(math.log(2), rel=1e-6)
    empty = soft_consistency_loss(logits, target, torch.zeros_like(mask))
    assert empty.item() == 0.0
    empty.backward()
    assert logits.grad is not None


def make_anchor_scene() -> tuple[torch.Tensor, torch.Tensor]:
    """One 10x10 image: class 1 (30 px, 10 mispredicted), 2 (25 px, all right), 3 (20 px), 0 (25 px, 22 wrong)."""
    labels = torch.full((1, 10, 10), 255)
    labels.view(-1)[:30] = 1
    labels.view(-1)[30:55] = 2
    labels.view(-1)[55:75] = 3
    labels.view(-1)[75:100] = 0
    predictions = labels.clone()
    predictions.view(-1)[:10] = 2  # 10 hard pixels of class 1
    predictions.view(-1)[75:97] = 1  # 22 hard pixels of class 0, 3 easy
    return labels, predictions


def test_sample_anchors_counts_hard_and_easy_per_image_and_class():
    labels, predictions = make_anchor_scene()
    second_labels = torch.full((1, 10, 10), 255)
    second_labels.view(-1)[:50] = 2  # image 2: 50 px of class 2 (5 wrong), the rest ignored
    second_predictions = second_labels.clone()
    second_predictions.view(-1)[:5] = 0
    labels, predictions = torch.cat([labels, second_labels]), torch.cat([predictions, second_predictions])
    pixels, classes = sample_anchors(labels, predictions, num_views=20, generator=torch.Generator().manual_seed(0))
    # Class 3 has exactly V pixels (not more) and 255 never qualifies; rows go by image, then class.
    assert classes.tolist() == [0, 1, 2, 2]
    assert pixels.shape == (4, 20)
    flat_labels, flat_predictions = labels.view(-1), predictions.view(-1)
    expected_hard = [17, 10, 0, 5]  # 0: only 3 easy -> 17 hard; 1: 10 + 10; 2: all easy; image 2: 5 hard + 15 easy
    for row, cls, hard in zip(pixels, classes.tolist(), expected_hard):
        assert len(set(row.tolist())) == 20  # without replacement
        assert bool((flat_labels[row] == cls).all())
        is_hard = flat_predictions[row] != cls
        assert int(is_hard.sum()) == hard
        assert bool(is_hard[:hard].all())  # hard ones first
    assert bool((pixels[3] >= 100).all())  # the last row lies in image 2
    pixels, classes = sample_anchors(labels, predictions, num_views=20, exclude_class_zero=True)
    assert classes.tolist() == [1, 2, 2]


def test_sample_anchors_is_random_inside_a_class():
    labels, predictions = make_anchor_scene()
    rows = [sample_anchors(labels, predictions, 20, generator=torch.Generator().manual_seed(s))[0][1] for s in range(5)]
    draws = {tuple(sorted(row.tolist())) for row in rows}
    assert len(draws) > 1


def contrastive_reference(anchors, keys, classes, temperature, base_temperature=0.1):
    """A direct port of the reference's ``_contrastive_pair`` (view-major flattening via unbind)."""
    anchor_num, n_view = anchors.shape[:2]
    anchors = F.normalize(anchors, dim=2)
    keys = F.normalize(keys, dim=2)
    labels = classes.contiguous().view(-1, 1)
    mask = torch.eq(labels, labels.T).float()
    anchor_feature = torch.cat(torch.unbind(anchors, dim=1), dim=0)
    key_feature = torch.cat(torch.unbind(keys, dim=1), dim=0)
    logits = anchor_feature @ key_feature.detach().T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    mask = mask.repeat(n_view, n_view)
    neg_mask = 1 - mask
    logits_mask = torch.ones_like(mask).scatter_(1, torch.arange(anchor_num * n_view).view(-1, 1), 0)
    mask = mask * logits_mask
    neg_logits = (torch.exp(logits) * neg_mask).sum(1, keepdim=True)
    log_prob = logits - torch.log(torch.exp(logits) + neg_logits)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return (-(temperature / base_temperature) * mean_log_prob_pos).mean()


def test_contrastive_hand_computed_value():
    # Two rows (classes 0 and 1) of two views each; class 0 points along x, class 1 along y.
    anchors = torch.tensor([[[1.0, 0.0], [2.0, 0.0]], [[0.0, 1.0], [0.0, 3.0]]])
    classes = torch.tensor([0, 1])
    # T = 0.5: row logits (before the max shift) are [2, 2, 0, 0]; the one positive has z = 0 after the
    # shift and the two negatives z = -2: l = log(1 + 2 e^-2) for every anchor, scaled by 0.5 / 0.1.
    loss = pixel_contrastive_loss(anchors, anchors.clone(), classes, temperature=0.5)
    assert loss.item() == pytest.approx(5 * math.log(1 + 2 * math.exp(-2)), rel=1e-6)


def test_contrastive_separated_beats_swapped_and_matches_reference():
    gen = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(3, 8, generator=gen), dim=1)
    classes = torch.tensor([0, 1, 2, 0])
    separated = centres[classes][:, None, :] + 0.05 * torch.randn(4, 5, 8, generator=gen)
    swapped = separated[:, :, :].clone()
    swapped[:, 2:] = centres[(classes + 1) % 3][:, None, :] + 0.05 * torch.randn(4, 3, 8, generator=gen)
    good = pixel_contrastive_loss(separated, separated, classes, 0.15)
    bad = pixel_contrastive_loss(swapped, swapped, classes, 0.15)
    assert good < bad
    anchors = torch.randn(4, 5, 8, generator=gen)
    keys = torch.randn(4, 5, 8, generator=gen)
    expected = contrastive_reference(anchors, keys, classes, 0.15)
    assert pixel_contrastive_loss(anchors, keys, classes, 0.15).item() == pytest.approx(expected.item(), rel=1e-5)


def test_cross_set_loss_gradients_and_empty_batch():
    labels, predictions = make_anchor_scene()
    embeddings = torch.randn(1, 4, 10, 10, requires_grad=True)
    keys = torch.randn(1, 4, 10, 10, requires_grad=True)
    loss, rows = cross_set_contrastive_loss(embeddings, keys.detach(), labels, predictions, num_views=20)
    assert rows.item() == 3 and loss > 0
    loss.backward()
    touched = embeddings.grad.abs().sum(1).view(-1) > 0
    assert int(touched.sum()) == 3 * 20  # only the anchors get gradient
    loss, rows = cross_set_contrastive_loss(embeddings, keys, torch.full_like(labels, 255), predictions, 20)
    assert rows.item() == 0 and loss.item() == 0.0
    loss.backward()  # still attached to the graph


@pytest.mark.parametrize("build, message", [
    (lambda: C3Thresholds(end_percent=1.2), "model.thresholds.end_percent must be in [0, 1], got 1.2"),
    (lambda: C3Thresholds(gamma=-1.0), "model.thresholds.gamma must be >= 0, got -1.0"),
    (lambda: C3Contrast(num_views=1), "model.contrast.num_views must be >= 2 (an anchor needs a positive), got 1"),
    (lambda: C3Contrast(temperature=0.0), "model.contrast.temperature must be > 0, got 0.0"),
    (lambda: C3Consistency(ramp_up_steps=-5), "model.consistency.ramp_up_steps must be >= 0, got -5"),
])
def test_option_groups_name_the_bad_option_in_one_line(build, message):
    with pytest.raises(ValueError) as error:
        build()
    assert str(error.value) == message


def test_thresholds_keep_every_pixel_when_static_and_update_in_place():
    static = C3Thresholds(dynamic_threshold=False)
    assert static.keep(CONFIDENCES, PREDICTIONS, torch.ones(3)).all()
    thresholds = C3Thresholds(end_percent=0.5, threshold_momentum=0.5).initial(3)
    expected = update_class_thresholds(thresholds, CONFIDENCES, PREDICTIONS, 0.5, 0.0, 0.5)
    C3Thresholds(end_percent=0.5, threshold_momentum=0.5).update_(thresholds, CONFIDENCES, PREDICTIONS)
    assert torch.equal(thresholds, expected) and not torch.equal(thresholds, torch.full((3,), 0.9))
