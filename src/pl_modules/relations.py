"""ReCo's class-relation view, the cosine similarity of class prototypes: for TensorBoard and `src.visualize`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.losses.reco import EPS, REPRESENTATION_STRIDE, downsample_nearest, pool_to_stride

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from src.networks import Segmenter


@torch.no_grad()
def prototype_sums(
    student: Segmenter, rep_head: nn.Module, images: Tensor, masks: Tensor, num_classes: int, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """Per-class sums (C, D) of the representation over a batch's labelled pixels, and their counts (C,).

    Summed over a whole set and divided by the counts, these are ReCo's class prototypes, the mean
    representation of each class's valid pixels (lorenmt/reco module_list.py:89), here by the ground
    truth. The representation is the one the ReCo loss sees (`src.losses.reco.reco_from_features`):
    the head on the student's decoder features, pooled to the stride-4 grid, with the masks taken to
    that grid by nearest sampling (`Segmenter.forward_features` keeps the cells over the image, not
    those over its padding).

    Args:
        student: The network whose decoder features the head embeds (in the mode the caller chose).
        rep_head: The representation head.
        images: (B, 3, H, W) float images in [0, 1].
        masks: (B, H, W) long ground truth; ``ignore_index`` (and any value outside [0, C)) is left out.
        num_classes: C.
        ignore_index: The label of unlabelled pixels.

    Returns:
        float64 sums (C, D) and long counts (C,), on the images' device.
    """
    _, features = student.forward_features(images)
    rep = rep_head(pool_to_stride(features, REPRESENTATION_STRIDE, images.shape[-1]))
    labels = downsample_nearest(masks, rep.shape[-2:]).reshape(-1)  # (B, h, w) -> (B*h*w,)
    rep = rep.double().permute(0, 2, 3, 1).reshape(-1, rep.shape[1])  # (B, D, h, w) -> (B*h*w, D)
    keep = (labels >= 0) & (labels < num_classes)
    sums = rep.new_zeros(num_classes, rep.shape[1]).index_add_(0, labels[keep], rep[keep])
    return sums, torch.bincount(labels[keep], minlength=num_classes)


def prototype_similarity(sums: Tensor, counts: Tensor) -> Tensor:
    """Cosine similarity (C, C) of the class prototypes ``sums / counts``; NaN rows and columns for absent classes.

    The cosine of ReCo's class-relation graph (lorenmt/reco module_list.py:118), before its softmax.
    """
    present = counts > 0
    prototypes = F.normalize(sums.double() / counts.clamp(min=1)[:, None], dim=1, eps=EPS)
    similarity = prototypes @ prototypes.T
    similarity[~present] = float("nan")
    similarity[:, ~present] = float("nan")
    return similarity


def relation_order(similarity: np.ndarray) -> tuple[list[int], np.ndarray | None]:
    """Leaf order and scipy linkage matrix of average-linkage clustering on the distance 1 - cosine.

    Args:
        similarity: (n, n) symmetric cosine similarities, no NaN.

    Returns:
        The order of the n classes in which every cluster is contiguous, and the linkage matrix
        (None, with the order unchanged, for fewer than two classes).
    """
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    count = similarity.shape[0]
    if count < 2:
        return list(range(count)), None
    distance = np.clip(1.0 - (similarity + similarity.T) / 2, 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    tree = linkage(squareform(distance, checks=False), method="average")
    return leaves_list(tree).tolist(), tree


def relation_figure(similarity: Tensor, class_names: list[str], title: str = "") -> Figure:
    """The class prototypes' cosine similarity as a heatmap in `relation_order`, under its dendrogram.

    Args:
        similarity: (C, C) from `prototype_similarity`; classes with NaN (no pixel) are left out
            and named under the heatmap.
        class_names: C names.
        title: Figure title.
    """
    from matplotlib.figure import Figure
    from scipy.cluster.hierarchy import dendrogram

    values = similarity.double().cpu().numpy()
    present = ~np.isnan(values.diagonal())
    names = [name for name, kept in zip(class_names, present) if kept]
    absent = [name for name, kept in zip(class_names, present) if not kept]
    values = values[present][:, present]
    order, tree = relation_order(values)
    count = len(order)
    side = 0.45 * max(count, 4)
    figure = Figure(figsize=(side + 2.6, side + 2.6), layout="constrained")
    grid = figure.add_gridspec(2, 2, height_ratios=(1, 4), width_ratios=(20, 1))
    heatmap_axes = figure.add_subplot(grid[1, 0])
    tree_axes = figure.add_subplot(grid[0, 0])
    if tree is not None:
        # scipy puts leaf k at x = 10k + 5: the range (0, 10n) lines the leaves up with the cells.
        dendrogram(tree, ax=tree_axes, no_labels=True, color_threshold=0, above_threshold_color="0.2")
        tree_axes.set_xlim(0, 10 * count)
        tree_axes.set_ylabel("1 - cos\n(average)", fontsize=8)
    tree_axes.set_xticks([])
    tree_axes.spines[["top", "right", "bottom"]].set_visible(False)
    tree_axes.tick_params(labelsize=7)
    ordered = values[np.ix_(order, order)]
    # The colours span the off-diagonal range: an early head relates every class at cosines near 1,
    # and a fixed [-1, 1] scale would paint them all alike. The colour bar gives the scale.
    lowest = float(ordered[~np.eye(count, dtype=bool)].min()) if count > 1 else 0.0
    image = heatmap_axes.imshow(
        ordered, cmap="viridis", vmin=min(lowest, 1.0 - 1e-3), vmax=1.0, aspect="auto",
        extent=(0, count, count, 0), interpolation="nearest",
    )
    labels = [names[i] for i in order]
    heatmap_axes.set_xticks(np.arange(count) + 0.5, labels, rotation=90, fontsize=8)
    heatmap_axes.set_yticks(np.arange(count) + 0.5, labels, fontsize=8)
    if count <= 12:
        digits = 2 if 1.0 - lowest > 0.2 else 3
        middle = (lowest + 1.0) / 2
        for row in range(count):
            for col in range(count):
                value = ordered[row, col]
                heatmap_axes.text(col + 0.5, row + 0.5, f"{value:.{digits}f}", ha="center", va="center",
                                  fontsize=7, color="black" if value > middle else "white")
    if absent:
        heatmap_axes.set_xlabel("no pixel in the set: " + ", ".join(absent), fontsize=8)
    colourbar = figure.colorbar(image, cax=figure.add_subplot(grid[1, 1]))
    colourbar.set_label("cosine similarity of class prototypes", fontsize=8)
    colourbar.ax.tick_params(labelsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure
