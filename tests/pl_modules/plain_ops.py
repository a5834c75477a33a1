"""Plain versions of the vectorised step operations: per-image / per-anchor loops and boolean
indexing, written from METHODS.md and obviously correct, slow. `use_plain_ops` swaps them in, so
a method's step can be computed both ways on the same seed (the speed-ups must change no result).
"""

from __future__ import annotations

import functools
from collections import Counter

import torch
import torch.nn.functional as F
from torch import Tensor

import src.losses.c3 as c3_losses
import src.losses.reco as reco_losses
import src.pl_modules.mean_teacher as mean_teacher
import src.pl_modules.ops as ops
import src.pl_modules.reco as reco
from src.pl_modules.base import SemiSupervisedModule


def supervised_loss(self: SemiSupervisedModule, logits: Tensor, masks: Tensor) -> Tensor:
    """The mean cross-entropy over labeled pixels (torch's own reduction)."""
    if not (masks != self.ignore_index).any():
        return logits.sum().float() * 0.0
    return F.cross_entropy(logits.float(), masks, ignore_index=self.ignore_index)


def confidence_weighted_ce(
    logits: Tensor, pseudo_labels: Tensor, confidences: Tensor, threshold: float = 0.97, ignore_index: int = 255
) -> tuple[Tensor, Tensor]:
    """METHODS.md 3 step 5, image by image: the pixels with a positive loss, weighted by their image's eta."""
    weighted = []
    for b in range(logits.shape[0]):
        valid = pseudo_labels[b] != ignore_index
        eta = (confidences[b] >= threshold).sum() / max(int(valid.sum()), 1)
        pixel_loss = F.cross_entropy(logits[b : b + 1].float(), pseudo_labels[b : b + 1].long(),
                                     ignore_index=ignore_index, reduction="none")[0]
        weighted.append(pixel_loss[pixel_loss > 0] * eta)
    flat = torch.cat(weighted)
    loss = flat.mean() if flat.numel() else logits.sum().float() * 0.0
    valid = pseudo_labels != ignore_index
    confident = ((confidences >= threshold) & valid).sum()
    return loss, (confident / max(int(valid.sum()), 1)).float()


def classmix_masks(pseudo_labels: Tensor, generator: torch.Generator | None = None, ignore_index: int = 255) -> Tensor:
    """Per image: the values present, ranked by the same uniform keys, the first half chosen."""
    keys = ops._uniform((pseudo_labels.shape[0], 257), generator)  # the vectorised version's draws
    masks = []
    for b, labels in enumerate(pseudo_labels):
        slots = torch.where(labels == ignore_index, 256, labels.long())
        present = torch.unique(slots)
        ranked = present[keys[b, present].argsort()]
        chosen = ranked[: len(present) // 2]
        masks.append(torch.isin(slots, chosen))
    return torch.stack(masks)


def pixel_contrastive_loss(
    anchors: Tensor, keys: Tensor, classes: Tensor, temperature: float = 0.15,
    base_temperature: float = c3_losses.BASE_TEMPERATURE,
) -> Tensor:
    """METHODS.md 6 step 6, anchor by anchor."""
    num_views = anchors.shape[1]
    a = F.normalize(anchors.float().reshape(-1, anchors.shape[-1]), dim=1)
    k = F.normalize(keys.float().reshape(-1, keys.shape[-1]), dim=1)
    labels = classes.repeat_interleave(num_views).tolist()
    terms = []
    for i in range(len(labels)):
        z = a[i] @ k.T / temperature
        z = z - z.max().detach()
        positives = [j for j in range(len(labels)) if labels[j] == labels[i] and j != i]
        negatives = [j for j in range(len(labels)) if labels[j] != labels[i]]
        if not positives:
            continue
        negative_sum = z[negatives].exp().sum() if negatives else z.new_zeros(())
        terms.append(torch.stack([z[j] - torch.log(z[j].exp() + negative_sum) for j in positives]).mean())
    if not terms:
        return anchors.sum().float() * 0.0
    return -(temperature / base_temperature) * torch.stack(terms).mean()


def use_plain_ops(monkeypatch) -> Counter:
    """Swap every plain op in (for the test's duration); returns a counter of the calls made."""
    calls: Counter = Counter()

    def counted(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(SemiSupervisedModule, "supervised_loss", counted("supervised_loss", supervised_loss))
    plain_ce = counted("confidence_weighted_ce", confidence_weighted_ce)
    monkeypatch.setattr(mean_teacher, "confidence_weighted_ce", plain_ce)
    monkeypatch.setattr(reco, "confidence_weighted_ce", plain_ce)
    monkeypatch.setattr(ops, "classmix_masks", counted("classmix_masks", classmix_masks))
    monkeypatch.setattr(c3_losses, "pixel_contrastive_loss", counted("pixel_contrastive_loss", pixel_contrastive_loss))
    # ReCo: the gathered keys one class at a time (METHODS.md 5.1 steps 5-6) instead of the dense matmul.
    fast_reco = reco_losses.reco_loss
    plain_reco = functools.partial(fast_reco, dense=False, chunk_bytes=1)
    monkeypatch.setattr(reco_losses, "reco_loss", counted("reco_loss", plain_reco))
    return calls
