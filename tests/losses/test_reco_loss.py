"""The vectorised ReCo loss against its loop reference and METHODS.md 5.1's statistical checks.

The loop reference lives in `benchmarks/reco_loss_reference.py` (the benchmark times it too).
Inputs are tiny: a few classes with distinct mean features (so the class graph is far from
uniform), some pixels invalid, some valid pixels easy (own-class probability >= 0.97).
"""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch
import torch.nn.functional as F

from benchmarks.reco_loss_reference import reco_loss_loop
from src.losses import downsample_nearest, reco_loss
from src.losses.reco import _ChunkedInfoNCE, pool_to_stride, reco_from_features, uniform_sampler

THRESHOLD = 0.97


def make_inputs(seed: int = 0, n_img: int = 2, dim: int = 8, size: int = 6, num_classes: int = 4):
    """rep (requires grad), labels (255 where unlabeled), valid, probs."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n_img, size, size), generator=gen)
    centres = 2.0 * torch.randn(num_classes, dim, generator=gen)
    rep = centres[labels].permute(0, 3, 1, 2) + torch.randn(n_img, dim, size, size, generator=gen)
    valid = torch.rand(n_img, size, size, generator=gen) > 0.2
    labels[~valid & (torch.rand(n_img, size, size, generator=gen) > 0.5)] = 255
    logits = torch.randn(n_img, num_classes, size, size, generator=gen)
    # Some pixels are easy (confident in their own class), some confidently wrong: hard, since
    # hardness is the probability of the pixel's own class, not the maximum.
    draw = torch.rand(n_img, size, size, generator=gen)
    confident = torch.where(draw < 0.45, labels.clamp(max=num_classes - 1), (labels + 1) % num_classes)
    logits += 10.0 * F.one_hot(confident, num_classes).permute(0, 3, 1, 2) * (draw < 0.6)[:, None]
    return rep.requires_grad_(), labels, valid, logits.softmax(dim=1)


class Recorder:
    """A sampler that draws like `uniform_sampler` (or ``inner``) and keeps what it returned."""

    def __init__(self, inner=uniform_sampler) -> None:
        self.inner, self.calls = inner, []

    def __call__(self, hard_counts, counts, graph, num_queries, num_negatives, generator):
        out = self.inner(hard_counts, counts, graph, num_queries, num_negatives, generator)
        self.calls.append({"hard_counts": hard_counts, "counts": counts, "graph": graph, "out": out})
        return out

    @property
    def indices(self):
        return self.calls[-1]["out"]


def fixed(indices):
    """A sampler returning the given indices whatever it is asked."""
    return lambda *args: tuple(torch.as_tensor(x) for x in indices)


def chi_square_pvalue(observed: torch.Tensor, expected: torch.Tensor | None = None) -> float:
    """Pearson's chi-square goodness-of-fit p-value (uniform if ``expected`` is None); no scipy needed."""
    observed = observed.double()
    expected = torch.full_like(observed, observed.mean().item()) if expected is None else expected.double()
    statistic = ((observed - expected) ** 2 / expected).sum()
    half_df = torch.tensor((observed.numel() - 1) / 2, dtype=torch.float64)
    return torch.special.gammaincc(half_df, statistic / 2).item()


def loss_and_grad(fn, rep, *args, **kwargs):
    rep.grad = None
    loss = fn(rep, *args, **kwargs)
    loss.backward()
    return loss.detach(), rep.grad.clone()


def hard_pixels(labels, valid, probs, threshold=THRESHOLD):
    """Raster indices of the hard pixels of each present class with hard pixels, ascending."""
    flat = labels.reshape(-1)
    own = probs.permute(0, 2, 3, 1).reshape(-1, probs.shape[1])
    out = {}
    for c in range(probs.shape[1]):
        is_c = valid.reshape(-1) & (flat == c)
        if is_c.any():
            hard = (is_c & (own[:, c] < threshold)).nonzero().squeeze(1)
            if hard.numel():
                out[c] = hard
    return out


def expected_graph(rep, labels, valid, temperature):
    """pi_c over the present classes, from their prototypes (diagonal 0)."""
    feats = rep.detach().permute(0, 2, 3, 1)
    present = sorted(set(labels[valid].tolist()))
    protos = torch.stack([feats[valid & (labels == c)].mean(0) for c in present])
    sim = F.cosine_similarity(protos[:, None], protos[None], dim=2) / temperature
    sim.fill_diagonal_(float("-inf"))
    return sim.softmax(dim=1)


