import torch

from src.datasets.views import pad_collate_with_valid


def test_pad_collate_with_valid_marks_the_padding():
    samples = [
        {"image": torch.ones(3, h, w, dtype=torch.uint8), "mask": torch.zeros(h, w, dtype=torch.long), "index": torch.tensor(i)}
        for i, (h, w) in enumerate([(4, 5), (2, 6)])
    ]
    batch = pad_collate_with_valid(samples)
    assert batch["image"].shape == (2, 3, 4, 6) and batch["valid"].dtype == torch.bool
    assert torch.equal(batch["valid"], batch["mask"] != 255)  # here every image pixel is labelled
    assert int(batch["valid"][0].sum()) == 20 and int(batch["valid"][1].sum()) == 12
