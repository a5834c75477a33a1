"""CPS: cross pseudo supervision (Chen et al., CVPR 2021, arXiv:2106.01226), as in charlesCXK/TorchSemiSeg.

Two networks of one architecture, initialised differently, learn the labeled images and each
other's hard pseudo-labels (argmax, no threshold) with cross-entropy: ``L = L_sup + cps_weight *
L_cps`` (CPS/train.py:194, 220). The CutMix variant labels unmixed images and learns them on mixed ones.
References: ``CPS/`` is exp.voc/voc8.res50v3+.CPS/, ``CutMix/`` is exp.voc/voc8.res50v3+.CPS+CutMix/.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from src.pl_modules.base import SemiSupervisedModule, check_non_negative
from src.pl_modules.ops import cutmix_boxes, mix_by_mask, weak_view
from src.pl_modules.timing import StepFloor

# CutMix/config.py:75-76: three boxes covering U(0.25, 0.5) of the image between them.
CUTMIX_BOXES = 3
CUTMIX_AREA = (0.25, 0.5)


class CPS(SemiSupervisedModule):
    """Cross pseudo supervision: ``student`` and ``student_b`` label each other's images.

    - Networks: ``student_b`` is built from the same options as ``student`` by the next draws of
      the run's seeded stream; a pretrained encoder (``encoder_weights``, ``init_from``) starts both
      alike and only the rest differs, as the reference's two branches (CPS/network.py:15-16, 31;
      CPS/train.py:84-89).
    - Plain: labeled and unlabeled images go through each network in two forwards (CPS/train.py:179-182);
      each learns the other's detached argmax on both (CPS/train.py:185-194); the supervised CE is
      summed over the networks (CPS/train.py:197-203, 220).
    - ``cutmix``: each network labels the unmixed images in train mode without gradient, the labels
      are mixed like the images (CutMix/train.py:206-229), and each network learns the other's on
      the mixed images (CutMix/train.py:232-239); the labeled images only get the supervised CE.
    - Evaluation (``val/miou``, test): ``student``, the reference's branch1 (CPS/network.py:19-21).
    - NOTE: one optimizer, the suite's injected one, over both networks: SGD and AdamW act per
      parameter, so one equals the reference's two alike SGDs (CPS/train.py:97-119), whose own
      settings the suite does not copy (lr 0.0025 x 4 GPUs for a total batch of 8, CPS/script.sh:9-10,
      train.py:92-94; momentum 0.9, weight decay 1e-4 off BN and biases, CPS/config.py:99-100,
      furnace/utils/init_func.py:44), nor its network (DeepLabV3+ on ResNet-50, CPS/network.py:31-45).
    - NOTE: per-device BatchNorm; the reference uses SyncBatchNorm over its GPUs (CPS/train.py:77-78).
    - NOTE: unlabeled crops get the batch-level rescale-crop and flip of ``scale_range``
      (`ops.weak_view`) for the reference's per-image ones (CPS/dataloader.py:42-57); padding is ignored.
    - NOTE: a mixed image's partner is its batch neighbour (i + 1) mod B, not a sample of a second
      unlabeled loader (CutMix/train.py:83-86); its three boxes (`ops.cutmix_boxes`, toggled) draw
      the aspect uniformly in [0.3, 3.3], the reference's log-uniformly (CutMix/mask_gen.py:49-92).

    Args:
        cps_weight: lambda, the weight of ``L_cps`` (CPS/config.py:74; the CutMix config uses 1.0,
            CutMix/config.py:73).
        cutmix: Learn the pseudo-labels on CutMixed unlabeled images (CPS+CutMix).
        **kwargs: Shared options of `SemiSupervisedModule`.
    """

    name = "cps"
    uses_unlabeled = True
    # Labeled, then unlabeled (or mixed) images through each network; CutMix adds two labelling forwards.
    step_floor = StepFloor(passes=(1, 1, 1, 1))

    def __init__(self, cps_weight: float = 1.5, cutmix: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_non_negative(cps_weight=cps_weight)
        self.student_b = self.build_network()
        if self.hparams.compile:
            self.student_b.compile_parts()
        if cutmix:
            self.step_floor = StepFloor(passes=(1, 1, 1, 1), eval_forwards=2)

    @torch.no_grad()
    def pseudo_labels(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``student_b``'s argmax, which ``student`` learns; every pixel counts (no threshold).

        NOTE: training labels in train mode (batch statistics, CPS/train.py:140); eval mode here
        scores ``student_b`` itself, independent of the batch it is measured on.
        """
        with self.phase("teacher"):
            labels = self.forward_in_mode(self.student_b, images, train=False).argmax(dim=1)
        return labels, torch.ones_like(labels, dtype=torch.bool)

    def hard_labels(self, logits: Tensor, given: Tensor, valid: Tensor) -> Tensor:
        """Argmax (B, H, W) of ``logits``; given labels (partial mode) replace it, padding is ignored."""
        labels = torch.where(given != self.ignore_index, given, logits.detach().argmax(dim=1))
        return torch.where(valid, labels, self.ignore_index)

    @torch.no_grad()
    def cutmix_targets(self, images_u: Tensor, given: Tensor, valid: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The mixed images and each network's labels of them (mixed like the images)."""
        with self.phase("teacher"):
            labels = [self.hard_labels(self.forward_in_mode(network, images_u, train=True), given, valid)
                      for network in (self.student, self.student_b)]
        with self.phase("mix+aug"):
            batch, _, height, width = images_u.shape
            area = (CUTMIX_AREA[0] / CUTMIX_BOXES, CUTMIX_AREA[1] / CUTMIX_BOXES)
            boxes = functools.reduce(torch.logical_xor, (
                cutmix_boxes(batch, height, width, device=images_u.device, p=1.0, area_range=area)
                for _ in range(CUTMIX_BOXES)))  # (B, H, W): True where the partner is pasted
            mixed = [mix_by_mask(boxes, torch.roll(x, -1, dims=0), x) for x in (images_u, *labels)]
        return mixed[0], mixed[1:]

    def compute_losses(self, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        images_l, masks_l = batch["labeled"]["image"], batch["labeled"]["mask"]
        unlabeled = batch["unlabeled"]
        images_u = unlabeled["image"]
        with self.phase("mix+aug"):
            given = self.given_labels(unlabeled)
            images_u, given, valid = weak_view(images_u, given, self.scale_range)
        networks = (self.student, self.student_b)
        if self.hparams.cutmix:
            images_u, labels = self.cutmix_targets(images_u, given, valid)
            logits_l = [network(images_l) for network in networks]
            logits_cps = [network(images_u) for network in networks]
        else:
            logits_l, logits_u = zip(*((network(images_l), network(images_u)) for network in networks))
            logits_cps = [torch.cat(pair) for pair in zip(logits_l, logits_u)]  # [labeled; unlabeled]
            labels = [torch.cat([a.detach().argmax(dim=1), self.hard_labels(u, given, valid)])
                      for a, u in zip(logits_l, logits_u)]
        loss_sup = sum(self.supervised_loss(logits, masks_l) for logits in logits_l)
        # Each network learns the OTHER's labels (CPS/train.py:191, CutMix/train.py:236).
        loss_cps_a = self.supervised_loss(logits_cps[0], labels[1])
        loss_cps_b = self.supervised_loss(logits_cps[1], labels[0])
        loss_unsup = loss_cps_a + loss_cps_b
        # Logged: how often the two labellings agree (near 1, the networks have collapsed into one).
        known = labels[1] != self.ignore_index
        agreement = ((labels[0] == labels[1]) & known).sum() / known.sum().clamp(min=1)
        n = len(images_u)
        self.remember_unlabeled(images_u, labels[1][-n:], logits_cps[0][-n:])
        return {
            "loss": loss_sup + self.hparams.cps_weight * loss_unsup,
            "loss_sup": loss_sup.detach(),
            "loss_unsup": loss_unsup.detach(),
            "loss_cps_a": loss_cps_a.detach(),
            "loss_cps_b": loss_cps_b.detach(),
            "agreement": agreement,
        }
