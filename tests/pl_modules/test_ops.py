"""Value checks for the shared tensor functions in src/pl_modules/ops.py (METHODS.md sections 1.5, 3, 4, 6-8)."""

from __future__ import annotations

import colorsys
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from src.networks.segmenter import IMAGENET_MEAN
from src.pl_modules import ops

H, W = 8, 12


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(b: int = 3, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = gen(seed)
    images = torch.rand(b, 3, H, W, generator=g)
    labels = torch.randint(0, classes, (b, H, W), generator=g)
    labels[:, 0, :3] = 255  # some invalid pixels that must survive everything
    confidences = torch.rand(b, H, W, generator=g) * 0.9 + 0.1
    confidences[labels == 255] = 0.0
    return images, labels, confidences


# ---------------------------------------------------------------------------------------- EMA, ramp
def test_ema_decay_schedule():
    assert ops.ema_decay(0, 0.99) == 0.0  # first step copies the student
    assert ops.ema_decay(1, 0.99) == 0.5
    assert ops.ema_decay(99, 0.99) == pytest.approx(0.99)
    assert ops.ema_decay(10_000, 0.99) == 0.99  # capped at alpha
    assert ops.ema_decay(10_000, 0.9) == 0.9


def test_ema_update_params_only():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        student[1].running_mean.add_(5.0)
        student[1].running_var.add_(3.0)
        student[1].num_batches_tracked.add_(7)
    old_params = [p.clone() for p in teacher.parameters()]
    old_buffers = [b.clone() for b in teacher.buffers()]
    ops.ema_update(teacher, student, 0.9)
    for old, new, s in zip(old_params, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * s)
    for old, new in zip(old_buffers, teacher.buffers()):
        assert torch.equal(old, new)  # running stats and num_batches_tracked untouched
    ops.ema_update(teacher, student, 0.0)  # decay 0 = copy
    for t, s in zip(teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, s, rtol=0, atol=1e-7)


def test_copy_buffers_copies_statistics_and_counters_only():
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        student[1].running_mean.add_(5.0)
        student[1].num_batches_tracked.add_(7)
        student[0].weight.add_(1.0)
    ops.copy_buffers(teacher, student)
    for t, s in zip(teacher.buffers(), student.buffers()):
        assert torch.equal(t, s)
    assert not torch.equal(teacher[0].weight, student[0].weight)


def test_ema_update_rejects_different_modules():
    with pytest.raises(ValueError, match="parameter names"):
        ops.ema_update(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), 0.5)


def test_sigmoid_rampup():
    assert ops.sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert ops.sigmoid_rampup(5, 10) == pytest.approx(math.exp(-1.25))
    assert ops.sigmoid_rampup(10, 10) == 1.0
    assert ops.sigmoid_rampup(50, 10) == 1.0
    assert ops.sigmoid_rampup(-3, 10) == pytest.approx(math.exp(-5))
    assert ops.sigmoid_rampup(0, 0) == 1.0


def test_sigmoid_rampup_from_a_start_step():
    assert ops.sigmoid_rampup_from(4, 5, 10) == 0.0  # before its start
    assert ops.sigmoid_rampup_from(5, 5, 10) == pytest.approx(math.exp(-5))
    assert ops.sigmoid_rampup_from(10, 5, 10) == pytest.approx(math.exp(-1.25))
    assert ops.sigmoid_rampup_from(15, 5, 10) == 1.0
    assert ops.sigmoid_rampup_from(5, 5, 0) == 1.0


def test_warmup_then_cosine():
    values = [ops.warmup_cosine(step, 100, 10, 0.01) for step in range(101)]
    assert values[0] == pytest.approx(0.01) and values[10] == pytest.approx(1.0) and values[100] == pytest.approx(0.01)
    assert values[55] == pytest.approx(0.01 + 0.99 * 0.5)
    assert all(a < b for a, b in zip(values[:10], values[1:11]))
    assert all(a > b for a, b in zip(values[10:], values[11:]))


# ---------------------------------------------------------------------------------------- loss
def _ce(logits: list[float], target: int) -> float:
    return math.log(sum(math.exp(v) for v in logits)) - logits[target]


