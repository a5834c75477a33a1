"""Heads that embed the decoder features of any smp model, one vector per location.

ReCo's representation head (METHODS.md section 2) and C3-SemiSeg's projection head (section 6).
"""

from __future__ import annotations

from torch import Tensor, nn


class RepresentationHead(nn.Module):
    """3x3 conv (no bias) + BN + ReLU + 1x1 conv to ``output_dim``: one pixel embedding per location.

    Same shape as ReCo's classifier head with separate weights; its output is not normalised
    (the ReCo loss takes cosine similarities). Used only for training losses, not at inference.

    Args:
        in_channels: Channels of the decoder features.
        output_dim: Embedding dimension D.
        hidden_channels: Width of the 3x3 conv.
    """

    def __init__(self, in_channels: int, output_dim: int = 256, hidden_channels: int = 256) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, output_dim, 1),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)


def projection_head(in_channels: int, dim: int) -> nn.Sequential:
    """C3's ``mlp`` head: 1x1 conv (bias) + ReLU + 1x1 conv (bias), weights ~ N(0, 0.01)."""
    head = nn.Sequential(nn.Conv2d(in_channels, dim, 1), nn.ReLU(inplace=True), nn.Conv2d(dim, dim, 1))
    for layer in (head[0], head[2]):
        nn.init.normal_(layer.weight, 0.0, 0.01)
    return head
