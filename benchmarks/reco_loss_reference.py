"""Slow loop reference of the ReCo loss (METHODS.md 5), the oracle for `src.losses.reco`.

Shared by `tests/losses/test_reco_loss.py` and `benchmarks/bench_reco_loss.py`, so it exists
once. It follows the structure of the original implementation: class by class, query by query
and negative by negative in Python, one scalar random draw at a time, with the cosine logits
and cross-entropy of each class computed as the original does. It deliberately shares no code
with the vectorised version.

Randomness comes from a `random.Random`; alternatively ``indices`` fixes every draw, in the
layout of `src.losses.reco.Sampler`: ``(query_positions (q, Q), negative_classes (q, Q, K),
negative_positions (q, Q, K))`` where row r is the r-th present class (ascending) that has hard
pixels, negative classes index the present classes, and positions count pixels of a class in
raster order (image, row, column).
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def reco_loss_loop(
    rep: Tensor,
    labels: Tensor,
    valid: Tensor,
    probs: Tensor,
    *,
    strong_threshold: float = 0.97,
    temperature: float = 0.5,
    num_queries: int = 256,
    num_negatives: int = 512,
    rng: random.Random | None = None,
    indices: Sequence[Tensor] | None = None,
) -> Tensor:
    """ReCo loss with Python loops; same arguments as `src.losses.reco.reco_loss`."""
    rng = rng or random.Random(0)
    fixed = None if indices is None else [torch.as_tensor(x).tolist() for x in indices]
    num_classes = probs.shape[1]
    features = rep.permute(0, 2, 3, 1)  # (N, h, w, D); boolean masks select in raster order

    all_features, hard_features, prototypes = [], [], []
    for c in range(num_classes):
        mask = valid & (labels == c)
        if not bool(mask.any()):
            continue  # class absent from the batch
        all_features.append(features[mask])
        hard_features.append(features[mask & (probs[:, c] < strong_threshold)])
        prototypes.append(features[mask].mean(dim=0).detach())
    num_present = len(all_features)
    loss = rep.sum() * 0.0
    if num_present <= 1:
        return loss

    pool = torch.cat(all_features).detach()
    offsets = [0, *itertools.accumulate(len(f) for f in all_features)]
    row = 0
    for c in range(num_present):
        if len(hard_features[c]) == 0:
            continue  # skipped, but still counted in num_present
        others = [j for j in range(num_present) if j != c]
        with torch.no_grad():
            similarity = [F.cosine_similarity(prototypes[c], prototypes[j], dim=0) / temperature for j in others]
            cumulative = list(itertools.accumulate(torch.stack(similarity).softmax(dim=0).tolist()))
        query_rows, key_rows = [], []
        for q in range(num_queries):
            if fixed is None:
                query_rows.append(rng.randrange(len(hard_features[c])))
            else:
                query_rows.append(fixed[0][row][q])
            for k in range(num_negatives):
                if fixed is None:
                    draw = bisect.bisect_right(cumulative, rng.random() * cumulative[-1])
                    j = others[min(draw, len(others) - 1)]
                    position = rng.randrange(len(all_features[j]))
                else:
                    j, position = fixed[1][row][q][k], fixed[2][row][q][k]
                key_rows.append(offsets[j] + position)
        queries = hard_features[c][query_rows]  # (Q, D), with gradient
        with torch.no_grad():
            keys = pool[key_rows].view(num_queries, num_negatives, -1)
            positive = prototypes[c].expand(num_queries, 1, -1)
            candidates = torch.cat([positive, keys], dim=1)  # (Q, 1 + K, D)
        logits = F.cosine_similarity(queries[:, None, :], candidates, dim=2) / temperature
        target = torch.zeros(num_queries, dtype=torch.long, device=rep.device)
        loss = loss + F.cross_entropy(logits, target)
        row += 1
    return loss / num_present
