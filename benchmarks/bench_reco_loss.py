"""Time and peak memory of the vectorised ReCo loss against the loop reference.

    python benchmarks/bench_reco_loss.py                       # CPU, Pascal-like defaults
    python benchmarks/bench_reco_loss.py --device cuda --repeats 20 --loop-repeats 2

One call = forward and backward of the loss alone, on fixed inputs: ``--labeled`` +
``--unlabeled`` images of ``--crop`` pixels with blob-shaped classes (labeled: ground truth with
ignore borders; unlabeled: pseudo-labels valid where a smooth teacher confidence reaches 0.7),
a ``--dim`` representation at stride 4 and the student's probabilities. Each implementation runs
in a fresh subprocess, which builds the inputs, records a memory baseline, runs one call for the
peak (CPU: ``ru_maxrss`` growth; CUDA: ``max_memory_allocated`` growth) and then times the calls
(median). The loop reference (`benchmarks/reco_loss_reference.py`) is slow: it is timed on
``--loop-repeats`` calls only, the first of which also gives its peak.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/bench_reco_loss.py` puts only benchmarks/ on the path
    sys.path.insert(0, str(REPO))

from benchmarks.reco_loss_reference import reco_loss_loop  # noqa: E402
from src.datasets.base import IGNORE_INDEX  # noqa: E402
from src.losses.reco import downsample_nearest, reco_loss  # noqa: E402

WEAK_THRESHOLD = 0.7


def blob_labels(n_img: int, size: int, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """(n_img, size, size) maps: background 0 with 2 to 4 elliptic objects of random classes."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    labels = torch.zeros(n_img, size, size, dtype=torch.long)
    for i in range(n_img):
        for _ in range(int(torch.randint(2, 5, (), generator=gen))):
            cy, cx = (torch.rand(2, generator=gen) * size).tolist()
            ry, rx = ((0.1 + 0.3 * torch.rand(2, generator=gen)) * size).tolist()
            inside = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1.0
            labels[i][inside] = int(torch.randint(1, num_classes, (), generator=gen))
    return labels


def smooth_noise(shape: Sequence[int], size: int, gen: torch.Generator) -> torch.Tensor:
    """Low-frequency noise in about [-1, 1] (bilinearly upsampled 8x8 grid)."""
    coarse = torch.rand(*shape[:-2], 8, 8, generator=gen) * 2 - 1
    flat = coarse.reshape(-1, 1, 8, 8)
    return F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False).reshape(*shape)


