"""Training-step cost of every method, relative to the supervised step measured in the same run.

    python benchmarks/bench_step.py                       # CPU, every method, the configs' model
    python benchmarks/bench_step.py --device cuda --precision bf16-mixed --crop 321 --batch 8

Each method runs in its own subprocess (clean peak-memory figures) through the same path as
``python -m src.train fit --config configs/<method>.yaml``: the same network, datamodule and
Lightning loop, with validation, checkpoints and logging switched off. Every method gets the
same batch: ``--batch`` labeled images, plus ``--batch`` unlabeled ones for the methods that use
them. The table gives, per method, the median step time over ``--steps`` timed steps (after
``--warmup``), its ratio to supervised, images per second, peak memory, and where the time goes:

- ``data``: waiting for the next batch (loader, collation, host-to-device copy),
- ``teacher``: the no-gradient forward that makes the pseudo-labels (the EMA teacher's; FixMatch's
  and UniMatch's eval-mode pass on the mixing view; C3's teacher with its projection head, and
  C3's update of the class thresholds),
- ``mix+aug``: building the unlabeled views: rescale, crops, mixing and strong augmentation,
- ``contrast``: ReCo's representation head and loss (forward, and the loss's own gradient, which
  it computes in the same pass), C3's contrastive loss (its student head is in ``rest``),
- ``rest``: the student's forward and backward, the other losses, the optimizer, EMA and
  Lightning's own work.

Parts are timed by wrapping the module's functions (with a device sync around each on GPU,
which adds a little to every part). Figures from one invocation are comparable with each
other; runs on shared machines are noisy, so compare ratios, not absolute times. ``--rounds R``
measures every method and floor R times, in turn (method after method, then again), and keeps
for each the round with the median step: a slow minute of a shared machine then shifts one
round of every method instead of all rounds of one method. ``--paired`` measures each method in
lockstep with its floor: two processes, each waiting for its turn before every step, so that the
method's steps and the floor's alternate (A, B, A, B...) and share every slow spell of the machine;
``x floor`` is the median over rounds of the ratio of their median steps. The process that waits
holds its memory but runs nothing (its data-loader workers may prefetch, as in any run).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PARTS = ("data", "teacher", "mix+aug", "contrast", "rest")
# The floor of a method's step: the supervised step on as many images with gradient as the method
# back-propagates (forward, backward, optimizer and data of those images), run through the network
# in the same passes (a method that keeps BatchNorm statistics per stream runs its labeled and its
# unlabeled images as two passes, which costs more than one pass of both), plus ``no_grad``
# eval-mode forwards of one batch (teacher or pseudo-labels), all in one step of one process (the
# floor's child runs them, see `measure`). Everything a method spends above it
# (mixing, augmentation, its losses, pseudo-labelling, bookkeeping) is overhead. ``FLOOR[method]``
# is (the passes, in batches; the eval forwards). Three floors also run what the method must run
# on the network: ReCo's with its representation head on every pass (forward and backward, no
# loss), as the issue defines its floor; C3-SemiSeg's with its projection head (its teacher head's
# no-grad forward on one batch is left out: two 1x1 convolutions at a quarter of the resolution);
# UniMatch's first pass ([labeled; weak]) also decoded through the feature-perturbed stream (the
# decoder on the clean and the channel-dropped features, both in the loss).
FLOOR = {
    "supervised": ((1,), 0),
    "recon": ((1,), 0),
    **dict.fromkeys(("mean_teacher", "cutout", "cutmix", "classmix", "reco"), ((1, 1), 1)),  # labeled; unlabeled
    "c3semiseg": ((2,), 1),  # one pass of labeled + strong unlabeled, cross-set mixed
    "fixmatch": ((2, 1), 1),  # [labeled; weak], then the strong view; the mixing view's labels
    "unimatch": ((2, 2), 1),  # [labeled; weak] (and perturbed), then both strong views; the mixing view's labels
}
# What else a floor's passes run, where not plainly (see above).
FLOOR_VARIANT = {"reco": "head", "c3semiseg": "c3head", "unimatch": "fp"}
# Options that put a method in its steady state from the first step (C3 starts with a supervised phase).
STEADY_STATE = {"c3semiseg": ["--model.init_args.unlabeled_start_step", "0"]}


def measure(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time ``args.steps`` training steps of ``method`` in this process."""
    import pytorch_lightning as pl
    import torch

    import src.pl_modules.c3semiseg as c3_module
    import src.pl_modules.mean_teacher as mean_teacher_module
    import src.pl_modules.ops as ops
    import src.pl_modules.reco as reco_module
    import src.pl_modules.supervised as supervised_module
    from torch import Tensor

    from src.losses.reco import REPRESENTATION_STRIDE, pool_to_stride
    from src.networks import projection_head
    from src.networks.segmenter import Segmenter
    from src.pl_modules.base import SemiSupervisedModule
    from src.pl_modules.c3semiseg import C3SemiSeg
    from src.pl_modules.fixmatch import FixMatch
    from src.train import main

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    spent: dict[str, float] = defaultdict(float)

    def timed(part: str, fn: Callable) -> Callable:
        def wrapper(*a: Any, **kw: Any) -> Any:
            sync()
            start = time.perf_counter()
            out = fn(*a, **kw)
            sync()
            spent[part] += time.perf_counter() - start
            return out

        return wrapper

    SemiSupervisedModule.teacher_predict = timed("teacher", SemiSupervisedModule.teacher_predict)
    FixMatch.predict_eval_mode = timed("teacher", FixMatch.predict_eval_mode)
    C3SemiSeg.teacher_outputs = timed("teacher", C3SemiSeg.teacher_outputs)
    C3SemiSeg.update_thresholds = timed("teacher", C3SemiSeg.update_thresholds)
    for name in ("random_rescale_crop", "mix_unlabeled", "strong_augment"):
        setattr(mean_teacher_module, name, timed("mix+aug", getattr(mean_teacher_module, name)))
    for name in ("weak_view", "colour_jitter"):
        setattr(c3_module, name, timed("mix+aug", getattr(c3_module, name)))
    if method == "c3semiseg":  # its cross-set CutMix; the mean-teacher family's boxes are timed in mix_unlabeled
        for name in ("box_masks", "swap_halves"):
            setattr(ops, name, timed("mix+aug", getattr(ops, name)))
    FixMatch.make_views = timed("mix+aug", FixMatch.make_views)
    C3SemiSeg.contrastive_term = timed("contrast", C3SemiSeg.contrastive_term)
    reco_module.reco_from_features = timed("contrast", reco_module.reco_from_features)
    supervised_module.reco_from_features = timed("contrast", supervised_module.reco_from_features)
    perturbed_calls = [0]
    forward_perturbed = Segmenter.forward_perturbed

    def counted_forward_perturbed(*a: Any, **kw: Any) -> Any:
        perturbed_calls[0] += 1
        return forward_perturbed(*a, **kw)

    Segmenter.forward_perturbed = counted_forward_perturbed
    grad_passes: list[int] = []  # the batch size of each forward with gradient in the current step
    eval_passes: list[int] = []  # ... and of each forward without gradient (teacher, pseudo-labels)
    prepare = Segmenter._prepare

    def counted_prepare(self: Any, images: Tensor) -> Any:
        (grad_passes if torch.is_grad_enabled() else eval_passes).append(len(images))
        return prepare(self, images)

    Segmenter._prepare = counted_prepare
    sizes, evals, variant = parse_floor_key(args.floor) if args.floor else ([], 0, "")
    if args.floor:  # a floor's step (see FLOOR): its eval forwards, then the batch in the method's passes, its variant
        stride = (REPRESENTATION_STRIDE if variant == "head"
                  else inspect.signature(C3SemiSeg).parameters["embedding_stride"].default)

        def floor_step(self: Any, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
            images, masks = batch["labeled"]["image"], batch["labeled"]["mask"]
            unit = len(images) // sum(sizes)  # the method's batch
            if evals:  # as a teacher: eval mode (BatchNorm's running statistics), no gradient
                self.student.eval()
                with torch.no_grad():
                    for _ in range(evals):
                        self.student(images[:unit])
                self.student.train()
            split = [size * unit for size in sizes[:-1]] + [len(images) - unit * sum(sizes[:-1])]
            loss = images.new_zeros(())
            for i, (x, y) in enumerate(zip(images.split(split), masks.split(split))):
                if variant == "fp" and i == 0:
                    clean, perturbed = self.student.forward_perturbed(x)
                    loss = loss + self.supervised_loss(clean, y) + self.supervised_loss(perturbed, y)
                elif variant in ("head", "c3head"):
                    logits, features = self.student.forward_features(x)
                    embeddings = self.rep_head(pool_to_stride(features, stride, x.shape[-1]))
                    loss = loss + self.supervised_loss(logits, y) + embeddings.float().mean() * 0.0  # the head's backward
                else:
                    loss = loss + self.supervised_loss(self.student(x), y)
            return {"loss": loss, "loss_sup": loss.detach()}

        supervised_module.Supervised.compute_losses = floor_step

    with tempfile.TemporaryDirectory() as tmp:
        cli = main(
            [
                # run=False: no subcommand; the CLI only builds the model and the datamodule.
                "--config", str(REPO / "configs" / f"{method}.yaml"),
                *(["--config", args.config] if args.config else []),
                "--data.crop_size", str(args.crop),
                "--data.batch_size_labeled", str(args.batch),
                "--data.batch_size_unlabeled", str(args.batch),
                "--data.num_workers", str(args.workers),
                "--data.num_labeled", str(args.labels),
                "--trainer.default_root_dir", tmp,
                "--trainer.logger", "false",
                *STEADY_STATE.get(method, []),
                *(["--model.init_args.reco_weight", "1"] if variant == "head" else []),  # builds its head
                "--model.init_args.channels_last", str(args.channels_last).lower(),
                *(["--model.init_args.compile", "true"] if args.compile else []),
            ],
            run=False,
        )
        model, datamodule = cli.model, cli.datamodule
        if variant == "c3head":  # registered before fit, so that the optimizer updates it too
            model.rep_head = projection_head(model.student.feature_channels, model.hparams.representation_dim)
        records: list[dict[str, float]] = []

        turns = [int(fd) for fd in args.turns.split(",")] if args.turns else None

        def take_turn() -> None:
            """--paired: wait until the parent lets this process run its next step (see `lockstep`)."""
            if turns is not None and not os.read(turns[0], 1):
                raise RuntimeError("bench_step: the parent closed the turn pipe")

        class StepTimer(pl.Callback):
            def on_train_start(self, trainer: Any, module: Any) -> None:
                take_turn()  # the first batch is fetched in this process's turn
                self.batch_end = time.perf_counter()

            def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
                sync()
                self.start = time.perf_counter()
                self.data = self.start - self.batch_end
                spent.clear()
                grad_passes.clear()
                eval_passes.clear()

            def on_train_batch_end(self, trainer: Any, module: Any, *rest: Any) -> None:
                sync()
                end = time.perf_counter()
                step = end - self.start
                parts = {part: spent.get(part, 0.0) for part in PARTS[1:-1]}
                parts["rest"] = step - sum(parts.values())
                # perf_counter is CLOCK_MONOTONIC on Linux: one clock for every process
                records.append({"step": step + self.data, "data": self.data, **parts,
                                "window": (self.start - self.data, end)})
                if turns is not None:
                    os.write(turns[1], b".")
                    take_turn()  # the next batch is fetched in the next turn; after the last step, the release
                self.batch_end = time.perf_counter()

        trainer = pl.Trainer(
            max_steps=args.warmup + args.steps,
            accelerator=args.device,
            devices=1,
            precision=args.precision,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[StepTimer()],
            default_root_dir=tmp,
        )
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.fit(model, datamodule=datamodule)

    timed_steps = records[args.warmup:]
    images = args.batch * (2 if model.uses_unlabeled else 1)
    step = statistics.median(r["step"] for r in timed_steps)
    return {
        "method": method,
        "step_s": step,
        "images_per_s": images / step,
        **{part: statistics.median(r[part] for r in timed_steps) for part in PARTS},
        "peak_memory_mib": (torch.cuda.max_memory_allocated() if cuda
                            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20,
        "memory_kind": "cuda allocated" if cuda else "process RSS",
        # whether a representation or projection head took part in the backward pass (ReCo, C3 and their floors)
        "head_trained": getattr(model, "rep_head", None) is not None
        and any(p.grad is not None for p in model.rep_head.parameters()),
        # decoder passes on feature-perturbed streams per step (UniMatch; the floor's "fp" step)
        "perturbed_per_step": perturbed_calls[0] / (args.warmup + args.steps),
        # the batch sizes of the network's passes with gradient in the last step (a floor runs the method's)
        "grad_passes": list(grad_passes),
        "eval_passes": list(eval_passes),  # ... and without gradient
        # each timed step's (start, end) in seconds of CLOCK_MONOTONIC, its data wait included
        "windows": [r["window"] for r in timed_steps],
    }


def median_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The round whose step time is the median (the lower middle one of an even count), whole."""
    return sorted(runs, key=lambda r: r["step_s"])[(len(runs) - 1) // 2]


def floor_key(method: str) -> str | None:
    """The step a method's floor runs: passes in batches, eval forwards, variant: ``"1,1:1+head"``..."""
    if method not in FLOOR:
        return None
    passes, evals = FLOOR[method]
    variant = FLOOR_VARIANT.get(method)
    return ",".join(map(str, passes)) + (f":{evals}" if evals else "") + (f"+{variant}" if variant else "")


def parse_floor_key(key: str) -> tuple[list[int], int, str]:
    """A `floor_key`'s passes in batches, eval forwards and variant: ``"2,2:1+fp"`` -> ``([2, 2], 1, "fp")``."""
    steps, _, variant = key.partition("+")
    passes, _, evals = steps.partition(":")
    return [int(p) for p in passes.split(",")], int(evals or 0), variant


def floor_rounds(rounds: dict[str, list[dict[str, Any]]], methods: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Each method's floor, as its rounds: the floor run in lockstep with it (``"floor of <method>"``),
    else the floor run by key (``"floor <key>"``; key ``"1"`` is the supervised step itself)."""
    found = {}
    for method in methods:
        key = floor_key(method)
        if key is None:
            continue  # no floor rule
        for label in (f"floor of {method}", "supervised" if key == "1" else f"floor {key}"):
            if label in rounds:
                found[method] = rounds[label]
                break
    return found


def floors(
    rounds: dict[str, list[dict[str, Any]]], methods: list[str], paired: bool = False
) -> tuple[dict[str, float], dict[str, float]]:
    """Each method's floor step time (its floor's median round) and x floor.

    ``rounds[label][i]`` is round i's result of ``label`` (a method, or a floor, see `floor_rounds`).
    x floor is the method's median round over its floor's; ``paired`` (each floor measured in
    lockstep with its method): the median of the rounds' ratios, so a slow spell that hits a round
    hits both sides of its ratio.
    """
    floor_runs = floor_rounds(rounds, methods)
    floor = {m: median_round(runs)["step_s"] for m, runs in floor_runs.items()}
    if paired:
        ratio = {m: statistics.median(rounds[m][i]["step_s"] / f["step_s"] for i, f in enumerate(runs))
                 for m, runs in floor_runs.items()}
    else:
        ratio = {m: median_round(rounds[m])["step_s"] / floor[m] for m in floor}
    return floor, ratio


def table(
    results: list[dict[str, Any]],
    floor: dict[str, float] | None = None,
    ratio: dict[str, float] | None = None,
    floor_memory: dict[str, float] | None = None,
) -> str:
    """The markdown table; ``x floor`` is ``step / floor`` unless ``ratio`` gives it (paired rounds).

    ``floor_memory``: each method's floor step's peak memory (for ReCo: the network with its head,
    without the loss), shown next to the method's own peak.
    """
    import pandas as pd

    from benchmarks.report import markdown_table

    frame = pd.DataFrame(results).set_index("method")
    base = frame.loc["supervised", "step_s"] if "supervised" in frame.index else float("nan")
    floor_s = pd.Series(floor or {}, dtype=float).reindex(frame.index)
    out = pd.DataFrame({
        "step ms": (frame["step_s"] * 1e3).round(1),
        "x supervised": (frame["step_s"] / base).round(2),
        "floor ms": (floor_s * 1e3).round(1),
        "x floor": (pd.Series(ratio, dtype=float).reindex(frame.index) if ratio is not None
                    else frame["step_s"] / floor_s).round(2),
        "img/s": frame["images_per_s"].round(1),
        **{f"{part} ms": (frame[part] * 1e3).round(1) for part in PARTS},
        "peak MiB": frame["peak_memory_mib"].round(0).astype(int),
        "floor peak MiB": pd.Series(floor_memory or {}, dtype=float).reindex(frame.index).map(
            lambda mib: "–" if pd.isna(mib) else round(mib)),
    })
    for column in ("floor ms", "x floor"):  # methods without a floor rule (or no floor measured)
        out[column] = out[column].astype(object).where(out[column].notna(), "–")
    out.index.name = "method"
    return markdown_table(out)


def parse(argv: list[str] | None) -> argparse.Namespace:
    from src.pl_modules import METHODS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="all", help="comma list of methods, or all")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="32-true", help="e.g. bf16-mixed on a GPU")
    parser.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=True,
        help="networks and inputs in channels-last format (the default, as in src.train)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the networks (raise --warmup)")
    parser.add_argument("--batch", type=int, default=8, help="labeled (and unlabeled) images per step")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--labels", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--rounds", type=int, default=1, help="measure everything this many times in turn; "
                        "each method keeps its median round")
    parser.add_argument("--paired", action="store_true", help="measure each method in lockstep with its floor "
                        "(two processes taking turns, step by step); x floor is the median over rounds of their ratios")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2, help="data-loader workers per stream")
    parser.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--config", help="an extra YAML applied after the method's (e.g. another encoder)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one method, print JSON
    # internal: measure the supervised step of this floor (a floor_key) instead of a method
    parser.add_argument("--floor", help=argparse.SUPPRESS)
    # internal (--paired): "GO,DONE" file descriptors; each step waits for a byte on GO and writes one to DONE
    parser.add_argument("--turns", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.method_list = sorted(METHODS) if args.methods == "all" else args.methods.split(",")
    unknown = [m for m in args.method_list if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; expected names from {sorted(METHODS)}")
    if "supervised" in args.method_list:  # first, as the reference of the ratios
        args.method_list.remove("supervised")
    args.method_list.insert(0, "supervised")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args)), flush=True)
        return 0
    rest: list[str] = []  # the options for the children, without --methods
    skip = False
    for arg in argv:
        if skip or arg.startswith("--methods="):
            skip = False
            continue
        skip = arg == "--methods"
        if not skip:
            rest.append(arg)
    def command(method: str, batch: int, floor: str | None) -> list[str]:
        return [sys.executable, __file__, *rest, "--batch", str(batch), "--methods", method, "--one", method,
                *(["--floor", floor] if floor else [])]

    def result_of(label: str, returncode: int, stdout: str, stderr: str) -> dict[str, Any] | None:
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        if returncode != 0 or not lines:
            print(f"{label}: failed\n{stderr[-2000:]}", file=sys.stderr)
            return None
        return json.loads(lines[-1][len("RESULT "):])

    def child(job: tuple[str, int, str | None, str]) -> dict[str, Any] | None:
        method, batch, floor, label = job
        done = subprocess.run(command(method, batch, floor), cwd=REPO, capture_output=True, text=True)
        return result_of(label, done.returncode, done.stdout, done.stderr)

    def lockstep(jobs: list[tuple[str, int, str | None, str]]) -> list[dict[str, Any] | None]:
        """Run the jobs' children at once, one training step at a time in turn (--paired).

        Each child builds its model and loaders freely, then waits for its turn before every step
        (its batch fetch included) and reports the step's end; so the method's steps and its
        floor's alternate and share every slow spell of the machine, step by step.
        """
        procs, pipes, outputs = [], [], []
        for method, batch, floor, _ in jobs:
            go, done = os.pipe(), os.pipe()  # (read, write) each
            out = tempfile.TemporaryFile(mode="w+")  # files, not pipes: a child that logs a lot never blocks
            procs.append(subprocess.Popen(
                [*command(method, batch, floor), "--turns", f"{go[0]},{done[1]}"],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True, pass_fds=(go[0], done[1])))
            os.close(go[0]), os.close(done[1])
            pipes.append((go[1], done[0]))
            outputs.append(out)
        try:
            for _ in range(args.warmup + args.steps):
                for go, done in pipes:
                    os.write(go, b".")
                    if not os.read(done, 1):  # the child died
                        raise ChildProcessError
            for go, _ in pipes:  # every step is done: release them all at once (none winds down during another's step)
                os.write(go, b".")
        except (ChildProcessError, BrokenPipeError):
            pass  # reported below from the children's output
        finally:
            for go, done in pipes:
                os.close(go), os.close(done)  # a child still waiting for its turn gets EOF and stops
        results = []
        for proc, out, job in zip(procs, outputs, jobs):
            returncode = proc.wait()
            out.seek(0)
            text = out.read()
            results.append(result_of(job[3], returncode, text, text))
        return results

    # Every round measures each method, then the floors it needs (their steps, by floor_key);
    # --paired runs each method in lockstep with its floor instead (even a floor that is plain supervised).
    floor_keys = sorted({floor_key(m) for m in args.method_list} - {None, "1"})

    def floor_job(key: str, label: str) -> tuple[str, int, str | None, str]:
        return "supervised", sum(parse_floor_key(key)[0]) * args.batch, key, label

    groups = []  # jobs measured together: alone, or a method and its floor in lockstep
    for method in args.method_list:
        job = (method, args.batch, None, method)
        if args.paired and method != "supervised" and floor_key(method) is not None:
            groups.append([job, floor_job(floor_key(method), f"floor of {method}")])
        else:
            groups.append([job])
    if not args.paired:
        groups += [[floor_job(key, f"floor {key}")] for key in floor_keys]
    rounds: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for round_index in range(args.rounds):
        for group in groups:
            results = lockstep(group) if len(group) > 1 else [child(group[0])]
            if None in results:
                return 1
            for job, result in zip(group, results):
                rounds[job[3]].append(result)
                print(f"round {round_index + 1}/{args.rounds}, {job[3]}: {result['step_s'] * 1e3:.1f} ms/step",
                      file=sys.stderr, flush=True)
    kept = {label: median_round(runs) for label, runs in rounds.items()}
    results = [kept[method] for method in args.method_list]
    floor, ratio = floors(rounds, args.method_list, paired=args.paired)
    floor_memory = {m: statistics.median(r["peak_memory_mib"] for r in runs)
                    for m, runs in floor_rounds(rounds, args.method_list).items()}
    pairing = ("each method in lockstep with its floor, their steps in turn, x floor the median of the rounds' "
               "ratios" if args.paired else "floors measured after all methods")
    print(f"\n{args.device}, precision {args.precision}, batch {args.batch}+{args.batch} (supervised: {args.batch}), "
          f"crop {args.crop}, median of {args.steps} steps (median of {args.rounds} rounds; {pairing}), "
          f"{args.threads} threads; memory: {results[0]['memory_kind']}; "
          f"floor: one step of the method's eval-mode no-gradient forwards of one batch, then the supervised step on "
          f"as many images with gradient, in the method's passes (ReCo, C3-SemiSeg: with its representation or "
          f"projection head; UniMatch: its first pass also through the feature-perturbed stream)")
    print(table(results, floor, ratio, floor_memory))
    if args.json:
        from src.utils import atomic_write_json

        for r in results:
            r["floor_s"] = floor.get(r["method"])
            r["floor_peak_memory_mib"] = floor_memory.get(r["method"])
            r["x_floor"] = ratio.get(r["method"])
        atomic_write_json(Path(args.json), {
            "results": results,
            "paired": args.paired,
            "rounds": {label: [r["step_s"] for r in runs] for label, runs in rounds.items()},
            # each round's timed steps as (start, end) on CLOCK_MONOTONIC: in lockstep, the two processes interleave
            "windows": {label: [r["windows"] for r in runs] for label, runs in rounds.items()},
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