def test_confidence_weighted_ce_hand_computed():
    # 2 images x 1 x 3 pixels, 2 classes; per-pixel logits (class 0, class 1).
    pixel_logits = [[[0.0, 0.0], [math.log(3), 0.0], [1.0, -1.0]], [[2.0, 0.5], [0.0, 1.0], [-0.5, 0.3]]]
    logits = torch.tensor(pixel_logits).permute(0, 2, 1).unsqueeze(2).requires_grad_(True)  # (2, 2, 1, 3)
    labels = torch.tensor([[[0, 1, 255]], [[1, 1, 0]]])
    confidences = torch.tensor([[[0.99, 0.5, 0.0]], [[0.98, 0.97, 0.1]]])
    eta = [1 / 2, 2 / 3]  # image 0: 1 confident of 2 valid; image 1: 2 (0.97 counts) of 3 valid
    total = eta[0] * (_ce(pixel_logits[0][0], 0) + _ce(pixel_logits[0][1], 1))
    total += eta[1] * (_ce(pixel_logits[1][0], 1) + _ce(pixel_logits[1][1], 1) + _ce(pixel_logits[1][2], 0))
    loss, fraction = ops.confidence_weighted_ce(logits, labels, confidences, threshold=0.97)
    assert loss.item() == pytest.approx(total / 5, rel=1e-6)
    assert fraction.item() == pytest.approx(3 / 5)
    loss.backward()
    assert logits.grad[0, :, 0, 2].abs().sum() == 0  # the ignored pixel gets no gradient
    assert logits.grad[1].abs().sum() > 0


def test_confidence_weighted_ce_no_valid_pixel_is_zero():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels = torch.full((2, 4, 4), 255)
    loss, fraction = ops.confidence_weighted_ce(logits, labels, torch.zeros(2, 4, 4))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert fraction.item() == 0.0
    loss.backward()  # graph kept
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_pixels_under_the_threshold_contribute_nothing():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 3, (2, 8, 8), generator=g)
    confidences = torch.rand(2, 8, 8, generator=g)
    valid = torch.rand(2, 8, 8, generator=g) > 0.2
    loss = ops.thresholded_ce(logits, labels, confidences, valid, threshold=0.5)
    loss.backward()
    kept = valid & (confidences >= 0.5)
    assert 0 < kept.sum() < valid.sum()
    # Denominator: every valid pixel, confident or not (METHODS.md 8 step 5).
    expected = F.cross_entropy(logits, labels, reduction="none")[kept].sum() / valid.sum()
    assert torch.allclose(loss, expected)
    grad_per_pixel = logits.grad.abs().sum(1)
    assert (grad_per_pixel[~kept] == 0).all() and (grad_per_pixel[kept] > 0).all()
    with torch.no_grad():  # changing the ignored pixels' logits leaves the loss unchanged
        changed = torch.where(kept.unsqueeze(1), logits, torch.randn_like(logits) * 10)
        assert torch.equal(ops.thresholded_ce(changed, labels, confidences, valid, 0.5), loss.detach())
    nothing_valid = ops.thresholded_ce(logits, labels, confidences, torch.zeros_like(valid), 0.5)
    assert nothing_valid.item() == 0 and nothing_valid.requires_grad


def test_overwrite_given_gives_given_pixels_their_label_with_confidence_one():
    _, labels, confidences = batch()
    given = torch.full_like(labels, 255)
    given[:, 2, 3], given[0, 5, 5] = 2, 0
    new_labels, new_confidences = ops.overwrite_given(labels, confidences, given)
    known = given != 255
    assert torch.equal(new_labels[known], given[known]) and (new_confidences[known] == 1).all()
    assert torch.equal(new_labels[~known], labels[~known]) and torch.equal(new_confidences[~known], confidences[~known])
    probs = torch.rand(3, 4, H, W, generator=gen()).softmax(dim=1)
    _, new_probs = ops.overwrite_given(probs.argmax(dim=1), probs, given)  # probabilities: the given label's one-hot
    assert torch.equal(new_probs.permute(0, 2, 3, 1)[known], F.one_hot(given[known], 4).float())
    assert torch.equal(new_probs.permute(0, 2, 3, 1)[~known], probs.permute(0, 2, 3, 1)[~known])