# ------------------------------------------------------------------ (a) deterministic equivalence
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("temperature", [0.5, 0.1])
def test_matches_loop_reference_with_the_same_indices(seed, temperature):
    rep, labels, valid, probs = make_inputs(seed)
    options = dict(num_queries=9, num_negatives=7, temperature=temperature)
    recorder = Recorder()
    loss, grad = loss_and_grad(reco_loss, rep, labels, valid, probs, sampler=recorder,
                               generator=torch.Generator().manual_seed(seed), **options)
    loss_ref, grad_ref = loss_and_grad(reco_loss_loop, rep, labels, valid, probs, indices=recorder.indices, **options)
    assert loss > 0
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6)


def test_matches_loop_reference_with_arbitrary_injected_indices():
    """Indices the uniform sampler would rarely produce: last pixels, one negative class only."""
    rep, labels, valid, probs = make_inputs(3)

    def extremes(hard_counts, counts, graph, num_queries, num_negatives, generator):
        rows, n = hard_counts.numel(), counts.numel()
        query = (hard_counts - 1)[:, None].expand(rows, num_queries).clone()
        query[:, 0] = 0
        own = graph.argmin(dim=1)  # the zero diagonal: the row's own class
        negative = ((own + 1) % n)[:, None, None].expand(rows, num_queries, num_negatives).clone()
        position = counts[negative] - 1
        position[..., ::2] = 0
        return query, negative, position

    options = dict(num_queries=5, num_negatives=6)
    recorder = Recorder(extremes)
    loss, grad = loss_and_grad(reco_loss, rep, labels, valid, probs, sampler=recorder, **options)
    loss_ref, grad_ref = loss_and_grad(reco_loss_loop, rep, labels, valid, probs, indices=recorder.indices, **options)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ (b) statistical equivalence
def test_mean_over_seeds_matches_loop_reference():
    rep, labels, valid, probs = make_inputs(4)
    options = dict(num_queries=6, num_negatives=8)
    seeds = range(200)
    with torch.no_grad():
        ours = [reco_loss(rep, labels, valid, probs, generator=torch.Generator().manual_seed(s), **options).item()
                for s in seeds]
        ref = [reco_loss_loop(rep, labels, valid, probs, rng=random.Random(s), **options).item() for s in seeds]

        def uniform_classes(hard_counts, counts, graph, num_queries, num_negatives, generator):
            return uniform_sampler(hard_counts, counts, (graph > 0).float(), num_queries, num_negatives, generator)

        wrong = [reco_loss(rep, labels, valid, probs, generator=torch.Generator().manual_seed(s),
                           sampler=uniform_classes, **options).item() for s in seeds]
    mean_ref = statistics.mean(ref)
    stderr = math.hypot(statistics.stdev(ours), statistics.stdev(ref)) / math.sqrt(len(seeds))
    assert abs(statistics.mean(ours) - mean_ref) < min(4 * stderr, 0.03 * mean_ref)
    # The check has power: ignoring the class graph (uniform negative classes) is detected.
    assert abs(statistics.mean(wrong) - mean_ref) > 4 * stderr


# ------------------------------------------------------------------ (c) degenerate batches
def one_class(rep, labels, valid, probs):
    return rep, torch.where(valid, 2, 255), valid, probs


def no_valid_pixel(rep, labels, valid, probs):
    return rep, labels, torch.zeros_like(valid), probs


def all_easy(rep, labels, valid, probs):
    own = F.one_hot(labels.clamp(max=3), 4).permute(0, 3, 1, 2).float()
    return rep, labels, valid, 0.99 * own + 0.0025


@pytest.mark.parametrize("edit", [one_class, no_valid_pixel, all_easy])
def test_zero_without_error_when_nothing_to_contrast(edit):
    rep, labels, valid, probs = edit(*make_inputs(5))
    loss, grad = loss_and_grad(reco_loss, rep, labels, valid, probs, num_queries=4, num_negatives=3)
    assert loss.dim() == 0 and loss.item() == 0.0
    assert grad.abs().sum() == 0
    assert reco_loss_loop(rep, labels, valid, probs, num_queries=4, num_negatives=3).item() == 0.0


