"""The floor of a method's training step (`src.pl_modules.timing.StepFloor`) as a model to time.

``benchmarks/bench_step.py`` times a method's step against its floor: the supervised step on the
method's images with gradient, in its passes, with its eval forwards. `FloorStep` runs it; the
benchmark builds it through the CLI, from the supervised method's YAML, with
``--model.class_path benchmarks.floor.FloorStep --model.init_args.floor <key>``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from src.losses.c3 import C3Contrast
from src.losses.reco import REPRESENTATION_STRIDE, pool_to_stride
from src.networks import projection_head
from src.pl_modules.supervised import Supervised
from src.pl_modules.timing import StepFloor

# The stride of the decoder features each variant's head reads: ReCo's, and C3-SemiSeg's default.
HEAD_STRIDES = {
    "head": REPRESENTATION_STRIDE,
    "c3head": C3Contrast().embedding_stride,
}


class FloorStep(Supervised):
    """The supervised step in a `StepFloor`'s passes: its eval forwards of one batch, then its passes.

    The labeled batch holds the floor's images (``sum(passes)`` batches); a head's output enters the
    loss times zero, so the head runs forward and backward without a loss of its own.

    Args:
        floor: The floor's `StepFloor.key`, e.g. ``"1,1:1+head"``.
        **kwargs: Options of `Supervised` and the base (``reco_weight`` follows the floor).
    """

    name = "floor"

    def __init__(self, floor: str = "1", **kwargs: Any) -> None:
        self.floor = StepFloor.from_key(floor)
        kwargs["reco_weight"] = 1.0 if self.floor.variant == "head" else 0.0  # builds ReCo's head
        super().__init__(**kwargs)
        if self.floor.variant == "c3head":  # before fit, so that the optimizer updates it too
            self.rep_head = projection_head(self.student.feature_channels, self.hparams.representation_dim)

    def compute_losses(self, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        images, masks = batch["labeled"]["image"], batch["labeled"]["mask"]
        passes, variant = self.floor.passes, self.floor.variant
        unit = len(images) // sum(passes)  # the method's batch
        for _ in range(self.floor.eval_forwards):  # as a teacher: eval mode (running statistics), no gradient
            self.forward_in_mode(self.student, images[:unit], train=False)
        split = [size * unit for size in passes[:-1]] + [len(images) - unit * sum(passes[:-1])]
        loss = images.new_zeros(())
        for i, (x, y) in enumerate(zip(images.split(split), masks.split(split))):
            if variant == "fp" and i == 0:
                clean, perturbed = self.student.forward_perturbed(x)
                loss = loss + self.supervised_loss(clean, y) + self.supervised_loss(perturbed, y)
            elif variant in HEAD_STRIDES:
                logits, features = self.student.forward_features(x)
                embeddings = self.rep_head(pool_to_stride(features, HEAD_STRIDES[variant], x.shape[-1]))
                loss = loss + self.supervised_loss(logits, y) + embeddings.float().mean() * 0.0  # the head's backward
            else:
                loss = loss + self.supervised_loss(self.student(x), y)
        return {"loss": loss, "loss_sup": loss.detach()}