def make_inputs(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, ...]:
    """rep (leaf, requires grad), labels, valid, probs on the representation grid."""
    gen = torch.Generator().manual_seed(args.seed)
    crop, small, classes = args.crop, -(-args.crop // 4), args.num_classes
    labels = blob_labels(args.labeled + args.unlabeled, crop, classes, gen)
    # Labeled images: ignore a 2-pixel band on object borders, as VOC annotations do.
    edges = F.max_pool2d(labels[:, None].float(), 5, 1, 2) != -F.max_pool2d(-labels[:, None].float(), 5, 1, 2)
    labeled = labels[: args.labeled].masked_fill(edges[: args.labeled, 0], IGNORE_INDEX)
    valid_l = labeled != IGNORE_INDEX
    # Unlabeled images: a smooth teacher confidence, valid where it reaches the weak threshold.
    confidence = 0.75 + 0.3 * smooth_noise((args.unlabeled, crop, crop), crop, gen)
    valid_u = confidence >= WEAK_THRESHOLD
    labels = downsample_nearest(torch.cat([labeled, labels[args.labeled :]]), (small, small))
    valid = downsample_nearest(torch.cat([valid_l, valid_u]), (small, small)) & (labels != IGNORE_INDEX)
    n_img = labels.shape[0]
    # Student: own-class logit margin varies smoothly, so some regions are easy and others hard.
    margin = 6.0 + 4.0 * smooth_noise((n_img, small, small), small, gen)
    logits = torch.randn(n_img, classes, small, small, generator=gen)
    logits += margin[:, None] * F.one_hot(labels.clamp(max=classes - 1), classes).permute(0, 3, 1, 2)
    # Representations: a class-dependent direction plus noise, so the class graph is informative.
    centres = torch.randn(classes, args.dim, generator=gen)
    rep = centres[labels.clamp(max=classes - 1)].permute(0, 3, 1, 2) + 2 * torch.randn(
        n_img, args.dim, small, small, generator=gen
    )
    return (rep.to(device).requires_grad_(), labels.to(device), valid.to(device), logits.softmax(dim=1).to(device))


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Runs in its own process: peak memory of one call, then the median time of ``repeats`` calls."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    inputs = make_inputs(args, device)
    rep = inputs[0]
    options = dict(num_queries=args.num_queries, num_negatives=args.num_negatives)
    if args.measure == "vectorised":
        gen = torch.Generator(device).manual_seed(args.seed)
        options.update(generator=gen, chunk_bytes=args.chunk_mib * 2**20)
        loss_fn, repeats = reco_loss, args.repeats
    else:
        rng = random.Random(args.seed)
        options.update(rng=rng)
        loss_fn, repeats = reco_loss_loop, args.loop_repeats

    def call() -> float:
        rep.grad = None
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss_fn(*inputs, **options).backward()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = max_rss_bytes()
    first = call()
    peak = (torch.cuda.max_memory_allocated(device) if cuda else max_rss_bytes()) - baseline
    if args.measure == "vectorised":  # the first call was a warm-up
        times = [call() for _ in range(repeats)]
    else:  # too slow to waste one
        times = [first] + [call() for _ in range(repeats - 1)]
    n_img, _, height, width = rep.shape
    valid = inputs[2]
    return {
        "time_s": statistics.median(times),
        "calls": len(times),
        "peak_mib": peak / 2**20,
        "present_classes": len(set(inputs[1][valid].tolist())),
        "valid_pixels": int(valid.sum()),
        "pixels": n_img * height * width,
    }


def run_child(implementation: str, argv: Sequence[str]) -> dict[str, float]:
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--measure", implementation]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of the vectorised loss")
    parser.add_argument("--loop-repeats", type=int, default=1, help="timed calls of the loop reference")
    parser.add_argument("--labeled", type=int, default=8, help="labeled images in the batch")
    parser.add_argument("--unlabeled", type=int, default=8, help="unlabeled images in the batch")
    parser.add_argument("--crop", type=int, default=128, help="input crop side; representations at stride 4")
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--dim", type=int, default=256, help="representation dimension D")
    parser.add_argument("--num-queries", type=int, default=256)
    parser.add_argument("--num-negatives", type=int, default=512)
    parser.add_argument("--chunk-mib", type=int, default=256, help="chunk_bytes of the vectorised loss, in MiB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-loop", action="store_true", help="time the vectorised loss only")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--measure", choices=["vectorised", "loop"], help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure:  # child process
        print(json.dumps(measure(args)))
        return 0
    results = {"vectorised": run_child("vectorised", argv)}
    if not args.skip_loop:
        results["loop"] = run_child("loop", argv)
    info = results["vectorised"]
    print(
        f"ReCo loss, forward + backward on {args.device}: N={args.labeled}+{args.unlabeled}, "
        f"C={args.num_classes} ({info['present_classes']} present), D={args.dim}, "
        f"{args.crop}x{args.crop} -> {-(-args.crop // 4)}x{-(-args.crop // 4)}, "
        f"valid {info['valid_pixels']}/{info['pixels']} px, Q={args.num_queries}, K={args.num_negatives}, "
        f"chunk {args.chunk_mib} MiB, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"| {'implementation':<14} | {'calls':>5} | {'median s/call':>13} | {'peak MiB':>9} |")
    print(f"|{'-' * 16}|{'-' * 6}:|{'-' * 14}:|{'-' * 10}:|")
    for name, result in results.items():
        print(f"| {name:<14} | {result['calls']:>5} | {result['time_s']:>13.4f} | {result['peak_mib']:>9.1f} |")
    if "loop" in results:
        ratio = results["loop"]["time_s"] / results["vectorised"]["time_s"]
        print(f"ratio loop/vectorised = {ratio:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