def test_zero_when_strong_threshold_is_zero():
    rep, labels, valid, probs = make_inputs(5)
    assert reco_loss(rep, labels, valid, probs, strong_threshold=0.0).item() == 0.0


# ------------------------------------------------------------------ (d, e) where queries come from
@pytest.mark.parametrize("seed", [0, 6])
def test_gradient_reaches_only_sampled_hard_valid_queries(seed):
    rep, labels, valid, probs = make_inputs(seed)
    recorder = Recorder()
    _, grad = loss_and_grad(reco_loss, rep, labels, valid, probs, num_queries=5, num_negatives=9, sampler=recorder,
                            generator=torch.Generator().manual_seed(seed))
    hard = hard_pixels(labels, valid, probs)
    query_positions = recorder.indices[0]
    assert query_positions.shape[0] == len(hard)
    sampled = torch.cat([hard[c][query_positions[row]] for row, c in enumerate(sorted(hard))])
    touched = (grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1]).abs().sum(1) > 0).nonzero().squeeze(1)
    # Prototypes and keys are detached: only the sampled query pixels get a gradient.
    assert touched.tolist() == sorted(set(sampled.tolist()))
    # ... and those are valid, hard, with an in-range label.
    own = probs.permute(0, 2, 3, 1).reshape(-1, probs.shape[1])
    flat_labels = labels.reshape(-1)[touched]
    assert valid.reshape(-1)[touched].all() and (flat_labels < probs.shape[1]).all()
    assert (own[touched, flat_labels] < THRESHOLD).all()


def test_invalid_pixels_never_contribute():
    rep, labels, valid, probs = make_inputs(7)
    options = dict(num_queries=8, num_negatives=8)
    loss = reco_loss(rep, labels, valid, probs, generator=torch.Generator().manual_seed(0), **options)
    invalid = ~valid
    rep2 = torch.where(invalid[:, None], 100 * torch.randn_like(rep), rep)
    probs2 = torch.where(invalid[:, None], torch.rand_like(probs), probs)
    labels2 = torch.where(invalid, torch.randint_like(labels, 0, 4), labels)  # real classes, still invalid
    loss2 = reco_loss(rep2, labels2, valid, probs2, generator=torch.Generator().manual_seed(0), **options)
    assert loss2 == loss
    # An ignore label marks a pixel invalid even where `valid` is True.
    everywhere = torch.ones_like(valid)
    loss3 = reco_loss(rep2, torch.where(valid, labels, 255), everywhere, probs2,
                      generator=torch.Generator().manual_seed(0), **options)
    assert loss3 == loss


# ------------------------------------------------------------------ (f) sampled shapes
def test_one_row_of_queries_per_class_with_hard_pixels_and_k_keys_each():
    Q, K = 4, 5
    recorder = Recorder()
    rep, labels, valid, probs = make_inputs(0)
    reco_loss(rep, labels, valid, probs, num_queries=Q, num_negatives=K, sampler=recorder)
    n_q = len(hard_pixels(labels, valid, probs))
    query_positions, negative_classes, negative_positions = recorder.indices
    assert query_positions.shape == (n_q, Q) and negative_classes.shape == negative_positions.shape == (n_q, Q, K)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("num_negatives", [1, 7])
def test_hand_computed_example(temperature, num_negatives):
    """Class 0: a hard pixel a and an easy pixel b; class 1: one easy pixel e (own probabilities
    equal to the threshold are easy). All queries are a, all negatives e, so the loss is
    CE([cos(a, mu_0), cos(a, e) x K] / t, 0) / 2 whatever is drawn."""
    a, b, e = [1.0, 0.0], [0.0, 1.0], [0.5, -1.0]
    rep = torch.tensor([a, b, e]).T.reshape(1, 2, 1, 3).requires_grad_()
    labels = torch.tensor([[[0, 0, 1]]])
    probs = torch.tensor([[0.6, 0.75, 0.25], [0.4, 0.25, 0.75]]).reshape(1, 2, 1, 3)
    loss = reco_loss(rep, labels, torch.ones(1, 1, 3, dtype=torch.bool), probs, strong_threshold=0.75,
                     temperature=temperature, num_queries=3, num_negatives=num_negatives)
    positive = (0.5 / math.sqrt(0.5)) / temperature  # cos(a, (a + b) / 2)
    negative = (0.5 / math.sqrt(1.25)) / temperature  # cos(a, e)
    expected = (math.log(math.exp(positive) + num_negatives * math.exp(negative)) - positive) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------ (g) sampling distributions
