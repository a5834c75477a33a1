"""The ReCo loss (Liu et al., ICLR 2022, arXiv:2104.04465; METHODS.md section 5), vectorised.

A pure function of tensors, usable without Lightning. For every class present among the valid
pixels of the batch, ``num_queries`` hard queries (valid pixels whose probability of their own
class is under ``strong_threshold``) are drawn uniformly with replacement. Each query is
contrasted against its class prototype (mean feature of all valid pixels of the class, detached)
and ``num_negatives`` keys: the class of a key is drawn from a softmax over the cosine similarity
of the prototypes (the semantic class-relation graph), the key pixel uniformly among all valid
pixels of that class. Gradients flow only through the queries.

Design (METHODS.md 5.1): valid pixels are sorted by class (CSR layout: counts and offsets per
class; a second sort gives the hard pixels), so every random pick is index arithmetic on a batch
of random integers, and each query's negative classes are one multinomial draw over its row of
the graph (`uniform_sampler`). There is no Python loop over queries, negatives or pixels.
The keys, ``Q * K * D`` floats per class, are gathered one chunk of classes at a time; each
chunk's gradient with respect to its queries is computed in the same pass, so a chunk's keys are
freed before the next one is gathered and the peak memory is one chunk, not every class's keys
kept alive for the backward pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.datasets.base import IGNORE_INDEX

# sampler(hard_counts (q,), counts (n,), graph (q, n), num_queries, num_negatives, generator)
#   -> query_positions (q, Q): positions among each row class's hard pixels,
#      negative_classes (q, Q, K): indices into the n present classes,
#      negative_positions (q, Q, K): positions among each negative class's valid pixels.
# Rows are the present classes that have hard pixels, ascending; pixels of a class are in
# raster order (image, row, column). All outputs are long tensors on the device of ``counts``.
Sampler = Callable[[Tensor, Tensor, Tensor, int, int, "torch.Generator | None"], tuple[Tensor, Tensor, Tensor]]

EPS = 1e-8  # on norms, as torch.cosine_similarity
DENSE_POOL_FACTOR = 16  # dense path while the pool has at most this many times num_negatives pixels
REPRESENTATION_STRIDE = 4  # pixels of the input per representation cell, as DeepLabV3+'s decoder


def downsample_nearest(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest resampling of (N, H, W) label, mask or confidence maps to ``size``, dtype kept.

    The grid is exactly torch's ``F.interpolate(mode="nearest")`` (as the reference uses), so
    labels and masks resampled here line up; values are gathered, never cast (any dtype works).
    """
    if x.dim() != 3:
        raise ValueError(f"x must be (N, H, W), got shape {tuple(x.shape)}")
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    # Nearest is separable: interpolating the row and column indices themselves gives torch's
    # source pixel of every output pixel (float32 is exact for indices below 2**24).
    height, width = x.shape[1:]
    rows = torch.arange(height, device=x.device, dtype=torch.float32).view(1, 1, height, 1)
    cols = torch.arange(width, device=x.device, dtype=torch.float32).view(1, 1, 1, width)
    rows = F.interpolate(rows, size=(size[0], 1), mode="nearest").view(-1).long()
    cols = F.interpolate(cols, size=(1, size[1]), mode="nearest").view(-1).long()
    return x[:, rows[:, None], cols[None, :]]


def pool_to_stride(features: Tensor, stride: int, input_width: int) -> Tensor:
    """Decoder features (N, F, h, w) average-pooled to ``stride`` input pixels per cell.

    A decoder finer than ``stride`` (U-Net: stride 1) is pooled by the nearest integer factor; a
    coarser or equal one is returned as it is.
    """
    pool = max(1, round(stride * features.shape[-1] / input_width))
    return F.avg_pool2d(features, pool, ceil_mode=True) if pool > 1 else features