# ---------------------------------------------------------------------------------------- boxes
def test_box_masks_geometry():
    height, width, b = 10, 13, 256
    keep = ops.box_masks(b, height, width, gen(1))
    assert keep.shape == (b, height, width) and keep.dtype == torch.bool
    inside = ~keep
    rows, cols = inside.any(2), inside.any(1)  # (B, H), (B, W)
    box_h, box_w = rows.sum(1), cols.sum(1)
    assert torch.equal(inside, rows.unsqueeze(2) & cols.unsqueeze(1))  # one axis-aligned rectangle
    assert box_w.min() == 13 // 2 + 1 and box_w.max() == width - 1  # both ends of UniformInt reached
    expected_h = torch.tensor([round(height * width / 2 / w) for w in box_w.tolist()])
    assert torch.equal(box_h, expected_h)  # not clipped: the box lies fully inside the image
    area = inside.sum((1, 2))
    assert ((area - height * width / 2).abs() <= box_w / 2).all()  # half the image up to rounding of h
    x0 = cols.float().argmax(1)
    assert x0.min() == 0 and (x0 + box_w).max() == width  # the box reaches both borders
    assert len({m.numpy().tobytes() for m in keep}) > 50  # different per sample (99 boxes are possible)


# ---------------------------------------------------------------------------------------- mixing
def test_mix_unlabeled_rejects_unknown_mode():
    with pytest.raises(ValueError, match="cutout.*cutmix.*classmix"):
        ops.mix_unlabeled("mixup", *batch())


def test_mix_none_is_identity():
    inputs = batch()
    assert all(a is b for a, b in zip(ops.mix_unlabeled("none", *inputs, generator=gen()), inputs))


def test_cutout_fills_mean_colour_and_ignores_box():
    images, labels, confs = batch()
    keep = ops.box_masks(3, H, W, gen(2))
    out_images, out_labels, out_confs = ops.mix_unlabeled("cutout", images, labels, confs, gen(2))
    box = ~keep
    assert box.any()
    assert (out_labels[box] == 255).all() and (out_confs[box] == 0).all()
    assert torch.equal(out_labels[keep], labels[keep]) and torch.equal(out_confs[keep], confs[keep])
    mean = torch.tensor(IMAGENET_MEAN)
    assert torch.equal(out_images.permute(0, 2, 3, 1)[box], mean.expand(int(box.sum()), 3))
    assert torch.equal(out_images.permute(0, 2, 3, 1)[keep], images.permute(0, 2, 3, 1)[keep])


def test_cutmix_takes_box_from_next_sample():
    images, labels, confs = batch()
    keep = ops.box_masks(3, H, W, gen(3))
    out = ops.mix_unlabeled("cutmix", images, labels, confs, gen(3))
    for i in range(3):
        j, box = (i + 1) % 3, ~keep[i]
        for x, y in zip(out, (images, labels, confs)):
            assert torch.equal(x[i][..., box], y[j][..., box])  # same mask for image, label, conf
            assert torch.equal(x[i][..., keep[i]], y[i][..., keep[i]])


def _class_sets_labels() -> torch.Tensor:
    labels = torch.zeros(4, H, W, dtype=torch.long)
    labels[0] = torch.arange(W).div(3, rounding_mode="floor")  # {0,1,2,3}: K = 4 -> 2 chosen
    labels[1] = torch.arange(H).view(-1, 1).expand(H, W).clamp(max=4)  # {0..4}: K = 5 -> 2
    labels[2] = 2
    labels[2, :, :4] = 255  # {2, 255}: K = 2 -> 1, 255 counts as a value
    labels[3] = 1  # K = 1 -> nothing chosen
    return labels


def test_classmix_masks_choose_half_of_the_classes_present():
    draws = 200
    labels = _class_sets_labels().repeat(draws, 1, 1)  # (4 * draws, H, W): many draws in one batch
    masks = ops.classmix_masks(labels, gen(4))
    expected_count = {0: 2, 1: 2, 2: 1, 3: 0}
    chosen_sets: dict[int, set[tuple[int, ...]]] = {i: set() for i in range(4)}
    for k, (label, mask) in enumerate(zip(labels, masks)):
        values = label.unique().tolist()
        chosen = tuple(v for v in values if mask[label == v].all())
        for v in values:  # each value is either fully in or fully out of the mask
            assert mask[label == v].all() or not mask[label == v].any()
        assert len(chosen) == expected_count[k % 4]
        chosen_sets[k % 4].add(chosen)
    assert len(chosen_sets[0]) == 6 and len(chosen_sets[1]) == 10  # every 2-subset of 4 and 5 values
    assert chosen_sets[2] == {(2,), (255,)}
    assert chosen_sets[3] == {()}


