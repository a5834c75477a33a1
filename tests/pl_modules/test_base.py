import math

import torch

from src.pl_modules.base import iou_from_confusion, sliding_window_logits
from src.pl_modules.visualize import palette, prediction_grid


def test_iou_from_confusion_hand_example():
    # rows = truth, cols = prediction
    confusion = torch.tensor([[3, 1, 0], [1, 1, 0], [0, 0, 0]])
    iou, accuracy = iou_from_confusion(confusion)
    assert math.isclose(iou[0].item(), 3 / 5)
    assert math.isclose(iou[1].item(), 1 / 3)
    assert math.isnan(iou[2].item())  # absent from truth and prediction: not counted in the mean
    assert math.isclose(accuracy.item(), 4 / 6)


class PixelNet(torch.nn.Module):
    """A per-pixel network: sliding-window scores must equal whole-image scores."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)


def test_sliding_window_equals_whole_for_pixelwise_net():
    net = PixelNet()
    images = torch.rand(2, 3, 50, 37)
    whole = net(images).softmax(dim=1)
    sliding = sliding_window_logits(net, images, window=16, num_classes=4)
    assert torch.allclose(whole, sliding, atol=1e-6)


def test_palette_and_grid():
    colours = palette(21)
    assert tuple(colours[1]) == (128, 0, 0) and tuple(colours[255]) == (255, 255, 255)
    images = torch.rand(2, 3, 8, 10)
    masks = torch.zeros(2, 8, 10, dtype=torch.long)
    grid = prediction_grid([(images, masks, masks), (images[:1], masks[:1], masks[:1])], num_classes=3)
    assert grid.shape == (3, 8 * 3, 10 * 3)