def reco_from_features(
    rep_head: nn.Module, logits: Tensor, features: Tensor, labels: Tensor, valid: Tensor, **loss_options: Any
) -> Tensor:
    """The ReCo loss of a batch, from the student's outputs and full-resolution targets.

    Labels and validity are brought to the representation grid with nearest sampling (one grid
    for both), as the reference does. Decoder features finer than ``REPRESENTATION_STRIDE`` are
    average-pooled to it before the head.

    Args:
        rep_head: The representation head applied to ``features``.
        logits: (N, C, H, W) student logits at input size; their softmax, resized bilinearly to the
            representation grid and detached, gives each pixel's class probabilities.
        features: (N, F, h, w) decoder features.
        labels: (N, H, W) long labels (``IGNORE_INDEX`` where unknown).
        valid: (N, H, W) bool: which pixels may enter the loss.
        **loss_options: ``strong_threshold``, ``temperature``, ``num_queries``, ``num_negatives``.
    """
    # The representation lives on a stride-4 grid (METHODS.md 2). A finer decoder (U-Net: stride 1)
    # is average-pooled to it first: the loss sees the reference's pixel count, at 1/16 of the cost.
    rep = rep_head(pool_to_stride(features, REPRESENTATION_STRIDE, labels.shape[-1]))
    size = rep.shape[-2:]
    # NOTE: the reference takes the softmax of its stride-4 logits; smp upsamples inside its head,
    # so we resize the full-size logits back to the representation grid.
    probs = F.interpolate(logits.detach().float(), size=size, mode="bilinear", align_corners=False).softmax(dim=1)
    labels_small = downsample_nearest(labels, size)
    valid_small = downsample_nearest(valid, size).bool() & (labels_small != IGNORE_INDEX)
    return reco_loss(rep, labels_small, valid_small, probs, **loss_options)


