"""Training-step cost of every method, relative to the supervised step measured in the same run.

    python benchmarks/bench_step.py                       # CPU, every method, the configs' model
    python benchmarks/bench_step.py --device cuda --precision bf16-mixed --crop 321 --batch 8

Each method runs in its own subprocess (clean peak-memory figures) through the same path as
``python -m src.train fit --config configs/<method>.yaml``: the same network, datamodule and
Lightning loop, with validation, checkpoints and logging switched off (``--method-config
NAME=PATH``: method NAME's YAML is PATH instead). Every method gets the same batch: ``--batch``
labeled images, plus ``--batch`` unlabeled ones for the methods that use them. A method runs in
its steady state from the first step (its ``steady_state`` options). The table gives, per method,
the median step time over ``--steps`` timed steps (after ``--warmup``), its ratio to supervised,
images per second, peak memory, and where the time goes:

- ``data``: waiting for the next batch (loader, collation, host-to-device copy),
- ``teacher``: the no-gradient forward that makes the pseudo-labels (the EMA teacher's; FixMatch's
  and UniMatch's eval-mode pass on the mixing view; C3's teacher with its projection head, and
  C3's update of the class thresholds),
- ``mix+aug``: building the unlabeled views: rescale, crops, mixing and strong augmentation,
- ``contrast``: ReCo's representation head and loss (forward, and the loss's own gradient, which
  it computes in the same pass), C3's contrastive loss (its student head is in ``rest``),
- ``rest``: the student's forward and backward, the other losses, the optimizer, EMA and
  Lightning's own work.

The parts are the phases each method records from inside (`SemiSupervisedModule.phase`, read
through a `src.callbacks.PhaseTimer`; `src.pl_modules.timing`), with a device sync at each phase
boundary on GPU, which adds a little to every part. ``x floor`` compares a method's step with its
floor, which the method declares (``step_floor``, a `StepFloor`): the supervised step on as many
images with gradient, in the method's passes, plus its eval forwards (`benchmarks.floor.FloorStep`).
Figures from one invocation are comparable with each other; runs on shared machines are noisy,
so compare ratios, not absolute times. ``--rounds R``
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
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.run import GridError, method_config, parse_method_configs  # noqa: E402
from src.pl_modules.timing import TIMED_PHASES, StepFloor  # noqa: E402

PARTS = ("data", *TIMED_PHASES, "rest")
# The model that runs a floor's step, built from the supervised method's YAML.
FLOOR_MODEL = "benchmarks.floor.FloorStep"


@dataclass(frozen=True)
class Job:
    """One step to measure in a child process: a method's, or a floor's.

    Args:
        label: The name its rounds are kept under: the method, ``floor of <method>`` or ``floor <key>``.
        batch: Labeled images per step.
        config: The YAML it is built from (a method's).
        options: CLI options after the shared ones (a method's steady state, a floor's model).
    """

    label: str
    batch: int
    config: str
    options: tuple[str, ...] = ()


def method_job(method: str, batch: int, method_configs: Mapping[str, Path] | None = None) -> Job:
    """The job that measures ``method``'s step, in its steady state (its ``steady_state`` options)."""
    from src.pl_modules import METHODS

    steady = [arg for key, value in METHODS[method].steady_state.items()
              for arg in (f"--model.init_args.{key}", json.dumps(value))]
    return Job(method, batch, str(REPO / method_config(method, method_configs)), tuple(steady))


def floor_job(key: str, label: str, batch: int, method_configs: Mapping[str, Path] | None = None) -> Job:
    """The job that measures the floor ``key`` (a `StepFloor.key`) for methods of ``batch`` images."""
    images = sum(StepFloor.from_key(key).passes) * batch
    config = str(REPO / method_config("supervised", method_configs))
    return Job(label, images, config, ("--model.class_path", FLOOR_MODEL, "--model.init_args.floor", key))


def measure(job: Job, args: argparse.Namespace) -> dict[str, Any]:
    """Time ``args.steps`` training steps of ``job`` in this process."""
    import pytorch_lightning as pl
    import torch

    from src.callbacks import PhaseTimer
    from src.networks.segmenter import Segmenter
    from src.train import main

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    with tempfile.TemporaryDirectory() as tmp:
        cli = main(
            [
                # run=False: no subcommand; the CLI only builds the model and the datamodule.
                "--config", job.config,
                *(["--config", args.config] if args.config else []),
                "--data.crop_size", str(args.crop),
                "--data.batch_size_labeled", str(job.batch),
                "--data.batch_size_unlabeled", str(job.batch),
                "--data.num_workers", str(args.workers),
                "--data.num_labeled", str(args.labels),
                "--trainer.default_root_dir", tmp,
                "--trainer.logger", "false",
                *job.options,
                "--model.init_args.channels_last", str(args.channels_last).lower(),
                *(["--model.init_args.compile", "true"] if args.compile else []),
            ],
            run=False,
        )
        model, datamodule = cli.model, cli.datamodule
        grad_passes: list[int] = []  # the batch size of each pass with gradient in the current step
        eval_passes: list[int] = []  # ... and of each pass without gradient (teacher, pseudo-labels)
        perturbed_passes = [0]  # passes through a feature-perturbed stream, in all steps

        def count_pass(images: torch.Tensor, perturbed: bool) -> None:
            (grad_passes if torch.is_grad_enabled() else eval_passes).append(len(images))
            perturbed_passes[0] += perturbed

        for network in model.modules():  # the student and the teacher
            if isinstance(network, Segmenter):
                network.register_pass_hook(count_pass)
        records: list[dict[str, float]] = []

        turns = [int(fd) for fd in args.turns.split(",")] if args.turns else None

        def take_turn() -> None:
            """--paired: wait until the parent lets this process run its next step (see `lockstep`)."""
            if turns is not None and not os.read(turns[0], 1):
                raise RuntimeError("bench_step: the parent closed the turn pipe")

        class StepTimer(PhaseTimer):
            """The phases of each step (`PhaseTimer`), its wall time and its wait for data; --paired: the turns."""

            def on_train_start(self, trainer: Any, module: Any) -> None:
                take_turn()  # the first batch is fetched in this process's turn
                self.batch_end = time.perf_counter()

            def on_train_batch_start(self, trainer: Any, module: Any, *rest: Any) -> None:
                super().on_train_batch_start(trainer, module, *rest)
                sync()
                self.start = time.perf_counter()
                self.data = self.start - self.batch_end
                grad_passes.clear()
                eval_passes.clear()

            def on_train_batch_end(self, trainer: Any, module: Any, *rest: Any) -> None:
                sync()
                end = time.perf_counter()
                step = end - self.start
                parts = {part: self.current.get(part, 0.0) for part in TIMED_PHASES}
                parts["rest"] = step - sum(parts.values())
                super().on_train_batch_end(trainer, module, *rest)
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
    images = job.batch * (2 if model.uses_unlabeled else 1)
    step = statistics.median(r["step"] for r in timed_steps)
    return {
        "method": job.label,
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
        "perturbed_per_step": perturbed_passes[0] / (args.warmup + args.steps),
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
    """The `StepFloor.key` of the floor ``method`` declares (``step_floor``); None without one."""
    from src.pl_modules import METHODS

    floor = getattr(METHODS.get(method), "step_floor", None)
    return None if floor is None else floor.key


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
    parser.add_argument("--method-config", action="append", default=[], metavar="NAME=PATH",
                        help="method NAME is built from the YAML PATH instead of configs/NAME.yaml (repeatable)")
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
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one `Job` (JSON), print the result
    # internal (--paired): "GO,DONE" file descriptors; each step waits for a byte on GO and writes one to DONE
    parser.add_argument("--turns", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.method_configs = parse_method_configs(args.method_config)
    except GridError as exc:
        parser.error(str(exc))
    args.method_list = sorted(METHODS) if args.methods == "all" else args.methods.split(",")
    unknown = [m for m in args.method_list if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; expected names from {sorted(METHODS)}")
    without_yaml = [m for m in args.method_list if not (REPO / method_config(m, args.method_configs)).is_file()]
    if without_yaml:
        parser.error(f"--methods: no YAML for {without_yaml}: add configs/<name>.yaml or pass --method-config")
    if "supervised" in args.method_list:  # first, as the reference of the ratios
        args.method_list.remove("supervised")
    args.method_list.insert(0, "supervised")
    return args


def child_command(job: Job, options: list[str]) -> list[str]:
    """The command of a child process that measures ``job`` with the shared ``options`` and prints its result."""
    return [sys.executable, str(Path(__file__).resolve()), *options, "--one", json.dumps(asdict(job))]


def result_of(label: str, returncode: int, stdout: str, stderr: str) -> dict[str, Any] | None:
    """A child's result (None, with its error output, if it failed)."""
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if returncode != 0 or not lines:
        print(f"{label}: failed\n{stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def child(job: Job, options: list[str]) -> dict[str, Any] | None:
    """Measure ``job`` in a child process."""
    done = subprocess.run(child_command(job, options), cwd=REPO, capture_output=True, text=True)
    return result_of(job.label, done.returncode, done.stdout, done.stderr)


def lockstep(jobs: list[Job], options: list[str], steps: int) -> list[dict[str, Any] | None]:
    """Run the jobs' children at once, ``steps`` training steps, one step at a time in turn (--paired).

    Each child builds its model and loaders freely, then waits for its turn before every step
    (its batch fetch included) and reports the step's end; so the method's steps and its
    floor's alternate and share every slow spell of the machine, step by step.
    """
    procs, pipes, outputs = [], [], []
    for job in jobs:
        go, done = os.pipe(), os.pipe()  # (read, write) each
        out = tempfile.TemporaryFile(mode="w+")  # files, not pipes: a child that logs a lot never blocks
        procs.append(subprocess.Popen(
            [*child_command(job, options), "--turns", f"{go[0]},{done[1]}"],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True, pass_fds=(go[0], done[1])))
        os.close(go[0]), os.close(done[1])
        pipes.append((go[1], done[0]))
        outputs.append(out)
    try:
        for _ in range(steps):
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
        results.append(result_of(job.label, returncode, text, text))
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.one:
        print("RESULT " + json.dumps(measure(Job(**json.loads(args.one)), args)), flush=True)
        return 0
    options: list[str] = []  # the options for the children, without --methods
    skip = False
    for arg in argv:
        if skip or arg.startswith("--methods="):
            skip = False
            continue
        skip = arg == "--methods"
        if not skip:
            options.append(arg)

    # Every round measures each method, then the floors it needs (their steps, by floor_key);
    # --paired runs each method in lockstep with its floor instead (even a floor that is plain supervised).
    floor_keys = sorted({floor_key(m) for m in args.method_list} - {None, "1"})
    groups = []  # jobs measured together: alone, or a method and its floor in lockstep
    for method in args.method_list:
        job = method_job(method, args.batch, args.method_configs)
        if args.paired and method != "supervised" and floor_key(method) is not None:
            floor = floor_job(floor_key(method), f"floor of {method}", args.batch, args.method_configs)
            groups.append([job, floor])
        else:
            groups.append([job])
    if not args.paired:
        groups += [[floor_job(key, f"floor {key}", args.batch, args.method_configs)] for key in floor_keys]
    rounds: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for round_index in range(args.rounds):
        for group in groups:
            results = (lockstep(group, options, args.warmup + args.steps) if len(group) > 1
                       else [child(group[0], options)])
            if None in results:
                return 1
            for job, result in zip(group, results):
                rounds[job.label].append(result)
                print(f"round {round_index + 1}/{args.rounds}, {job.label}: {result['step_s'] * 1e3:.1f} ms/step",
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
