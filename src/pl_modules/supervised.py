"""Supervised baseline (METHODS.md section 2): cross-entropy on the labeled images only.

With ``reco_weight > 0`` it becomes ReCo's "ReCo + Supervised" row: the ReCo loss on the
labeled pixels (METHODS.md section 2, ``--apply_reco``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from src.losses.reco import reco_from_features
from src.pl_modules.base import SemiSupervisedModule, check_non_negative
from src.pl_modules.timing import StepFloor


class Supervised(SemiSupervisedModule):
    """The labeled-only baseline every method is compared with.

    The protocol gives it twice the labeled batch of the semi-supervised methods so that
    both see the same number of images per step (``data.batch_size_labeled`` in its config).

    Args:
        reco_weight: Weight of the ReCo loss on labeled pixels (0 = plain supervised, no representation head).
        reco_options: Keyword arguments of `src.losses.reco.reco_loss` (``strong_threshold``,
            ``temperature``, ``num_queries``, ``num_negatives``).
        **kwargs: Shared options of `SemiSupervisedModule`.
    """

    name = "supervised"
    step_floor = StepFloor()  # its own step

    def __init__(self, reco_weight: float = 0.0, reco_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        check_non_negative(reco_weight=reco_weight)
        self.uses_representation = reco_weight > 0  # read by the base to build the representation head
        super().__init__(**kwargs)
        self.reco_options = dict(reco_options or {})

    def compute_losses(self, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        images_l, masks_l = batch["labeled"]["image"], batch["labeled"]["mask"]
        if not self.uses_representation:
            loss = self.supervised_loss(self.student(images_l), masks_l)
            return {"loss": loss, "loss_sup": loss.detach()}
        logits, features = self.student.forward_features(images_l)
        loss_sup = self.supervised_loss(logits, masks_l)
        with self.phase("contrast"):
            loss_reco = reco_from_features(
                self.rep_head, logits, features, masks_l, masks_l != self.ignore_index, **self.reco_options
            )
        loss = loss_sup + self.hparams.reco_weight * loss_reco
        return {"loss": loss, "loss_sup": loss_sup.detach(), "loss_reco": loss_reco.detach()}
