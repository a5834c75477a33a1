"""Encoders pretrained on the source scenes: the embedded benchmark's offline stand-in for ImageNet.

Trains a network fully supervised on the source scenes (``configs/pretrain/synthetic_source.yaml``)
and keeps its encoder, as the file that ``encoder_weights: synthetic-source`` reads
(`src.networks.source_encoder`, which runs this module the first time a run asks for it). Build
it ahead of time with::

    python -m src.pretrain --encoder-name tu-resnet10t --arch Unet \\
        --model-options '{"decoder_channels": [128, 64, 32, 32, 16]}'
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from src.networks.source_encoder import CONFIG, source_encoder_path
from src.utils import atomic_write_bytes


def pretrain(arch: str, encoder_name: str, model_options: dict[str, Any], out: Path, extra: list[str]) -> None:
    """Train the network on the source scenes (``CONFIG``) and save its encoder to ``out`` atomically."""
    from src.train import main

    with tempfile.TemporaryDirectory(prefix="source-pretraining-") as run_dir:
        cli = main([
            # The datamodule is named here, not in CONFIG: CONFIG's bytes key the cached encoders.
            "fit", "--data.class_path", "SupervisedDataModule", "--config", str(CONFIG),
            "--model.init_args.arch", arch,
            "--model.init_args.encoder_name", encoder_name,
            "--model.init_args.model_options", json.dumps(model_options),
            "--trainer.default_root_dir", run_dir,
            *extra,
        ])
        # The last step's weights: a fixed schedule, no selection on any validation score.
        state = {k: v.detach().cpu().contiguous() for k, v in cli.model.student.model.encoder.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(out, buffer.getvalue())
    print(f"source-pretrained encoder: {out}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="Unet")
    parser.add_argument("--encoder-name", default="tu-resnet10t")
    parser.add_argument("--model-options", default='{"decoder_channels": [128, 64, 32, 32, 16]}', help="JSON")
    parser.add_argument("--out", default=None, help="default: the cache file that encoder_weights=synthetic-source reads")
    args, extra = parser.parse_known_args(argv)
    options = json.loads(args.model_options)
    out = Path(args.out) if args.out else source_encoder_path(args.arch, args.encoder_name, options)
    pretrain(args.arch, args.encoder_name, options, out, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