def test_classmix_pastes_chosen_classes_over_next_sample():
    images, _, confs = batch(4)
    labels = _class_sets_labels()
    confs = torch.where(labels == 255, 0.0, confs)
    mask = ops.classmix_masks(labels, gen(5))
    out = ops.mix_unlabeled("classmix", images, labels, confs, gen(5))
    for x, y in zip(out, (images, labels, confs)):
        expected = torch.where(mask.unsqueeze(1) if y.dim() == 4 else mask, y, torch.roll(y, -1, 0))
        assert torch.equal(x, expected)
    assert torch.equal(out[0][3], images[0]) and torch.equal(out[1][3], labels[0])  # K = 1: becomes image j
    # 255 survives: wherever the chosen source pixel was invalid the output is invalid with confidence 0
    source = torch.where(mask, labels, torch.roll(labels, -1, 0))
    assert torch.equal(out[1] == 255, source == 255) and (out[2][out[1] == 255] == 0).all()


def test_cutmix_boxes_follow_the_reference_ranges():
    g = torch.Generator().manual_seed(0)
    boxes = ops.cutmix_boxes(400, 32, 48, g, p=1.0)
    area = boxes.flatten(1).sum(1).double() / (32 * 48)
    assert boxes.any(1).any(1).all() and area.max() <= 0.4 and area.min() > 0.005
    rows, cols = boxes.any(2).sum(1), boxes.any(1).sum(1)
    assert torch.equal(rows * cols, boxes.flatten(1).sum(1))  # each mask is one rectangle
    assert not ops.cutmix_boxes(50, 32, 32, g, p=0.0).any()
    half = ops.cutmix_boxes(400, 32, 32, g, p=0.5).flatten(1).any(1).float().mean()
    assert 0.4 < half < 0.6
    assert ops.cutmix_boxes(4, 2, 512, g, p=1.0).any(1).any(1).all()  # no box can fit: clamped, no endless loop
def test_swap_halves_is_an_involution_between_the_pairs():
    keep = torch.ones(2, 4, 4, dtype=torch.bool)
    keep[:, :2] = False
    x = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 1, 4, 4)
    mixed = ops.swap_halves(x, keep)
    assert mixed[0, 0, 0, 0] == 2 and mixed[0, 0, 3, 0] == 0 and mixed[2, 0, 0, 0] == 0  # pairs (0, 2), (1, 3)
    assert torch.equal(mixed[4], x[4])  # the odd one out
    assert torch.equal(ops.swap_halves(mixed, keep), x)


def test_cross_set_cutmix_forward_gives_a_pixelwise_network_its_plain_outputs():
    # Permuting, mixing, un-mixing and un-permuting cancel out for a network that works pixel by pixel.
    images = torch.rand(5, 3, 8, 8)
    for cutmix in (True, False):
        logits, embeddings = ops.cross_set_cutmix_forward(lambda x: (x * 2, x[:, :2] + 1), images, cutmix)
        assert torch.equal(logits, images * 2) and torch.equal(embeddings, images[:, :2] + 1)
    assert ops.cross_set_cutmix_forward(lambda x: (x, None), images)[1] is None


def test_mix_by_mask_broadcasts_over_channels():
    mask = torch.tensor([[[True, False]]])
    a, b = torch.ones(1, 3, 1, 2), torch.zeros(1, 3, 1, 2)
    assert torch.equal(ops.mix_by_mask(mask, a, b), torch.tensor([1.0, 0.0]).expand(1, 3, 1, 2))
    assert torch.equal(ops.mix_by_mask(mask, torch.ones(1, 1, 2), torch.zeros(1, 1, 2)), mask.float())


# ---------------------------------------------------------------------------------------- geometric
def test_hflip_is_joint_and_keeps_255():
    images, labels, confs = batch(16)
    out = ops.random_hflip(images, labels, confs, gen(6))
    flipped = [torch.equal(out[1][i], labels[i].flip(-1)) for i in range(16)]
    assert 0 < sum(flipped) < 16
    for i, f in enumerate(flipped):
        for x, y in zip(out, (images, labels, confs)):
            assert torch.equal(x[i], y[i].flip(-1) if f else y[i])
    assert (out[1][torch.tensor(flipped)][:, 0, -3:] == 255).all()  # 255 moved with the flip
    unflipped = ops.random_hflip(images, labels, confs, gen(), p=0.0)
    assert all(torch.equal(a, b) for a, b in zip(unflipped, (images, labels, confs)))


