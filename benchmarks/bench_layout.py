"""Channels-last against the plain memory format: each method's step compute, A/B in one process.

    python benchmarks/bench_layout.py                          # every method, CPU, the YAMLs' networks
    python benchmarks/bench_layout.py --methods reco,unimatch --steps 20 --threads 2

Each method is built twice from ``configs/<method>.yaml`` through the path of ``src.train`` (same
seed, so the same weights), once per format (``model.channels_last``, on by default). The two copies alternate,
step by step, on one fixed batch of ``--batch`` labeled and ``--batch`` unlabeled random images of
``--crop`` pixels: the method's losses (teacher, mixing, heads) and their backward. Alternating
makes both share every slow spell of a shared machine; the ratio is of the two medians. Data
loading and the optimizer update are left out: they do not depend on the format.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/bench_layout.py` puts only benchmarks/ on the path
    sys.path.insert(0, str(REPO))

from src.pl_modules import METHODS, get_method  # noqa: E402
from src.train import main as main_cli  # noqa: E402


def build(method: str, channels_last: bool) -> torch.nn.Module:
    """The method's module as `src.train` builds it from its YAML (the YAML's seed: same weights)."""
    with tempfile.TemporaryDirectory() as tmp:
        cli = main_cli(
            [  # run=False: no subcommand; the CLI only builds the model and the datamodule
                "--config", str(REPO / "configs" / f"{method}.yaml"),
                "--trainer.default_root_dir", tmp,
                "--trainer.logger", "false",
                "--model.init_args.channels_last", str(channels_last).lower(),
            ],
            run=False,
        )
    return cli.model


def make_batch(batch: int, crop: int, num_classes: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return {
        "labeled": {"image": torch.randint(0, 256, (batch, 3, crop, crop), generator=g, dtype=torch.uint8),
                    "mask": torch.randint(0, num_classes, (batch, crop, crop), generator=g)},
        "unlabeled": {"image": torch.randint(0, 256, (batch, 3, crop, crop), generator=g, dtype=torch.uint8)},
    }


def measure(method: str, args: argparse.Namespace) -> dict[str, float]:
    modules = {layout: build(method, layout == "channels_last") for layout in ("plain", "channels_last")}
    times: dict[str, list[float]] = {layout: [] for layout in modules}
    for i in range(args.warmup + args.steps):
        for layout, module in modules.items():
            batch = make_batch(args.batch, args.crop, module.num_classes)
            batch = module.on_after_batch_transfer(batch, 0)  # images to float, in the module's format
            torch.manual_seed(i)  # both copies draw the same augmentations
            start = time.perf_counter()
            module.compute_losses(batch)["loss"].backward()
            module.zero_grad(set_to_none=True)
            if i >= args.warmup:
                times[layout].append(time.perf_counter() - start)
    plain, last = (statistics.median(times[layout]) * 1000 for layout in ("plain", "channels_last"))
    return {"plain_ms": plain, "channels_last_ms": last, "ratio": last / plain}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="all", help="comma list of methods, or all")
    parser.add_argument("--batch", type=int, default=8, help="labeled (and unlabeled) images per step")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each format")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    args.method_list = list(METHODS) if args.methods == "all" else args.methods.split(",")
    for method in args.method_list:
        get_method(method)  # a bad name lists the valid ones
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    print(f"{args.batch}+{args.batch} images of {args.crop} px, {args.steps} steps after {args.warmup}, "
          f"{args.threads} threads; losses and backward, median ms")
    print("| method | plain ms | channels-last ms | ratio |\n|---|---:|---:|---:|")
    for method in args.method_list:
        r = measure(method, args)
        print(f"| {method} | {r['plain_ms']:.1f} | {r['channels_last_ms']:.1f} | {r['ratio']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