def uniform_sampler(
    hard_counts: Tensor,
    counts: Tensor,
    graph: Tensor,
    num_queries: int,
    num_negatives: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """ReCo's sampling: queries uniform with replacement, negative classes ~ graph rows, keys uniform.

    A query's K negative classes are i.i.d. draws from its row of the graph. The loss does not
    depend on their order, so what is drawn is how many of the K come from each class, a
    multinomial, as a chain of binomials (class j takes Binomial(K - taken so far, p_j / mass of
    classes j..n-1)); the classes are then laid out in ascending order inside each query. The
    same distribution as K draws of ``torch.multinomial``, with one vectorised draw per class
    instead of one per key. Positions are uniform integers: 62 random bits modulo the size (a
    bias under size / 2**62). Numbers are drawn on the generator's device (the device of
    ``counts`` without one) and moved.
    """
    device = counts.device
    draw_device = generator.device if generator is not None else device
    rows, num_present = graph.shape

    def positions(size: Tensor, *shape: int) -> Tensor:
        bits = torch.randint(0, 2**62, shape, generator=generator, device=draw_device).to(device)
        return bits.remainder_(size)

    query_positions = positions(hard_counts[:, None], rows, num_queries)
    weights = graph.to(device=draw_device, dtype=torch.float64)
    mass_from = weights.flip(1).cumsum(dim=1).flip(1)  # (q, n): the mass of classes j..n-1
    share = torch.where(weights > 0, weights / mass_from.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    # The last class that can be drawn takes whatever is left, so every query gets exactly K.
    column = torch.arange(num_present, device=draw_device)
    last_drawable = torch.where(weights > 0, column, 0).amax(dim=1, keepdim=True)
    share = torch.where(column == last_drawable, 1.0, share.clamp(max=1.0))
    left = torch.full((rows, num_queries), float(num_negatives), dtype=torch.float64, device=draw_device)
    taken = torch.empty(rows, num_queries, num_present, dtype=torch.float64, device=draw_device)
    for j in range(num_present):  # a loop over the present classes, not over queries or keys
        taken[..., j] = torch.binomial(left, share[:, j, None].expand_as(left).contiguous(), generator=generator)
        left -= taken[..., j]
    classes = column.repeat(rows * num_queries).repeat_interleave(
        taken.flatten().long(), output_size=rows * num_queries * num_negatives
    )
    negative_classes = classes.to(device).view(rows, num_queries, num_negatives)
    sizes = counts.index_select(0, negative_classes.flatten()).view_as(negative_classes)
    negative_positions = positions(sizes, rows, num_queries, num_negatives)
    return query_positions, negative_classes, negative_positions


class _ChunkedInfoNCE(torch.autograd.Function):
    """Per-query InfoNCE losses (target 0), computed one chunk of classes at a time.

    Autograd would keep every chunk's keys for the backward pass (the einsum needs them), which
    is ``Q * K * D`` floats per class (128 MiB at the defaults). Instead each chunk also computes
    ``d loss / d query = (sum_j softmax_j * key_j - positive) / tau`` (key_0 = the positive) while
    its keys are in memory; only that (c, Q, D) gradient is saved. Not twice differentiable.

    When the pool of keys is small (``dense``: fewer than a few times K pixels, as on small
    crops), gathering K keys of D floats per query costs more than comparing every query with
    every pool pixel: then a (c, Q, M) cosine matrix is computed by one matmul and the K
    logits are gathered from it (and the gradient scattered back), with the same result. On CPU
    the dense path computes only the sampled entries of that matrix, as sparse products over the
    pool: ``torch.sparse.sampled_addmm`` for the logits and, for the gradient, each query's K
    pool rows summed with their softmax weights (``F.embedding_bag``, half the time of a sparse
    matrix product on a 2-core CPU). The full (c, Q, M) product is bound by writing its M columns
    when D is small; the sampled one took half its time on a 2-core CPU at the default profile's
    sizes. On GPU the full matmul stays (cheap there; the sparse kernels were not measured).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        queries: Tensor,
        positives: Tensor,
        pool: Tensor,
        key_index: Tensor,
        temperature: float,
        chunk_rows: int,
        with_grad: bool,
        dense: bool,
    ) -> Tensor:
        losses = queries.new_empty(queries.shape[:2])  # (q, Q)
        # See the class docstring. torch's CPU sampled_addmm fails on rows of more entries than columns.
        sampled = dense and pool.device.type == "cpu" and key_index.shape[-1] <= pool.shape[0]
        grad = torch.empty_like(queries) if with_grad else None
        if not dense:
            # One key buffer reused by every chunk: a fresh 128 MiB tensor per class costs page faults on CPU.
            per_class = key_index[0].numel()
            buffer = pool.new_empty(min(chunk_rows, key_index.shape[0]) * per_class, pool.shape[1])
        with torch.autocast(queries.device.type, enabled=False):  # fp32 throughout, even under AMP
            for start in range(0, queries.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                index = key_index[rows]  # (c, Q, K)
                positive = torch.einsum("cqd,cd->cq", queries[rows], positives[rows]) / temperature  # (c, Q)
                if sampled:
                    # Row i of the pattern holds query i's K key columns: one dot product per sampled key.
                    pattern = _sampling_pattern(index, pool.shape[0], pool.dtype)
                    negative = torch.sparse.sampled_addmm(
                        pattern, queries[rows].reshape(-1, pool.shape[1]), pool.T, beta=0.0
                    ).values().view(index.shape)  # (c, Q, K), in the order of `index`
                elif dense:
                    cosines = queries[rows] @ pool.T  # (c, Q, M): every query against every key
                    negative = torch.gather(cosines, 2, index)  # (c, Q, K)
                else:
                    keys = torch.index_select(pool, 0, index.reshape(-1), out=buffer[: index.numel()])
                    keys = keys.view(*index.shape, pool.shape[1])  # (c, Q, K, D), the memory peak
                    negative = torch.einsum("cqd,cqkd->cqk", queries[rows], keys)
                # The logits are [positive, negative] (the positive is the target); kept apart, no copies.
                negative = negative.div_(temperature)
                log_norm = torch.logaddexp(positive, torch.logsumexp(negative, dim=-1))  # (c, Q)
                losses[rows] = log_norm - positive
                if grad is not None:
                    weights = negative.sub_(log_norm[..., None]).exp_()  # softmax over the keys, (c, Q, K)
                    if sampled:
                        # sum_k w_k key_k: each query's K pool rows, weighted and summed (a bag of K rows)
                        bags = index.reshape(-1, index.shape[-1])
                        expected = F.embedding_bag(bags, pool, per_sample_weights=weights.view_as(bags), mode="sum")
                        expected = expected.view(queries[rows].shape)
                    elif dense:
                        # sum_k w_k key_k = (w scattered onto the pool's M columns) @ pool
                        spread = torch.zeros_like(cosines).scatter_add_(2, index, weights)
                        expected = spread @ pool
                    else:
                        expected = torch.einsum("cqk,cqkd->cqd", weights, keys)
                    weight_positive = torch.exp(positive - log_norm)  # (c, Q)
                    expected += (weight_positive - 1.0)[..., None] * positives[rows, None, :]
                    grad[rows] = expected / temperature
        if grad is not None:
            ctx.save_for_backward(grad)
        return losses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_losses: Tensor) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad * grad_losses[..., None], None, None, None, None, None, None, None


def _sampling_pattern(index: Tensor, num_columns: int, dtype: torch.dtype) -> Tensor:
    """A CSR matrix (zeros) with one row per query of ``index`` (c, Q, K): its K pool columns, in order."""
    flat = index.reshape(-1)
    crow = torch.arange(0, flat.numel() + 1, index.shape[-1], device=flat.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": sampled_addmm is exact
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, flat, torch.zeros(flat.numel(), dtype=dtype, device=flat.device),
                                       size=(flat.numel() // index.shape[-1], num_columns), check_invariants=False)


def reco_loss(
    rep: Tensor,
    labels: Tensor,
    valid: Tensor,
    probs: Tensor,
    *,
    strong_threshold: float = 0.97,
    temperature: float = 0.5,
    num_queries: int = 256,
    num_negatives: int = 512,
    generator: torch.Generator | None = None,
    chunk_bytes: int = 256 * 2**20,
    sampler: Sampler | None = None,
    dense: bool | None = None,
) -> Tensor:
    """ReCo's regional contrastive loss of one mini-batch (METHODS.md 5).

    Args:
        rep: (N, D, h, w) student representations; the gradient reaches only the sampled queries.
        labels: (N, h, w) integer class indices on the representation grid. Pixels whose label
            is outside ``[0, C)`` (255) are treated as invalid whatever ``valid`` says.
        valid: (N, h, w) bool: pixels allowed in the loss (labeled, or confident pseudo-labels).
        probs: (N, C, h, w) the student's class probabilities on the same grid (used detached).
        strong_threshold: delta_s: a valid pixel is a hard query when its own-class probability is below it.
        temperature: tau of both the class-relation softmax and the InfoNCE logits.
        num_queries: Q, queries per class per mini-batch.
        num_negatives: K, negative keys per query.
        generator: Source of all random draws (None: the global RNG of ``rep``'s device).
        chunk_bytes: Memory budget of one chunk of classes (their fp32 keys and logits); at
            least one class is processed per chunk.
        sampler: Hook returning the sampled positions (see `Sampler`; tests inject fixed ones).
            Default: `uniform_sampler`.
        dense: Compute each query's cosine with every pool pixel by one matmul and gather the
            sampled keys' logits from it (True), or gather the keys' features (False). Same
            result; None picks the cheaper (dense while the pool has at most
            ``DENSE_POOL_FACTOR * num_negatives`` pixels).

    Returns:
        A 0-dim float32 tensor: the sum over classes with hard pixels of their mean InfoNCE loss,
        divided by the number of classes present. Zero, still attached to ``rep``'s graph, when
        fewer than two classes are present or no valid pixel is hard.
    """
    _check_inputs(rep, labels, valid, probs, strong_threshold, temperature, num_queries, num_negatives, chunk_bytes)
    sampler = sampler or uniform_sampler
    n_img, dim, height, width = rep.shape
    num_classes = probs.shape[1]
    device = rep.device

    with torch.no_grad():
        flat_labels = labels.reshape(-1).long()  # pixels in raster order (image, row, column)
        in_loss = valid.reshape(-1) & (flat_labels >= 0) & (flat_labels < num_classes)
        safe_labels = torch.where(in_loss, flat_labels, 0)
        # (N, C, h, w) -> (N, h, w, C) -> (N*h*w, C) -> own-class probability (N*h*w,)
        own_prob = probs.detach().permute(0, 2, 3, 1).reshape(-1, num_classes).gather(1, safe_labels[:, None])[:, 0]
        hard = in_loss & (own_prob < strong_threshold)
        # CSR layouts: a stable sort by class keeps raster order inside a class; class C collects
        # everything else at the end. `order` holds all valid pixels, `hard_order` the hard ones.
        sort_key = torch.where(in_loss, flat_labels, num_classes)
        hard_key = torch.where(hard, flat_labels, num_classes)
        order = torch.argsort(sort_key, stable=True)
        hard_order = torch.argsort(hard_key, stable=True)
        counts_all = torch.bincount(sort_key, minlength=num_classes + 1)[:num_classes]
        hard_counts_all = torch.bincount(hard_key, minlength=num_classes + 1)[:num_classes]
        # The one host sync: the CSR sizes decide how much work there is.
        sizes = torch.stack([counts_all, hard_counts_all]).cpu()
    present_cpu = sizes[0].nonzero().squeeze(1)  # the classes P, ascending
    num_present = present_cpu.numel()
    rows_cpu = sizes[1, present_cpu].nonzero().squeeze(1)  # rows of P with hard pixels
    if num_present <= 1 or rows_cpu.numel() == 0:
        return rep.sum().float() * 0.0  # zero that keeps the graph valid
    num_valid = int(sizes[0].sum())
    present, rows = present_cpu.to(device), rows_cpu.to(device)

    with torch.no_grad():
        counts, hard_counts = counts_all[present], hard_counts_all[present]  # (n,)
        offsets = (torch.cumsum(counts_all, 0) - counts_all)[present]
        hard_offsets = (torch.cumsum(hard_counts_all, 0) - hard_counts_all)[present]
        pixels = order[:num_valid]
        # (N, D, h, w) -> (N, D, h*w), then (image, pixel) pairs -> (M, D) without copying all of rep
        pool = rep.detach().flatten(2)[pixels // (height * width), :, pixels % (height * width)].float()
        sums = torch.zeros(num_classes, dim, device=device).index_add_(0, flat_labels[pixels], pool)
        prototypes = F.normalize(sums[present] / counts[:, None], dim=1, eps=EPS)  # (n, D) unit means
        pool = F.normalize(pool, dim=1, eps=EPS)  # keys only enter through cosines
        # Class-relation graph: softmax over the other present classes of cos(mu_c, mu_j) / tau.
        similarity = prototypes @ prototypes.T / temperature
        similarity.fill_diagonal_(float("-inf"))
        graph = similarity.softmax(dim=1)  # (n, n), zero diagonal

        query_positions, negative_classes, negative_positions = sampler(
            hard_counts[rows], counts, graph[rows], num_queries, num_negatives, generator
        )
        query_pixels = hard_order[hard_offsets[rows, None] + query_positions]  # (q, Q) raster indices
        # (q, Q, K) rows of `pool`
        key_index = offsets.index_select(0, negative_classes.reshape(-1)).view_as(negative_positions)
        key_index += negative_positions

    # (q, Q) raster indices -> (q, Q, D) features, with gradient
    queries = rep.flatten(2)[query_pixels // (height * width), :, query_pixels % (height * width)]
    queries = F.normalize(queries.float(), dim=-1, eps=EPS)
    if dense is None:
        # A matmul over all M pool pixels beats gathering K keys of D floats while M is a few K.
        dense = num_valid <= DENSE_POOL_FACTOR * num_negatives
    per_key = 2 * num_valid / num_negatives if dense else dim  # floats held per sampled key
    per_class_bytes = int(4 * num_queries * (num_negatives * per_key + 4 * (num_negatives + 1)))
    chunk_rows = max(1, chunk_bytes // per_class_bytes)
    with_grad = torch.is_grad_enabled() and queries.requires_grad
    losses = _ChunkedInfoNCE.apply(
        queries, prototypes[rows], pool, key_index, temperature, chunk_rows, with_grad, dense
    )  # (q, Q)
    return losses.mean(dim=1).sum() / num_present


def _check_inputs(
    rep: Tensor,
    labels: Tensor,
    valid: Tensor,
    probs: Tensor,
    strong_threshold: float,
    temperature: float,
    num_queries: int,
    num_negatives: int,
    chunk_bytes: int,
) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= strong_threshold <= 1.0:
        raise ValueError(f"strong_threshold must be in [0, 1], got {strong_threshold}")
    if num_queries < 1:
        raise ValueError(f"num_queries must be >= 1, got {num_queries}")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    if rep.dim() != 4:
        raise ValueError(f"rep must be (N, D, h, w), got shape {tuple(rep.shape)}")
    n_img, _, height, width = rep.shape
    if labels.shape != (n_img, height, width):
        raise ValueError(f"labels must be (N, h, w) = {(n_img, height, width)} like rep, got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must hold integer class indices, got dtype {labels.dtype}")
    if valid.shape != labels.shape or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool (N, h, w) = {(n_img, height, width)} tensor, "
                         f"got {valid.dtype} {tuple(valid.shape)}")
    if probs.dim() != 4 or probs.shape[0] != n_img or probs.shape[2:] != (height, width) or probs.shape[1] < 1:
        raise ValueError(f"probs must be (N, C, h, w) with (N, h, w) = {(n_img, height, width)}, "
                         f"got {tuple(probs.shape)}")
