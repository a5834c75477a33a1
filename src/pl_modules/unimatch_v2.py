"""UniMatch V2 (Yang et al., TPAMI 2025, arXiv:2410.10777), as in LiheYoung/UniMatch-V2.

FixMatch's weak-to-strong consistency (`src.pl_modules.fixmatch`) with an EMA teacher labelling the
weak view, and two strong views whose encoder features get Complementary Dropout: complementary
channel masks, so that each view keeps what the other drops. ``L = (L_x + (L_s1 + L_s2) / 2) / 2``
(unimatch_v2.py:192-204), each strong term UniMatch's thresholded CE (`ops.thresholded_ce`).

Where each choice comes from (files of LiheYoung/UniMatch-V2):
- Teacher: a copy of the student in eval mode, without gradient (unimatch_v2.py:88-91), labels the
  weak view (170-173); after each step its parameters and buffers move by EMA with decay
  ``min(1 - 1/(t+1), 0.996)`` (221-226): ``ema_decay`` 0.996, ``teacher_bn`` eval.
- Strong views: each gets colour jitter (0.5, 0.5, 0.5, 0.25) p 0.8, grayscale p 0.2, blur p 0.5 and a
  CutMix box p 0.5 (dataset/semi.py:54-64), pasted from another image of the batch together with
  that image's teacher labels (unimatch_v2.py:175-190): FixMatch's views with ``mix_source="batch"``.
- Complementary Dropout (model/semseg/dpt.py:148-161) in the one forward of [s1; s2]
  (unimatch_v2.py:179): per image, s1's encoder maps take a channel mask ``2 * Bernoulli(0.5)`` and
  s2's its complement; half the images keep both views clean (`complementary_dropout_scales`).
- Confidence threshold 0.95 (configs/pascal.yaml:16); an unlabeled term divides by all valid
  pixels (unimatch_v2.py:194-200). The labeled images go through the student alone (178).
- Optimizer: AdamW (0.9, 0.999), weight decay 0.01, lr 5e-6 for the encoder and 40 times that for
  the rest (unimatch_v2.py:67-73, configs/pascal.yaml:10-11), poly 0.9 per step (216-219):
  ``head_lr_multiplier``, with the optimizer in the YAMLs (configs/data/pascal_voc_unimatch_v2.yaml).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from src.pl_modules.base import check_fractions, check_non_negative
from src.pl_modules.fixmatch import FixMatch
from src.pl_modules.ops import ema_decay, ema_update, ema_update_buffers
from src.pl_modules.timing import StepFloor


def complementary_dropout_scales(
    num_pairs: int, channels: int, drop_pair_fraction: float, device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Channel factors (2 * num_pairs, channels) for two views [a; b] of ``num_pairs`` images (dpt.py:148-161).

    Row i (view a of image i) is ``2 * Bernoulli(0.5)`` per channel, row ``num_pairs + i`` (view b)
    its complement ``2 - row i``: each view keeps, doubled, the channels the other drops.
    ``int(num_pairs * (1 - drop_pair_fraction))`` random images keep every channel in both views.
    """
    first = torch.randint(0, 2, (num_pairs, channels), device=device, generator=generator).float() * 2
    clean = torch.randperm(num_pairs, device=device, generator=generator)[: int(num_pairs * (1 - drop_pair_fraction))]
    first[clean] = 1.0
    return torch.cat([first, 2.0 - first])


