"""What a method tells step timings (``benchmarks/bench_step.py``) about itself.

A method times the phases of its training step from inside, ``with self.phase("teacher"):``
(`SemiSupervisedModule.phase`); the phases are recorded only while a recorder is attached
(`src.callbacks.PhaseTimer`), and cost nothing otherwise. It declares its floor, the least its
step must run on the network, as a `StepFloor` (``step_floor``), and the options that put it in
its steady state from the first step (``steady_state``). A benchmark reads these; it patches
nothing in the method.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

# The phases that benchmarks/bench_step.py shows as columns: ``teacher``, the no-gradient forwards
# that make pseudo-labels (and what updates a labelling rule with them); ``mix+aug``, building the
# unlabeled views (rescale, crops, mixing, augmentation); ``contrast``, a contrastive loss and its
# head. Time in a phase of another name counts as the rest of the step there.
TIMED_PHASES = ("teacher", "mix+aug", "contrast")
# What a floor's passes run beside the plain network (see `StepFloor`).
FLOOR_VARIANTS = ("", "head", "c3head", "fp")


class PhaseRecorder(Protocol):
    """Where `SemiSupervisedModule.phase` reports (e.g. `src.callbacks.PhaseTimer`)."""

    def timing(self, name: str) -> AbstractContextManager[None]:
        """A context that adds the wall time it encloses to phase ``name`` of the current step."""
        ...


@dataclass(frozen=True)
class StepFloor:
    """The least a method's training step runs on the network: the floor it is measured against.

    The floor's step is the supervised step on as many images with gradient as the method
    back-propagates (forward, backward, optimizer and data of those images), run through the
    network in the same passes (a method that keeps BatchNorm statistics per stream runs its
    labeled and its unlabeled images as two passes, which costs more than one pass of both), plus
    no-gradient eval-mode forwards of one batch (teacher or pseudo-labels), all in one step.
    Everything a method spends above it (mixing, augmentation, its losses, pseudo-labelling,
    bookkeeping) is its overhead.

    Args:
        passes: The forward passes with gradient, each in batches (a batch: the labeled batch size).
        eval_forwards: The no-gradient eval-mode forwards of one batch.
        variant: What the passes run beside the network, where the method must run it: ``""``
            nothing; ``"head"`` ReCo's representation head on every pass (forward and backward, no
            loss); ``"c3head"`` C3-SemiSeg's projection head on every pass (its teacher head's
            no-gradient forward of one batch is left out: two 1x1 convolutions at a quarter of the
            resolution); ``"fp"`` the first pass also decoded through UniMatch's feature-perturbed
            stream (the decoder on the clean and the channel-dropped features, both in the loss).
    """

    passes: tuple[int, ...] = (1,)
    eval_forwards: int = 0
    variant: str = ""

    def __post_init__(self) -> None:
        if not self.passes or min(self.passes) < 1 or self.eval_forwards < 0:
            raise ValueError(f"StepFloor needs passes >= 1 and eval_forwards >= 0, got {self}")
        if self.variant not in FLOOR_VARIANTS:
            raise ValueError(f"StepFloor.variant={self.variant!r}; expected one of {FLOOR_VARIANTS}")

    @property
    def key(self) -> str:
        """The floor as one word: passes, then ``:`` eval forwards and ``+`` variant where there are any.

        ``StepFloor((1, 1), 1, "head").key == "1,1:1+head"``; the supervised step's is ``"1"``.
        """
        evals = f":{self.eval_forwards}" if self.eval_forwards else ""
        return ",".join(map(str, self.passes)) + evals + (f"+{self.variant}" if self.variant else "")

    @classmethod
    def from_key(cls, key: str) -> StepFloor:
        """The floor a `key` names: ``"2,2:1+fp"`` -> ``StepFloor((2, 2), 1, "fp")``."""
        steps, _, variant = key.partition("+")
        passes, _, evals = steps.partition(":")
        return cls(tuple(int(p) for p in passes.split(",")), int(evals or 0), variant)