def test_rescale_crop_scale_one_is_identity():
    inputs = batch()
    assert all(torch.equal(a, b) for a, b in zip(ops.random_rescale_crop(*inputs, (1.0, 1.0), gen()), inputs))
    # Through the sampling grid: int(H * s) == H for these scales, so size and offset are unchanged.
    out = ops.random_rescale_crop(*inputs, (1.0, 1.0 + 0.5 / W), gen())
    torch.testing.assert_close(out[0], inputs[0], rtol=0, atol=1e-5)
    assert torch.equal(out[1], inputs[1]) and torch.equal(out[2], inputs[2])


def test_rescale_crop_upscale_is_a_shifted_crop():
    images, labels, confs = batch()
    out_images, out_labels, out_confs = ops.random_rescale_crop(images, labels, confs, (2.0, 2.0), gen(7))
    big_labels = labels.repeat_interleave(2, 1).repeat_interleave(2, 2)  # nearest x2
    big_confs = confs.repeat_interleave(2, 1).repeat_interleave(2, 2)
    offsets = []
    for i in range(3):
        match = [
            (y, x) for y in range(H + 1) for x in range(W + 1)
            if torch.equal(out_labels[i], big_labels[i, y:y + H, x:x + W])
            and torch.equal(out_confs[i], big_confs[i, y:y + H, x:x + W])
        ]
        assert match, f"sample {i} is not a crop of its x2 upscaling"
        offsets.append(match[0])
    assert len(set(offsets)) > 1  # random offsets per sample
    assert out_images.shape == images.shape and 0 <= out_images.min() and out_images.max() <= 1