def test_negative_classes_follow_the_class_graph():
    rep, labels, valid, probs = make_inputs(8, num_classes=5, size=8)
    recorder = Recorder()
    Q, K = 64, 64
    reco_loss(rep, labels, valid, probs, num_queries=Q, num_negatives=K, sampler=recorder,
              generator=torch.Generator().manual_seed(1))
    graph = expected_graph(rep, labels, valid, 0.5)
    present = [c for c in range(5) if bool((valid & (labels == c)).any())]
    rows = [present.index(c) for c in sorted(hard_pixels(labels, valid, probs))]
    call = recorder.calls[-1]
    torch.testing.assert_close(call["graph"], graph[rows])
    negative_classes = recorder.indices[1]
    for row, own in enumerate(rows):
        counts = torch.bincount(negative_classes[row].reshape(-1), minlength=len(present)).double()
        assert counts[own] == 0  # a class is never its own negative
        others = [j for j in range(len(present)) if j != own]
        expected = graph[own, others].double()
        expected *= counts[others].sum() / expected.sum()  # Q * K * pi, summing exactly like the counts
        assert chi_square_pvalue(counts[others], expected) > 1e-4
        assert chi_square_pvalue(counts[others]) < 1e-6  # the graph is far from uniform: the test has power


def test_each_query_draws_its_negative_classes_independently():
    # Per query, the count of a class among its K negatives is Binomial(K, pi): its spread over
    # queries shows the draws are independent per key (a fixed share per query has variance 0).
    graph = torch.tensor([[0.0, 0.7, 0.2, 0.1], [0.5, 0.0, 0.0, 0.5]], dtype=torch.float64)
    counts = torch.tensor([30, 40, 50, 60])
    Q, K = 4000, 64
    _, classes, positions = uniform_sampler(torch.tensor([5, 7]), counts, graph, Q, K,
                                            torch.Generator().manual_seed(3))
    assert classes.shape == positions.shape == (2, Q, K)
    per_query = torch.nn.functional.one_hot(classes, 4).sum(dim=2).double()  # (2, Q, 4)
    assert (per_query.sum(dim=2) == K).all()
    mean, var = per_query.mean(dim=1), per_query.var(dim=1)
    expected_var = K * graph * (1 - graph)
    torch.testing.assert_close(mean, K * graph, rtol=0.03, atol=0.05)
    torch.testing.assert_close(var, expected_var, rtol=0.15, atol=1e-9)  # zero-probability classes: exactly 0
    assert (positions < counts[classes]).all() and (positions >= 0).all()


def test_two_classes_take_every_negative_from_the_other():
    rep, labels, valid, probs = make_inputs(9)
    labels = torch.where(labels < 255, labels % 2, labels)
    recorder = Recorder()
    reco_loss(rep, labels, valid, probs, num_queries=16, num_negatives=32, sampler=recorder)
    negative_classes = recorder.indices[1]
    assert negative_classes.shape[0] == 2
    assert (negative_classes[0] == 1).all() and (negative_classes[1] == 0).all()


def test_query_and_key_positions_are_uniform_with_replacement():
    rep, labels, valid, probs = make_inputs(10, size=8)
    recorder = Recorder()
    Q, K = 2000, 40
    reco_loss(rep, labels, valid, probs, num_queries=Q, num_negatives=K, sampler=recorder,
              generator=torch.Generator().manual_seed(2))
    call = recorder.calls[-1]
    query_positions, negative_classes, negative_positions = call["out"]
    for row, hard_count in enumerate(call["hard_counts"].tolist()):
        assert hard_count < Q  # so duplicates must appear
        counts = torch.bincount(query_positions[row], minlength=hard_count)
        assert counts.numel() == hard_count and chi_square_pvalue(counts) > 1e-4
    # Keys: uniform over ALL valid pixels of the drawn class, easy ones included.
    for j, size in enumerate(call["counts"].tolist()):
        drawn = negative_positions[negative_classes == j]
        counts = torch.bincount(drawn, minlength=size)
        assert counts.numel() == size and chi_square_pvalue(counts) > 1e-4
    assert (call["counts"] > call["hard_counts"].max()).any()  # some classes do have easy pixels


