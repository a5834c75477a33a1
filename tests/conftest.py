"""Shared fixtures: tiny, CPU-only, offline."""

from __future__ import annotations

import os
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine, spinning threads of
# one process (or of a training subprocess) starve the others. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")
MSRC21 = REPO.parent / "shared" / "data" / "msrc21"

# Tests must not fight over the two cores with data-loader workers or oversubscribed BLAS.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def config(name: str) -> str:
    return str(REPO / "configs" / f"{name}.yaml")


def smoke_args(method: str, tmp_path: Path, *extra: str) -> list[str]:
    """CLI arguments for a tiny fit of ``method`` writing into ``tmp_path``."""
    return [
        "--config", config(method),
        "--config", SMOKE,
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.class_path", "pytorch_lightning.loggers.TensorBoardLogger",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.logger.init_args.name", "",
        "--trainer.logger.init_args.version", "run",
        *extra,
    ]


@pytest.fixture
def msrc21() -> Path:
    if not (MSRC21 / "classes.txt").is_file():
        pytest.skip(f"real dataset not present at {MSRC21}")
    return MSRC21
