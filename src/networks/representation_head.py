"""ReCo's representation head (METHODS.md section 2), on the decoder features of any smp model."""

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
