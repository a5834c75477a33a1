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


@pytest.fixture
def weights_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty, offline caches for smp's and timm's weight loaders (HF_HOME, TORCH_HOME) under tmp_path.

    huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE once, at import: its constants are
    patched too. torch hub reads TORCH_HOME at each call.
    """
    from huggingface_hub import constants

    home = tmp_path / "cache"
    hf_home = home / "huggingface"
    env = {"HF_HOME": hf_home, "HF_HUB_CACHE": hf_home / "hub", "TORCH_HOME": home / "torch", "HF_HUB_OFFLINE": 1}
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


def random_state(module: torch.nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """``module``'s state dict with every float tensor replaced by seeded random values."""
    generator = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=generator) if v.is_floating_point() else v.clone()
        for k, v in module.state_dict().items()
    }


def assert_weights_loaded(module: torch.nn.Module, source: dict[str, torch.Tensor]) -> None:
    """Every tensor of ``module`` is the one of the same name in ``source``."""
    state = module.state_dict()
    assert state and set(state) <= set(source), set(state) - set(source)
    for name, tensor in state.items():
        assert torch.equal(tensor, source[name]), name


def smp_snapshot(cache: Path, encoder_name: str, weights: str) -> Path:
    """The folder smp's get_encoder reads ``weights`` from: the Hugging Face cache at smp's pinned revision."""
    import segmentation_models_pytorch as smp

    settings = smp.encoders.encoders[encoder_name]["pretrained_settings"][weights]
    repo = "models--" + settings["repo_id"].replace("/", "--")
    return cache / "huggingface" / "hub" / repo / "snapshots" / settings["revision"]


def cache_smp_weights(cache: Path, encoder_name: str, weights: str, state: dict[str, torch.Tensor]) -> None:
    """Put ``state`` (and the config.json smp also asks for) into ``smp_snapshot``."""
    from safetensors.torch import save_file

    folder = smp_snapshot(cache, encoder_name, weights)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    save_file(state, folder / "model.safetensors")