class UniMatchV2(FixMatch):
    """UniMatch V2: an EMA teacher's confident labels taught to two strong views under Complementary Dropout.

    The student learns the labeled images, and the teacher's weak-view labels on both CutMixed strong
    views, decoded from encoder maps under complementary channel masks (`Segmenter.forward_channel_scaled`).

    NOTE: departures from the reference:
    - The CutMix partner of image i is i + 1 mod B (``mix_source="batch"``); the reference flips the
      batch (B - 1 - i). ``mix_source="view"`` pastes a second view of the same image instead.
    - Integer buffers (BatchNorm's batch counters) are copied from the student; the reference
      averages them as floats too.
    - smp's DPT is not the reference's head: it has BatchNorm (the reference's none, dpt.py:119) and
      reads the token maps without the ViT's final LayerNorm (model/backbone/dinov2.py:309-310);
      inputs are padded to 28-pixel multiples (`src.networks.segmenter`).
    - The weak view's rescale is FixMatch's batch-level one.

    Args:
        drop_pair_fraction: Share of the images whose two strong views get Complementary Dropout
            (the reference's ``dropout_prob``); the others' pass clean. 0 turns it off.
        head_lr_multiplier: Learning rate of every trained parameter outside the student's encoder
            (decoder, head) as a multiple of the optimizer's, which the encoder keeps (``lr_multi``).
        ema_decay: As in `SemiSupervisedModule`, the reference's 0.996.
        teacher_bn: As in `SemiSupervisedModule`, the reference's ``eval``.
        mix_source: As in `FixMatch`, ``batch`` (see above).
        **kwargs: Options of `FixMatch` (``confidence_threshold``, ``cutmix_p``) and `SemiSupervisedModule`.
    """

    name = "unimatch_v2"
    uses_teacher = True
    num_strong_views = 2
    # The labeled images, then both strong views; the teacher's labels of the weak view.
    step_floor = StepFloor(passes=(1, 2), eval_forwards=1)

    def __init__(
        self,
        drop_pair_fraction: float = 0.5,
        head_lr_multiplier: float = 40.0,
        ema_decay: float = 0.996,
        teacher_bn: str = "eval",
        mix_source: str = "batch",
        **kwargs: Any,
    ) -> None:
        super().__init__(ema_decay=ema_decay, teacher_bn=teacher_bn, mix_source=mix_source, **kwargs)
        check_fractions(drop_pair_fraction=drop_pair_fraction)
        check_non_negative(head_lr_multiplier=head_lr_multiplier)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The student encoder's parameters at the optimizer's lr, the rest at ``head_lr_multiplier`` times it."""
        encoder = {id(p) for p in self.student.encoder_parameters()}
        parameters, multiplier = self.trainable_parameters(), self.hparams.head_lr_multiplier
        return [
            {"params": [p for p in parameters if id(p) in encoder], "lr_multiplier": 1.0},
            {"params": [p for p in parameters if id(p) not in encoder], "lr_multiplier": multiplier},
        ]

    @torch.no_grad()
    def update_teacher(self, step: int) -> None:
        """EMA of the parameters and of the floating-point buffers (BatchNorm statistics), decay `ema_decay` (step)."""
        decay = ema_decay(step, self.hparams.ema_decay)
        ema_update(self.teacher, self.student, decay)
        ema_update_buffers(self.teacher, self.student, decay)

    def forward_labeled_and_weak(self, images_l: Tensor, images_w: Tensor) -> tuple[Tensor, Tensor, None]:
        """The student's labeled logits and the teacher's weak-view logits (``teacher_bn`` mode, no gradient)."""
        with self.phase("teacher"):
            self.set_teacher_mode()
            logits_w = self.forward_in_mode(self.teacher, images_w, self.hparams.teacher_bn == "train")
        return self.student(images_l), logits_w, None

    def forward_strong(self, images_s: Tensor) -> Tensor:
        """[s1; s2] through the student, each image's two views under complementary channel masks."""
        scales = complementary_dropout_scales(
            len(images_s) // 2, self.student.encoder_width, self.hparams.drop_pair_fraction, images_s.device
        )
        return self.student.forward_channel_scaled(images_s, scales)

    @torch.no_grad()
    def predict_eval_mode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Confidences and pseudo-labels (B, H, W) of the teacher (`teacher_predict`), the labeller: of the
        pasted boxes' source with ``mix_source="view"`` and of the ``diag/`` scores (`pseudo_labels`)."""
        return self.teacher_predict(images)[1:]
