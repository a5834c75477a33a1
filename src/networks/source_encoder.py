"""The embedded benchmark's pretrained encoder: its offline stand-in for ImageNet weights.

The field fine-tunes a pretrained encoder for a short schedule; the embedded benchmark does the
same. Its upstream task is ``synthetic`` with ``variant: source`` (other shapes, other textures,
other images: no class and no image in common with the benchmark), trained fully supervised;
only the encoder is kept.

``encoder_weights: synthetic-source`` names that encoder. The first run that asks for it trains
it once with ``python -m src.pretrain``, in a subprocess (so that nothing of the caller's random
state or Lightning state is touched), and caches it as ``<cache>/encoders/synthetic-source-<key>.pt``;
later runs load the file. The key hashes everything the result depends on: the pretraining
config, the first source scenes the generator draws, and the network (arch, encoder, options).
``SEMISEG_CACHE`` moves the cache (default ``~/.cache/semiseg-bench``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from src.datasets.synthetic import SyntheticDataset

SOURCE_WEIGHTS = "synthetic-source"
REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "pretrain" / "synthetic_source.yaml"
# Scenes whose pixels stand for the generator in the key: a change to how source scenes are
# drawn changes them, an edit that draws the same scenes (a comment, a refactor) does not.
FINGERPRINT_SCENES = 4


def cache_root() -> Path:
    """The suite's cache folder: ``$SEMISEG_CACHE`` or ``~/.cache/semiseg-bench``."""
    return Path(os.environ.get("SEMISEG_CACHE") or Path.home() / ".cache" / "semiseg-bench")


def source_key(arch: str, encoder_name: str, model_options: dict[str, Any] | None) -> str:
    """16 hex digits that change with the pretraining config, the source scenes and the network."""
    digest = hashlib.sha256()
    digest.update(CONFIG.read_bytes())
    for split in ("train", "val"):
        scenes = SyntheticDataset(split=split, variant="source")
        for index in range(FINGERPRINT_SCENES):
            image, mask = scenes[index]
            digest.update(image.tobytes() + mask.tobytes())
    network = {"arch": arch.lower(), "encoder_name": encoder_name, "model_options": model_options or {}}
    digest.update(json.dumps(network, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def source_encoder_path(arch: str, encoder_name: str, model_options: dict[str, Any] | None) -> Path:
    """Where the source-pretrained encoder of this network is cached (whether or not it exists)."""
    key = source_key(arch, encoder_name, model_options)
    return cache_root() / "encoders" / f"{SOURCE_WEIGHTS}-{key}.pt"


def source_encoder(arch: str, encoder_name: str, model_options: dict[str, Any] | None) -> Path:
    """The cached source-pretrained encoder of this network, trained first if it is not cached.

    Concurrent callers (two benchmark runners, DDP ranks) wait on a file lock: one trains, the
    others then load its file.
    """
    path = source_encoder_path(arch, encoder_name, model_options)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            print(f"Pretraining the {encoder_name} encoder on the source scenes once (a few minutes on a CPU); "
                  f"it is cached as {path}", file=sys.stderr, flush=True)
            command = [sys.executable, "-m", "src.pretrain", "--arch", arch, "--encoder-name", encoder_name,
                       "--model-options", json.dumps(model_options or {}), "--out", str(path)]
            result = subprocess.run(command, cwd=REPO)
            if result.returncode != 0 or not path.is_file():
                raise RuntimeError(f"encoder_weights={SOURCE_WEIGHTS!r}: source pretraining failed "
                                   f"(exit code {result.returncode}); run it alone: {' '.join(command)}")
    return path
