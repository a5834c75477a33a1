"""Loss functions as pure tensor functions (no Lightning)."""

from src.losses.reco import Sampler, downsample_nearest, reco_loss, uniform_sampler

__all__ = ["Sampler", "downsample_nearest", "reco_loss", "uniform_sampler"]