# ------------------------------------------------------------------ (h) skipped classes still count
def test_class_without_hard_pixels_is_skipped_but_counted():
    rep, labels, valid, probs = make_inputs(11, num_classes=3)
    probs = probs.clone()
    easy_two = labels == 2
    probs[:, 2] = torch.where(easy_two, 0.99, probs[:, 2])  # every class-2 pixel is easy
    options = dict(num_queries=5, num_negatives=6)
    recorder = Recorder()
    reco_loss(rep, labels, valid, probs, sampler=recorder, **options)
    assert recorder.calls[-1]["counts"].numel() == 3  # three classes present...
    assert recorder.calls[-1]["hard_counts"].numel() == 2  # ... only classes 0 and 1 have queries
    # Same draws restricted to classes 0 and 1; then remove class 2 from the batch (n: 3 -> 2).
    query, negative_classes, positions = recorder.indices
    negative_classes = torch.where(negative_classes == 2, 1 - torch.arange(2)[:, None, None], negative_classes)
    positions = torch.minimum(positions, recorder.calls[-1]["counts"][negative_classes] - 1)
    indices = (query, negative_classes, positions)
    loss3 = reco_loss(rep, labels, valid, probs, sampler=fixed(indices), **options)
    loss2 = reco_loss(rep, labels, valid & ~easy_two, probs, sampler=fixed(indices), **options)
    torch.testing.assert_close(3 * loss3, 2 * loss2)
    torch.testing.assert_close(loss3, reco_loss_loop(rep, labels, valid, probs, indices=indices, **options))


# ------------------------------------------------------------------ (i) chunking
@pytest.mark.parametrize("dense", [False, True])
def test_chunked_equals_unchunked(dense):
    rep, labels, valid, probs = make_inputs(12, num_classes=5, size=8)
    results = [
        loss_and_grad(reco_loss, rep, labels, valid, probs, num_queries=7, num_negatives=11,
                      generator=torch.Generator().manual_seed(3), chunk_bytes=chunk_bytes, dense=dense)
        # One class per chunk, two (a class costs 4 * Q * (K * D + 4 * (K + 1)) = 3808 bytes), all.
        for chunk_bytes in (1, 8000, 2**40)
    ]
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-6, atol=1e-7)


