"""Resuming is exact: a fit stopped after a checkpoint and resumed from it ends where the uninterrupted fit ends."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from src.train import main
from tests.conftest import smoke_args


def fit(out: Path, *extra: str) -> tuple[dict[str, torch.Tensor], float]:
    """Final weights and last validation mIoU of a smoke ClassMix fit (6 steps, validating every 2)."""
    main(["fit", *smoke_args("classmix", out, "--trainer.max_steps", "6", *extra)])
    weights = torch.load(out / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert weights["global_step"] == 6
    return weights["state_dict"], json.loads((out / "run" / "metrics.json").read_text())["val_miou_last"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_fit_ends_where_the_uninterrupted_fit_ends(tmp_path, num_workers):
    workers = ("--data.num_workers", str(num_workers))
    snapshot = tmp_path / "step2.ckpt"
    weights, miou = fit(
        tmp_path / "whole", *workers,
        "--trainer.callbacks+=tests.resume_probe.SnapshotCheckpoint",
        "--trainer.callbacks.step=2", f"--trainer.callbacks.copy_to={snapshot}",
    )
    assert torch.load(snapshot, map_location="cpu", weights_only=False)["global_step"] == 2
    # A new process would start from other random states (the CLI seeds them again in any case).
    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    resumed_weights, resumed_miou = fit(tmp_path / "resumed", *workers, "--ckpt_path", str(snapshot))
    assert resumed_miou == pytest.approx(miou, abs=1e-6)
    assert resumed_weights.keys() == weights.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