def test_rescale_crop_downscale_pads_right_bottom():
    images, _, _ = batch()
    labels = torch.randint(0, 3, (3, H // 2, W // 2), generator=gen(8)).repeat_interleave(2, 1).repeat_interleave(2, 2)
    confs = torch.rand(3, H // 2, W // 2, generator=gen(8)).add(0.1).repeat_interleave(2, 1).repeat_interleave(2, 2)
    out_images, out_labels, out_confs = ops.random_rescale_crop(images, labels, confs, (0.5, 0.5), gen(9))
    pad = torch.ones(H, W, dtype=torch.bool)
    pad[: H // 2, : W // 2] = False
    assert (out_labels[:, pad] == 255).all() and (out_confs[:, pad] == 0).all()
    assert torch.equal(out_labels[:, : H // 2, : W // 2], labels[:, ::2, ::2])  # top-left: the shrunk image
    assert torch.equal(out_confs[:, : H // 2, : W // 2], confs[:, ::2, ::2])
    assert torch.isfinite(out_images).all() and 0 <= out_images.min() and out_images.max() <= 1


def test_rescale_crop_rejects_bad_range():
    with pytest.raises(ValueError, match="scale_range"):
        ops.random_rescale_crop(*batch(), (1.5, 0.5))


# ---------------------------------------------------------------------------------------- photometric
def test_hsv_matches_colorsys_and_round_trips():
    rgb = torch.rand(2, 3, 5, 5, generator=gen(10))
    rgb[0, :, 0, 0] = 0.4  # a grey pixel
    hsv = ops.rgb_to_hsv(rgb)
    for b, y, x in [(0, 0, 0), (0, 1, 2), (1, 4, 4), (1, 2, 0)]:
        expected = colorsys.rgb_to_hsv(*rgb[b, :, y, x].tolist())
        torch.testing.assert_close(hsv[b, :, y, x], torch.tensor(expected, dtype=torch.float32))
    torch.testing.assert_close(ops.hsv_to_rgb(hsv), rgb, rtol=0, atol=1e-5)


def test_photometric_p_zero_is_identity_and_keeps_range():
    images = batch()[0]
    assert torch.equal(ops.photometric(images, gen(), jitter_p=0.0, blur_p=0.0), images)
    out = ops.photometric(images * 3 - 1, gen(11), jitter_p=1.0, blur_p=1.0)  # out-of-range input
    assert out.shape == images.shape and out.dtype == images.dtype
    assert 0 <= out.min() and out.max() <= 1
    assert not torch.allclose(ops.photometric(images, gen(11), jitter_p=1.0, blur_p=1.0), images)


def test_colour_jitter_factors():
    images = torch.rand(8, 3, H, W, generator=gen(12)) * 0.7 + 0.05  # stays unclipped at factor <= 1.25
    neutral = ops.colour_jitter(images, gen(), p=1.0, brightness=0, contrast=0, saturation=0, hue=0)
    torch.testing.assert_close(neutral, images, rtol=0, atol=1e-5)
    bright = ops.colour_jitter(images, gen(13), p=1.0, contrast=0, saturation=0, hue=0)
    ratio = bright / images  # one brightness factor per sample, in U(0.75, 1.25)
    per_sample = ratio.flatten(1)
    torch.testing.assert_close(per_sample, per_sample[:, :1].expand_as(per_sample), rtol=1e-4, atol=1e-4)
    assert (per_sample[:, 0] >= 0.75).all() and (per_sample[:, 0] <= 1.25).all()
    assert per_sample[:, 0].unique().numel() == 8
    hue_only = ops.colour_jitter(images, gen(14), p=1.0, brightness=0, contrast=0, saturation=0)
    hsv_in, hsv_out = ops.rgb_to_hsv(images), ops.rgb_to_hsv(hue_only)
    torch.testing.assert_close(hsv_out[:, 1:], hsv_in[:, 1:], rtol=0, atol=1e-4)  # s, v unchanged
    shift = (hsv_out[:, 0] - hsv_in[:, 0]) % 1.0
    shift = torch.where(shift > 0.5, shift - 1, shift).flatten(1)  # (B, H*W) signed shift
    assert (shift.std(1) < 1e-3).all() and (shift.abs().max() <= 0.25 + 1e-4)


def test_colour_jitter_is_each_sample_through_its_own_order():
    # A per-sample loop with the same draws: factors u[1:5], order argsort(u[5:9]), applied if u[0] < p.
    images = torch.rand(16, 3, H, W, generator=gen(16))
    out = ops.colour_jitter(images, gen(17), p=0.8, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.25)
    u = torch.rand((16, 9), generator=gen(17), dtype=torch.float64)
    operations = (ops._brightness, ops._contrast, ops._saturation, ops._hue)
    orders = set()
    for i in range(16):
        factors = [1 + 0.5 * (2 * u[i, 1] - 1), 1 + 0.5 * (2 * u[i, 2] - 1), 1 + 0.5 * (2 * u[i, 3] - 1),
                   0.25 * (2 * u[i, 4] - 1)]
        x = images[i : i + 1]
        order = u[i, 5:].argsort().tolist()
        orders.add(tuple(order))
        if u[i, 0] < 0.8:
            for k in order:
                x = operations[k](x, factors[k].float().view(1, 1, 1, 1))
        torch.testing.assert_close(out[i : i + 1], x, rtol=0, atol=1e-6)
    assert len(orders) > 4  # the samples did run in different orders


def test_gaussian_blur_keeps_constants_and_smooths():
    constant = torch.full((2, 3, H, W), 0.3)
    torch.testing.assert_close(ops.gaussian_blur(constant, gen(), p=1.0), constant)
    noise = torch.rand(2, 3, H, W, generator=gen(15))
    blurred = ops.gaussian_blur(noise, gen(), p=1.0)
    assert (blurred.flatten(1).std(1) < noise.flatten(1).std(1)).all()
    torch.testing.assert_close(blurred.mean(), noise.mean(), rtol=0, atol=0.05)


def test_random_grayscale_replaces_chosen_samples_by_their_luma():
    images = torch.rand(6, 3, H, W, generator=gen())
    grey = ops.random_grayscale(images, gen(1), p=1.0)
    luma = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    assert torch.allclose(grey, luma.unsqueeze(1).expand_as(images))
    assert torch.equal(ops.random_grayscale(images, gen(1), p=0.0), images)


# ---------------------------------------------------------------------------------------- determinism, B = 1
def _pipeline(seed: int, b: int = 3) -> list[torch.Tensor]:
    g = gen(seed)
    images, labels, confs = batch(b)
    out = []
    for mode in ops.MIX_MODES:
        out += ops.mix_unlabeled(mode, images, labels, confs, g)
    out += ops.random_rescale_crop(images, labels, confs, (0.5, 1.5), g)
    out += ops.strong_augment(images, labels, confs, g)
    out.append(ops.box_masks(b, H, W, g))
    out.append(ops.classmix_masks(labels, g))
    return out


def test_same_seed_same_outputs():
    first, second, other = _pipeline(0), _pipeline(0), _pipeline(1)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_batch_of_one():
    out = _pipeline(0, b=1)
    images, labels, confs = batch(1)
    cutmix, classmix = out[6:9], out[9:12]
    # The partner of the only sample is itself, so mixing changes nothing.
    assert all(torch.equal(a, b) for a, b in zip(cutmix, (images, labels, confs)))
    assert all(torch.equal(a, b) for a, b in zip(classmix, (images, labels, confs)))
    assert out[12].shape == (1, 3, H, W) and out[13].shape == (1, H, W) and out[14].shape == (1, H, W)
    assert out[15].shape == (1, 3, H, W) and out[-2].shape == (1, H, W) and out[-1].shape == (1, H, W)


# ---------------------------------------------------------------------------------------- corruption
def holes_of(holes: torch.Tensor, image: int) -> torch.Tensor:
    return holes[holes[:, 0] == image]


def test_holes_are_blocks_of_the_configured_size_until_the_summed_area_reaches_the_fraction():
    height, width, low, high, fraction = 48, 40, 4, 9, 0.5
    holes = ops.sample_holes(12, height, width, (low, high), fraction, 0.5, torch.Generator().manual_seed(0))
    _, channel, top, left, hole_h, hole_w = holes.unbind(1)
    assert ((hole_h >= low) & (hole_h <= high) & (hole_w >= low) & (hole_w <= high)).all()
    assert {int(v) for v in hole_h.unique()} == set(range(low, high + 1))  # every size is drawn
    assert (top >= 0).all() and (left >= 0).all() and (top + hole_h <= height).all() and (left + hole_w <= width).all()
    modes = set()
    for image in range(12):
        own = holes_of(holes, image)
        per_channel = bool((own[:, 1] < 3).all())
        assert per_channel or bool((own[:, 1] == 3).all())  # one mode per image
        modes.add(per_channel)
        target = fraction * height * width * (3 if per_channel else 1)
        areas = own[:, 4] * own[:, 5]
        # Added until the summed area (overlaps counted again) reaches the target, not one more.
        assert areas.sum() >= target > areas.sum() - areas[-1]
    assert modes == {True, False}
    assert len(ops.sample_holes(2, height, width, (low, high), 0.0)) == 0


def opening(mask: torch.Tensor, side: int) -> torch.Tensor:
    """Pixels of ``mask`` (B, C, H, W) that lie in some fully masked side x side square."""
    full_squares = F.avg_pool2d(mask.float(), side, stride=1) > 1 - 1e-6  # by top-left corner
    return F.max_pool2d(F.pad(full_squares.float(), (side - 1,) * 4), side, stride=1) > 0


def test_masks_are_the_union_of_coarse_blocks_and_cover_about_the_configured_fraction():
    height, width, low = 64, 56, 5
    images = torch.rand(8, 3, height, width)
    fill = torch.tensor([0.25, 0.5, 0.75])
    corrupted, mask = ops.coarse_cutout(images, fill, (low, 12), 0.5, 0.5, torch.Generator().manual_seed(1))
    holes = ops.sample_holes(8, height, width, (low, 12), 0.5, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(mask, ops.paint_holes(holes, 8, height, width))
    expected = torch.zeros_like(mask)  # slow painting, one hole at a time
    for image, channel, top, left, hole_h, hole_w in holes.tolist():
        channels = slice(0, 3) if channel == 3 else slice(channel, channel + 1)
        expected[image, channels, top : top + hole_h, left : left + hole_w] = True
    assert torch.equal(mask, expected)
    # Coarse: every masked pixel lies in a fully masked low x low square (an opening keeps the mask),
    # though not in a square larger than the largest hole.
    assert torch.equal(opening(mask, low), mask)
    assert not torch.equal(opening(mask, 13), mask)
    # Summed area 50 % of the pixels (of the channel-pixels with per-channel holes): overlaps leave
    # about 1 - exp(-0.5) = 39 % covered.
    covered = mask.float().mean().item()
    assert 0.3 < covered < 0.5
    assert torch.equal(corrupted[mask], fill.view(1, 3, 1, 1).expand_as(images)[mask])
    assert torch.equal(corrupted[~mask], images[~mask])