def test_dense_and_gathered_keys_give_the_same_loss_and_gradient():
    """The two ways of computing the key logits (matmul over the pool, or gathered keys) agree."""
    rep, labels, valid, probs = make_inputs(16, num_classes=5, size=8, dim=12)
    dense, gathered = (
        loss_and_grad(reco_loss, rep, labels, valid, probs, num_queries=9, num_negatives=13,
                      generator=torch.Generator().manual_seed(4), dense=flag)
        for flag in (True, False)
    )
    assert dense[0] > 0
    torch.testing.assert_close(dense[0], gathered[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dense[1], gathered[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dense", [False, True])
def test_fused_gradient_is_exact(dense):
    """The chunked InfoNCE computes its gradient by hand; compare with finite differences."""
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(3, 4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    positives = F.normalize(torch.randn(3, 5, dtype=torch.float64, generator=gen), dim=-1)
    pool = F.normalize(torch.randn(10, 5, dtype=torch.float64, generator=gen), dim=-1)
    key_index = torch.randint(0, 10, (3, 4, 6), generator=gen)
    assert torch.autograd.gradcheck(
        lambda q: _ChunkedInfoNCE.apply(q, positives, pool, key_index, 0.3, 2, True, dense), (queries,)
    )


def test_no_grad_gives_the_same_value():
    rep, labels, valid, probs = make_inputs(13)
    loss = reco_loss(rep, labels, valid, probs, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss_no_grad = reco_loss(rep, labels, valid, probs, generator=torch.Generator().manual_seed(0))
    assert loss_no_grad == loss.detach()


def test_backward_keeps_no_keys():
    """Chunking bounds memory only if no chunk's (Q, K, D) keys survive until the backward pass."""
    rep, labels, valid, probs = make_inputs(14, dim=16)
    Q, K = 8, 64
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = reco_loss(rep, labels, valid, probs, num_queries=Q, num_negatives=K, chunk_bytes=1)
    n_q = len(hard_pixels(labels, valid, probs))
    assert n_q >= 3 and loss > 0
    keys_bytes = n_q * Q * K * 16 * 4
    assert sum(saved) < keys_bytes / 8  # queries and their gradient are (n_q, Q, D), 1/K of the keys


def test_low_precision_representations():
    rep, labels, valid, probs = make_inputs(15)
    options = dict(num_queries=6, num_negatives=5)
    loss = reco_loss(rep, labels, valid, probs, generator=torch.Generator().manual_seed(0), **options)
    rep_bf16 = rep.detach().bfloat16().requires_grad_()
    loss_bf16 = reco_loss(rep_bf16, labels, valid, probs, generator=torch.Generator().manual_seed(0), **options)
    loss_bf16.backward()
    assert loss_bf16.dtype == torch.float32 and rep_bf16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss_bf16, loss.detach(), rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------ arguments and resampling
@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"num_queries": 0}, "num_queries"),
        ({"num_negatives": 0}, "num_negatives"),
        ({"strong_threshold": 1.5}, "strong_threshold"),
        ({"strong_threshold": -0.1}, "strong_threshold"),
        ({"chunk_bytes": 0}, "chunk_bytes"),
    ],
)
def test_rejects_bad_options(option, match):
    with pytest.raises(ValueError, match=match):
        reco_loss(*make_inputs(0), **option)


def test_rejects_inconsistent_shapes():
    rep, labels, valid, probs = make_inputs(0)
    with pytest.raises(ValueError, match="labels"):
        reco_loss(rep, labels[:, :-1], valid, probs)
    with pytest.raises(ValueError, match="labels"):
        reco_loss(rep, labels.float(), valid, probs)
    with pytest.raises(ValueError, match="valid"):
        reco_loss(rep, labels, valid.float(), probs)
    with pytest.raises(ValueError, match="probs"):
        reco_loss(rep, labels, valid, probs[:1])
    with pytest.raises(ValueError, match="rep"):
        reco_loss(rep[0], labels, valid, probs)


@pytest.mark.parametrize(("size", "small"), [((128, 128), (32, 32)), ((321, 321), (81, 81)), ((7, 5), (3, 4))])
def test_downsample_nearest_is_torch_nearest_on_one_grid(size, small):
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 21, (2, *size), generator=gen)
    labels[:, ::3] = 255
    confidence = torch.rand(2, *size, generator=gen, dtype=torch.float64)
    expected = F.interpolate(labels[:, None].float(), size=small, mode="nearest")[:, 0].long()
    assert torch.equal(downsample_nearest(labels, small), expected)
    mask = downsample_nearest(labels != 255, small)
    assert mask.dtype == torch.bool and torch.equal(mask, expected != 255)  # same grid as the labels
    resized = downsample_nearest(confidence, small)
    assert resized.dtype == torch.float64 and torch.isin(resized, confidence).all()
    if size == (128, 128):
        assert torch.equal(downsample_nearest(labels, small), labels[:, ::4, ::4])
    with pytest.raises(ValueError, match="N, H, W"):
        downsample_nearest(labels[0, 0], small)


def test_fine_decoder_features_are_pooled_to_stride_4():
    seen = []

    class Head(torch.nn.Module):
        def forward(self, features):
            seen.append(tuple(features.shape))
            return features[:, :4]

    labels = torch.randint(0, 3, (2, 32, 32))
    logits = torch.randn(2, 3, 32, 32)
    for features, grid in ((torch.randn(2, 8, 32, 32), (8, 8)), (torch.randn(2, 8, 8, 8), (8, 8))):
        loss = reco_from_features(Head(), logits, features, labels, torch.ones_like(labels, dtype=torch.bool),
                                  strong_threshold=1.0, num_queries=4, num_negatives=4)
        assert torch.isfinite(loss)
        assert seen[-1][-2:] == grid  # U-Net's stride-1 features and DeepLabV3+'s stride-4 ones: one grid


def test_pool_to_stride_pools_finer_features_by_the_nearest_integer_factor():
    features = torch.arange(2 * 16 * 16, dtype=torch.float32).view(1, 2, 16, 16)
    assert torch.equal(pool_to_stride(features, 4, 16), F.avg_pool2d(features, 4))  # stride 1 -> 4
    assert pool_to_stride(features, 4, 64) is features  # already stride 4
    assert pool_to_stride(features, 4, 128) is features  # coarser: left as it is
