"""Benchmark grid: methods x label budgets x seeds, one ``src.train`` run each, then tables.

    python benchmarks/run.py --method reco --labels 5,15,60 --seeds 0,1,2
    python benchmarks/run.py --method all --labels 5,15 --profile quick
    python benchmarks/run.py --method supervised,recon+supervised --labels 5,15,60 --seeds 0,1,2
    python benchmarks/run.py --method supervised,mean_teacher --labels 5,15,60,all
    python benchmarks/run.py --method supervised,reco --dataset pascal_voc --data-root VOC2012 \\
        --labels 60,200 --profile paper --trainer.precision bf16-mixed

Each run is ``src.train.main(["fit", ...])`` (the path of ``python -m src.train fit``) in its own
subprocess, followed in the same process by ``test`` on the best checkpoint when the dataset has
a test split of its own. A run lives in ``<out>/runs/<method>/labels<N>/seed<S>/`` (logs,
checkpoints, resolved config, split, ``result.json``). The grid is resumable: finished runs are
skipped, interrupted ones resume from ``checkpoints/last.ckpt``. Tables and the plot come from
``benchmarks/report.py`` (``runs.csv``, ``summary.md``, ``miou_vs_labels.png`` in ``<out>``).

The budget ``all`` labels every image of the train pool (``--data.num_labeled 0``; semi-supervised
methods then also have every image on their unlabeled stream). Its runs live in ``labelsall/``,
and ``runs.csv`` and the tables call it ``all``.

``<pretraining>+<method>`` (e.g. ``recon+supervised``; ``<pretraining>`` is a method with
``pretraining_only``) is a two-stage method: first ``<pretraining>`` trains once per seed on every
train image (``--data.num_labeled 0``) in ``<out>/pretrain/<pretraining>/seed<S>/``, resumable and
skipped when finished like any run; then each budget's run of ``<method>`` starts from its best
checkpoint (``--model.init_args.init_from``) and is tabulated as ``<pretraining>+<method>``. The
pretraining run gets the same profile and passthrough arguments, so an architecture override
reaches both stages. ``all`` is every method but the pretraining ones, without two-stage pairs.

Unknown ``--trainer.*``, ``--model.*``, ``--data.*`` and ``--config FILE`` arguments are passed
to every run, after the profile's arguments.

A method trains with ``configs/<method>.yaml``; ``--method-config NAME=PATH`` (repeatable) gives
method NAME another YAML: a variant of its settings, or a registered method (``src.pl_modules.METHODS``)
whose YAML lives elsewhere.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/run.py` puts only benchmarks/ on the path
    sys.path.insert(0, str(REPO))

from src.datasets import DATASETS  # noqa: E402
from src.utils import atomic_write_json  # noqa: E402

# Datasets with ReCo's published protocol in configs/data/<dataset>.yaml.
PAPER_DATASETS = ("pascal_voc", "cityscapes")

# What a profile adds after `--config configs/<method>.yaml` (and, for a real dataset, after
# `--config configs/data/<dataset>.yaml`, which every profile adds). "synthetic" and "real" are
# the arguments for the embedded dataset and for a dataset on disk; a missing entry means the
# profile does not apply.
PROFILES: dict[str, dict[str, list[str]]] = {
    # The method YAMLs as they are: the suite's CPU budget on synthetic (800 steps from the
    # source-pretrained encoder).
    "default": {"synthetic": [], "real": []},
    # A smoke of the whole path: any one method over three budgets within 3 minutes on 2 CPU
    # cores (ReCo, the slowest, takes about 1 s a step there). Not a benchmark: 30 steps leave
    # every method near chance.
    "quick": {
        "synthetic": [
            "--trainer.max_steps", "30",
            "--trainer.val_check_interval", "15",
            "--data.dataset_options", "{image_size: 64, num_train: 300, num_val: 32, num_test: 32}",
            "--data.crop_size", "32",
            "--data.num_workers", "0",
            # Random init: a smoke should not wait for the one-time source pretraining.
            "--model.init_args.encoder_weights", "null",
        ],
        "real": [
            "--trainer.max_steps", "30",
            "--trainer.val_check_interval", "15",
            "--trainer.limit_val_batches", "10",
            "--trainer.limit_test_batches", "10",
        ],
    },
    # ReCo's settings (40k steps, 321/512 crops, 10+10 or 2+2 images, ResNet-101): the overlay holds them.
    "paper": {"real": []},
}

# Per-method settings of a dataset kind, after the profile's. configs/reco.yaml scales ReCo's
# queries to the CPU profile's small feature maps (128); real datasets get the paper's 256.
METHOD_ARGS: dict[tuple[str, str], list[str]] = {
    ("real", "reco"): ["--model.init_args.num_queries", "256"],
}

# Passthrough arguments the runner sets itself for every run.
RESERVED = (
    "--data.num_labeled",
    "--data.seed",
    "--seed_everything",
    "--trainer.default_root_dir",
    "--trainer.logger",
    "--ckpt_path",
)
PASSTHROUGH_PREFIXES = ("--trainer.", "--model.", "--data.", "--config")
# Resolved-config entries that differ between runs of the same grid cell only by where they write.
PER_RUN_KEYS = (
    ("trainer", "default_root_dir"),
    ("trainer", "logger"),
    ("ckpt_path",),
)
# ... and those that tell runs of one grid apart (budget, seed): the settings hash leaves them out.
# A two-stage run's init_from is its seed's pretraining checkpoint.
GRID_KEYS = (
    ("seed_everything",),
    *((*data, key) for data in (("data", "init_args"), ("data",)) for key in ("seed", "num_labeled")),
    ("model", "init_args", "init_from"),
)
# runs.csv's protocol columns (`protocol`), the switches that decide whether two numbers are
# comparable, and where each is read in a run's resolved config: the datamodule's, the model's
# arguments or the trainer's. split_source is split.json's source where the run wrote one.
PROTOCOL_SOURCES: dict[str, tuple[str, str]] = {
    "dataset": ("data", "dataset"),
    "split_source": ("data", "split_strategy"),
    "split_strategy": ("data", "split_strategy"),
    "split_seed": ("data", "split_seed"),
    "partial_labels": ("data", "partial_labels"),
    "crop_size": ("data", "crop_size"),
    "batch_size_labeled": ("data", "batch_size_labeled"),
    "batch_size_unlabeled": ("data", "batch_size_unlabeled"),
    "eval_mode": ("model", "eval_mode"),
    "eval_resize": ("data", "eval_resize"),
    "test_split": ("data", "test_split"),
    "arch": ("model", "arch"),
    "encoder": ("model", "encoder_name"),
    "encoder_weights": ("model", "encoder_weights"),
    "max_steps": ("trainer", "max_steps"),
    "lr_power": ("model", "lr_power"),
    "precision": ("trainer", "precision"),
}
PROTOCOL_COLUMNS = tuple(PROTOCOL_SOURCES)


# `--labels all`: every image of the train pool labeled, as `data.num_labeled` spells it.
ALL_LABELS = 0


class GridError(Exception):
    """Bad grid arguments, or a result directory made by a different command."""


@dataclass
class RunSpec:
    """One (method, label budget, seed) cell and where it lives, or a seed's pretraining run."""

    index: int
    total: int
    method: str
    labels: int
    seed: int
    run_dir: Path
    pretraining: bool = False
    # Two-stage runs: the pretraining run, and the checkpoint taken from it once it has finished.
    pretrain: RunSpec | None = None
    init_from: Path | None = None
    # Training arguments of this method only (METHOD_ARGS), after the grid's common ones.
    method_args: tuple[str, ...] = ()
    # The YAML of `config_name` (`method_config`); None: configs/<config_name>.yaml.
    config: Path | None = None

    @property
    def name(self) -> str:
        cell = "pretraining" if self.pretraining else f"labels={budget_name(self.labels)}"
        return f"[{self.index}/{self.total}] {self.method} {cell} seed={self.seed}"

    @property
    def config_name(self) -> str:
        """The method whose YAML the run trains: ``supervised`` for ``recon+supervised``."""
        return self.method.rpartition("+")[2]


@dataclass
class Running:
    """A launched run: its process, when it started, and what the display last said about it."""

    spec: RunSpec
    process: subprocess.Popen
    started: float
    log_offset: int
    resumed_from: dict[str, Any] | None
    last_decile: int = -1
    last_print: float = 0.0
    rate: float | None = None  # seconds per step, from progress.json
    remaining_steps: int | None = None


@dataclass
class GridState:
    """What the progress display knows: step rates per method, run overheads, the max steps."""

    rates: dict[str, float] = field(default_factory=dict)
    overheads: list[float] = field(default_factory=list)
    max_steps: int | None = None


# ---------------------------------------------------------------------------- arguments
def dataset_kind(dataset: str) -> str:
    """The key of PROFILES and METHOD_ARGS: ``synthetic``, or ``real`` for every dataset on disk."""
    return "synthetic" if dataset == "synthetic" else "real"


def method_config(name: str, method_configs: Mapping[str, str | os.PathLike] | None = None) -> Path:
    """The YAML method ``name`` trains with: ``method_configs[name]`` (made absolute), else ``configs/<name>.yaml``
    (relative to the repository, where runs start)."""
    given = (method_configs or {}).get(name)
    return Path(given).resolve() if given is not None else Path("configs") / f"{name}.yaml"


def parse_method_configs(values: Sequence[str]) -> dict[str, Path]:
    """``--method-config NAME=PATH`` options as ``{NAME: PATH}``; the files must exist."""
    configs = {}
    for value in values:
        name, _, path = value.partition("=")
        if not name or not path or not Path(path).is_file():
            raise GridError(f"--method-config {value!r}: expected NAME=PATH with an existing YAML file")
        configs[name] = Path(path)
    return configs


def method_args(dataset: str, config_name: str) -> tuple[str, ...]:
    """The training arguments METHOD_ARGS adds for ``config_name`` (a method's YAML) on ``dataset``."""
    return tuple(METHOD_ARGS.get((dataset_kind(dataset), config_name), ()))


def profile_args(profile: str, dataset: str, data_root: str | None = None) -> list[str]:
    """The training arguments that a profile and a dataset add after the method's YAML."""
    if profile not in PROFILES:
        raise GridError(f"--profile {profile!r}: expected one of {sorted(PROFILES)}")
    if dataset not in DATASETS:
        raise GridError(f"--dataset {dataset!r}: expected one of {list(DATASETS)}")
    kind = dataset_kind(dataset)
    if kind not in PROFILES[profile] or (profile == "paper" and dataset not in PAPER_DATASETS):
        raise GridError(f"profile {profile!r} has settings for {list(PAPER_DATASETS)} only, not {dataset!r}")
    if dataset == "synthetic":
        return list(PROFILES[profile]["synthetic"])
    if data_root is None:
        raise GridError(f"--dataset {dataset} needs --data-root (the folder that holds it)")
    overlay = ["--config", f"configs/data/{dataset}.yaml", "--data.root", str(Path(data_root).resolve())]
    return overlay + list(PROFILES[profile]["real"])


def check_passthrough(args: Sequence[str]) -> list[str]:
    """Validate arguments forwarded to every run; ``--config`` files become absolute paths."""
    out: list[str] = []
    expect_config = False
    for arg in args:
        if expect_config:
            path = Path(arg)
            out.append(str(path.resolve()) if path.exists() else arg)
            expect_config = False
            continue
        if arg.startswith("--"):
            key = arg.split("=", 1)[0]
            if any(key == r or key.startswith(r + ".") for r in RESERVED):
                raise GridError(f"{key} is set by the runner for every run (use --labels, --seeds, --out)")
            if not key.startswith(PASSTHROUGH_PREFIXES):
                raise GridError(f"unknown argument {arg!r} (forwarded are --trainer.*, --model.*, --data.*, --config)")
            if key == "--config" and "=" not in arg:
                expect_config = True
        out.append(arg)
    if expect_config:
        raise GridError("--config needs a file")
    return out


def encoder_weights(args: Sequence[str]) -> Any:
    """``model.init_args.encoder_weights`` of a run with ``args`` (its method's ``--config`` first), as
    `src.train`'s CLI resolves them from the repository, where runs start; nothing is built.

    Raises:
        GridError: The CLI refuses ``args``.
    """
    from jsonargparse import ArgumentError

    from src.datamodules import SegmentationDataModule
    from src.pl_modules import SemiSupervisedModule
    from src.train import SemiSegCLI, one_line

    class SettingsOnly(SemiSegCLI):
        def instantiate_classes(self) -> None:  # the resolved config is enough: no network, weights or data
            pass

    try:
        with contextlib.chdir(REPO):
            cli = SettingsOnly(
                SemiSupervisedModule, SegmentationDataModule, subclass_mode_model=True, subclass_mode_data=True,
                parser_kwargs={"exit_on_error": False}, run=False,
                args=[*args, "--seed_everything", "false"],  # parsing only: seed nothing in this process
            )
    except (ArgumentError, ValueError) as exc:
        raise GridError(one_line(str(exc))) from None
    return cli.config.model.init_args.encoder_weights


def parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise GridError(f"{option} {text!r}: expected comma-separated integers, e.g. 5,15,60") from None
    if not values or any(v < 0 for v in values):
        raise GridError(f"{option} {text!r}: expected one or more integers >= 0")
    return list(dict.fromkeys(values))


def budget_name(labels: int) -> str:
    """A label budget as directories and tables name it: ``15``, or ``all`` for `ALL_LABELS`."""
    return "all" if labels == ALL_LABELS else str(labels)


def parse_budget(value: int | str) -> int:
    """A budget written as `budget_name` does (``15``, ``"15"``, ``"all"``) as ``data.num_labeled`` takes it.

    Raises ``ValueError`` for anything else, negative numbers included.
    """
    text = str(value).strip()
    if text == "all":
        return ALL_LABELS
    budget = int(text)
    if budget < 0:
        raise ValueError(f"negative label budget {budget}")
    return budget


def run_directory(out: Path, method: str, labels: int, seed: int) -> Path:
    """Where a grid run lives: ``<out>/runs/<method>/labels<budget name>/seed<seed>``."""
    return out / "runs" / method / f"labels{budget_name(labels)}" / f"seed{seed}"


def parse_budgets(text: str) -> list[int]:
    """The ``--labels`` option: comma-separated budgets, ``all`` among them or alone."""
    try:
        values = [parse_budget(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise GridError(f"--labels {text!r}: expected comma-separated integers >= 1 or 'all', e.g. 5,15,60,all")
    return list(dict.fromkeys(values))


def resolve_methods(text: str, method_configs: Mapping[str, str | os.PathLike] | None = None) -> list[str]:
    """``all``, one method name or a comma list; names are checked against ``src.pl_modules.METHODS``,
    and each needs its YAML (`method_config`).

    A pretraining method (``pretraining_only``, e.g. ``recon``) is valid only as ``<pretraining>+<method>``.
    """
    from src.pl_modules import METHODS

    def runnable(name: str, pretraining: bool) -> bool:
        cls = METHODS.get(name)
        return (
            cls is not None
            and getattr(cls, "pretraining_only", False) == pretraining
            and (REPO / method_config(name, method_configs)).is_file()
        )

    trainable = [m for m in METHODS if not getattr(METHODS[m], "pretraining_only", False)]
    names = trainable if text == "all" else list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [
        m for m in names
        if not runnable(m.rpartition("+")[2], False) or ("+" in m and not runnable(m.rpartition("+")[0], True))
    ]
    if unknown or not names:
        pretraining = sorted(set(METHODS) - set(trainable))
        raise GridError(
            f"--method {text!r}: unknown {unknown}; expected 'all', names from {sorted(trainable)}, "
            f"or <pretraining>+<name> with <pretraining> one of {pretraining} (e.g. recon+supervised)"
        )
    return names


def run_command(spec: RunSpec, common: Sequence[str], resume: Path | None) -> list[str]:
    """The subprocess command of one run (see ``_train_and_test``)."""
    logger = [
        "--trainer.default_root_dir", str(spec.run_dir),
        "--trainer.logger.class_path", "pytorch_lightning.loggers.TensorBoardLogger",
        "--trainer.logger.init_args.save_dir", str(spec.run_dir.parent),
        "--trainer.logger.init_args.name", "",
        "--trainer.logger.init_args.version", spec.run_dir.name,
    ]
    return [
        sys.executable, str(Path(__file__).resolve()), "--train-and-test",
        "--config", str(spec.config or method_config(spec.config_name)),
        *common,
        *spec.method_args,
        "--data.num_labeled", str(spec.labels),
        "--seed_everything", str(spec.seed),
        *logger,
        *(["--model.init_args.init_from", str(spec.init_from)] if spec.init_from is not None else []),
        *(["--ckpt_path", str(resume)] if resume is not None else []),
    ]


# ---------------------------------------------------------------------------- one run
def _train_and_test(train_args: list[str]) -> int:
    """Subprocess body: fit exactly as ``python -m src.train fit`` does, then test the best checkpoint.

    The test runs in the same process (a second Python + torch start costs seconds) and is
    skipped when the test split is the validation split (VOC, Cityscapes).
    """
    from src.train import release_process_group

    code = _fit_and_test(train_args)
    if code == 0:
        release_process_group()
    return code


def _fit_and_test(train_args: list[str]) -> int:
    from jsonargparse import ArgumentError

    from src.datasets import DatasetError
    from src.train import fit_metrics, main, one_line, run_summary

    sys.argv = [sys.argv[0]]  # the arguments go in `args` (LightningCLI warns when both are given)
    try:
        cli = main(["fit", *train_args])
    except (ValueError, ArgumentError) as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    trainer, datamodule = cli.trainer, cli.datamodule
    run_dir = Path(trainer.log_dir or trainer.default_root_dir)
    # The checkpoint's monitor is a metric every validation logs (val/miou, or val/loss for recon).
    monitor = getattr(trainer.checkpoint_callback, "monitor", None) or "val/miou"
    if monitor not in fit_metrics(trainer, cli.model):
        # Resumed from a checkpoint of the final step (the run ended, its result did not get
        # written), fit had nothing to do and reports what that checkpoint recorded; a checkpoint
        # that recorded no metrics (an older one) is evaluated for the last-step metrics.
        started = time.time()
        trainer.validate(cli.model, datamodule=datamodule, ckpt_path=str(run_dir / "checkpoints" / "last.ckpt"))
        atomic_write_json(run_dir / "metrics.json", run_summary(trainer, cli.model, time.time() - started))
    hp = datamodule.hparams
    if hp.test_split == hp.val_split:
        return 0
    best = run_dir / "checkpoints" / "best.ckpt"
    checkpoint = best if best.is_file() else run_dir / "checkpoints" / "last.ckpt"
    try:
        results = trainer.test(cli.model, datamodule=datamodule, ckpt_path=str(checkpoint), verbose=False)
    except DatasetError as exc:  # e.g. a folder dataset without a test split
        atomic_write_json(run_dir / "test_metrics.json", {"skipped": str(exc)})
        return 0
    metrics = {k: float(v) for k, v in results[0].items()} if results else {}
    atomic_write_json(
        run_dir / "test_metrics.json", {"checkpoint": str(checkpoint), "split": hp.test_split, "metrics": metrics}
    )
    return 0


def _kill_with_parent() -> None:
    """In the child: die with the runner (Linux), so a killed runner leaves no training behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_done(run_dir: Path) -> bool:
    result = read_json(run_dir / "result.json")
    return bool(result) and result.get("status") == "ok"


def pretrained_checkpoint(spec: RunSpec) -> Path | None:
    """The checkpoint a finished pretraining run hands on: its best (lowest val loss), else its last."""
    if not is_done(spec.run_dir):
        return None
    checkpoints = spec.run_dir / "checkpoints"
    return next((p for p in (checkpoints / "best.ckpt", checkpoints / "last.ckpt") if p.is_file()), None)


def not_run(spec: RunSpec, reason: str, context: dict[str, Any]) -> dict[str, Any]:
    """Write and return the failed ``result.json`` of a run that could not start."""
    record = {
        "method": spec.method, "labels": spec.labels, "seed": spec.seed, "status": "failed", "error": reason,
        "returncode": None, "run_dir": str(spec.run_dir), "test_miou": None, "wall_time_s": 0.0, **context,
    }
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(spec.run_dir / "result.json", record)
    return record


def _checkpoint_step(path: Path) -> int | None:
    """The global step saved in a checkpoint (memory-mapped: its tensors are not read)."""
    import torch

    try:
        return int(torch.load(path, map_location="cpu", mmap=True, weights_only=False)["global_step"])
    except Exception:  # an unreadable checkpoint fails in the run itself, with its own message
        return None


def launch(spec: RunSpec, common: Sequence[str], workers: int, stream: IO[str]) -> Running:
    """Start one run (resuming from its ``last.ckpt`` if there is one) with its output in the run dir.

    ``workers``: how many runs share the cores with this one (each gets its share of threads).
    """
    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    resumed_from = None
    if last.is_file():
        resumed_from = {"checkpoint": str(last), "step": _checkpoint_step(last)}
    else:
        # A run killed before its first checkpoint starts over; a stale best.ckpt would make
        # Lightning write best-v1.ckpt next to it.
        for stale in (run_dir / "checkpoints").glob("*.ckpt"):
            stale.unlink()
    for stale in ("metrics.json", "test_metrics.json", "progress.json"):
        (run_dir / stale).unlink(missing_ok=True)
    command = run_command(spec, common, last if resumed_from else None)
    log_path = run_dir / "train.log"
    with open(log_path, "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
        if resumed_from:
            log.write(f"=== resuming from {last} (step {resumed_from['step']})\n")
        log.flush()
        offset = log.tell()
        env = dict(os.environ)
        if workers > 1 and "OMP_NUM_THREADS" not in env:
            # Parallel runs share the cores: without this each torch would use all of them.
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
        # OpenMP's wait policy is left to the environment: spinning threads (the default) make a run
        # on otherwise idle cores 20-25 % faster than OMP_WAIT_POLICY=PASSIVE, which is the better
        # choice only when the cores are busy with other work (the test suite sets it).
        process = subprocess.Popen(
            command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_kill_with_parent
        )
    note = f"  resuming from step {resumed_from['step']}" if resumed_from else ""
    print(f"{spec.name}  started{note}", file=stream, flush=True)
    return Running(spec, process, time.time(), offset, resumed_from)


def config_hashes(config: dict[str, Any]) -> tuple[str, str]:
    """Hashes of a resolved config: without per-run paths, and also without budget and seed."""

    def strip(cfg: dict[str, Any], keys: Sequence[tuple[str, ...]]) -> dict[str, Any]:
        cfg = json.loads(json.dumps(cfg, default=str))
        for key in keys:
            node = cfg
            for part in key[:-1]:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(key[-1], None)
        return cfg

    def digest(cfg: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]

    run_config = strip(config, PER_RUN_KEYS)
    return digest(run_config), digest(strip(run_config, GRID_KEYS))


def data_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The datamodule's arguments in a resolved config: its ``init_args`` (flat in runs that named no class)."""
    data = config.get("data") or {}
    return (data.get("init_args") or {}) if "class_path" in data else data


def protocol(config: dict[str, Any], split: dict[str, Any] | None) -> dict[str, Any]:
    """The `PROTOCOL_COLUMNS` of a run, read from its resolved config and its ``split.json``."""
    sections = {
        "data": data_settings(config),
        "model": (config.get("model") or {}).get("init_args") or {},
        "trainer": config.get("trainer") or {},
    }
    values = {column: sections[section].get(key) for column, (section, key) in PROTOCOL_SOURCES.items()}
    values["split_source"] = (split or {}).get("source", sections["data"].get("split_file") or values["split_source"])
    return values


def _tail(path: Path, offset: int, lines: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _reap(process: subprocess.Popen) -> tuple[int, int] | None:
    """Exit code and peak resident memory (bytes) of a finished run, or None while it runs.

    ``os.wait4`` instead of ``Popen.poll`` gives the child's own resource usage: its peak
    memory covers the test after the fit, which ``metrics.json`` (written after fit) cannot.
    """
    pid, status, usage = os.wait4(process.pid, os.WNOHANG)
    if pid == 0:
        return None
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_maxrss * 1024  # Linux reports KiB


def finish(run: Running, returncode: int, peak_rss: int, context: dict[str, Any]) -> dict[str, Any]:
    """Write ``result.json`` of a finished run (status ok or failed) and return it."""
    spec, run_dir = run.spec, run.spec.run_dir
    metrics = read_json(run_dir / "metrics.json") or {}
    test = read_json(run_dir / "test_metrics.json") or {}
    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else None
    split = read_json(run_dir / "split.json")
    ok = returncode == 0 and bool(metrics)
    error = None
    if not ok:
        cause = f"killed by signal {signal.Signals(-returncode).name}" if returncode < 0 else f"exit code {returncode}"
        error = f"{cause}\n{_tail(run_dir / 'train.log', run.log_offset)}".strip()
    test_metrics = test.get("metrics", {})
    record = {
        **metrics,
        "method": spec.method,
        "labels": spec.labels,
        "seed": spec.seed,
        "status": "ok" if ok else "failed",
        "error": error,
        "returncode": returncode,
        "run_dir": str(run_dir),
        "test_miou": test_metrics.get("test/miou"),
        "test_iou": {k.split("/", 2)[2]: v for k, v in test_metrics.items() if k.startswith("test/iou/")},
        "test_checkpoint": test.get("checkpoint"),
        "fit_time_s": metrics.get("wall_time_s"),
        "peak_rss_bytes": peak_rss,
        "wall_time_s": time.time() - run.started,  # this attempt: start-up, fit and test
        "resumed_from": run.resumed_from,
        "config_hash": None,
        "settings_hash": None,
        "protocol": protocol(config, split) if config else None,
        **context,
    }
    if config:
        record["config_hash"], record["settings_hash"] = config_hashes(config)
    atomic_write_json(run_dir / "result.json", record)
    return record


# ---------------------------------------------------------------------------- display
def format_duration(seconds: float | None, coarse: bool = False) -> str:
    if seconds is None:
        return "?"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{round(seconds / 60)}m" if coarse else f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def update_progress(run: Running, state: GridState) -> dict[str, Any] | None:
    progress = read_json(run.spec.run_dir / "progress.json")
    if not progress:
        return None
    done = progress["step"] - progress.get("start_step", 0)
    state.max_steps = progress["max_steps"]
    run.remaining_steps = max(progress["max_steps"] - progress["step"], 0)
    if done > 0:
        run.rate = progress["elapsed_s"] / done
        state.rates[run.spec.method] = run.rate
    return progress


def grid_eta(running: Sequence[Running], pending: Sequence[RunSpec], state: GridState, workers: int) -> float | None:
    """Seconds left in the grid: steps left at each method's rate, plus one start-up per pending run."""
    if not state.rates or state.max_steps is None:
        return None
    default_rate = sum(state.rates.values()) / len(state.rates)
    # Python + torch start-up, data set-up and test; a guess until one run has finished.
    overhead = sum(state.overheads) / len(state.overheads) if state.overheads else 15.0
    total = 0.0
    for run in running:
        rate = run.rate or state.rates.get(run.spec.method, default_rate)
        steps = run.remaining_steps if run.remaining_steps is not None else state.max_steps
        total += steps * rate
    for spec in pending:
        total += state.max_steps * state.rates.get(spec.method, default_rate) + overhead
    return total / max(1, min(workers, len(running) + len(pending)))


def show_progress(
    running: Sequence[Running], pending: Sequence[RunSpec], state: GridState, workers: int, stream: IO[str],
    tty_every_s: float,
) -> None:
    """One line per running run: on a TTY every ``tty_every_s``, else once per tenth of its steps."""
    tty = stream.isatty()
    now = time.time()
    for run in running:
        progress = update_progress(run, state)
        if not progress or run.rate is None:
            continue
        decile = int(10 * progress["step"] / max(progress["max_steps"], 1))
        if tty and now - run.last_print < tty_every_s:
            continue
        if not tty and decile <= run.last_decile:
            continue
        run.last_decile, run.last_print = decile, now
        miou = progress.get("val_miou")
        val = f"  val mIoU {miou:.1f}" if miou is not None else ""
        eta_run = run.remaining_steps * run.rate if run.rate is not None else None
        eta = format_duration(grid_eta(running, pending, state, workers), coarse=True)
        print(
            f"{run.spec.name}  step {progress['step']}/{progress['max_steps']}{val}  "
            f"ETA {format_duration(eta_run)} (run) / {eta} (grid)",
            file=stream,
            flush=True,
        )


def _result_line(spec: RunSpec, record: dict[str, Any]) -> str:
    if record["status"] != "ok":
        lines = (record.get("error") or "?").strip().splitlines()
        return f"{spec.name}  FAILED ({lines[0]}): {lines[-1]}  see {spec.run_dir}/train.log"
    if spec.pretraining:
        loss = (record.get("metrics") or {}).get("val/loss")
        val = "-" if loss is None else f"{loss:.4f}"
        return f"{spec.name}  ok  val loss {val}  {format_duration(record['wall_time_s'])}"

    def pct(v: Any) -> str:
        return "-" if v is None else f"{v:.1f}"

    return (
        f"{spec.name}  ok  val mIoU {pct(record.get('val_miou_last'))} (best {pct(record.get('val_miou_best'))})"
        f"  test {pct(record.get('test_miou'))}  {format_duration(record['wall_time_s'])}"
    )


# ---------------------------------------------------------------------------- the grid
def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def _versions() -> dict[str, str]:
    out = {}
    for package in ("torch", "pytorch-lightning", "segmentation-models-pytorch", "timm"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def default_out(dataset: str, profile: str) -> Path:
    return Path("results") / f"{dataset}-{profile}"


def _check_same_command(spec: RunSpec, common: list[str]) -> None:
    """Refuse to mix runs made with other training arguments into one result directory."""
    recorded = read_json(spec.run_dir / "result.json") or read_json(spec.run_dir / "command.json")
    if recorded is not None and recorded.get("train_args") not in (None, common):
        raise GridError(
            f"{spec.run_dir} was made with other training arguments:\n  {recorded['train_args']}\nnow:\n  {common}\n"
            "use another --out, or delete that directory"
        )


def run_grid(
    methods: Sequence[str],
    labels: Sequence[int],
    seeds: Sequence[int] = (0,),
    *,
    dataset: str = "synthetic",
    data_root: str | None = None,
    profile: str = "default",
    out: str | os.PathLike | None = None,
    extra_args: Sequence[str] = (),
    workers: int = 1,
    best: bool = False,
    poll_s: float = 3.0,
    tty_every_s: float = 15.0,
    stream: IO[str] | None = None,
    allow_random_init: bool = False,
    method_configs: Mapping[str, str | os.PathLike] | None = None,
) -> list[dict[str, Any]]:
    """Train every (method, budget, seed) not done yet, write ``result.json`` per run, then the report.

    Holds ``<out>/.lock`` for the whole grid (another runner on the same ``out`` is refused).
    Returns one record per run of the grid (skipped ones read back from their ``result.json``).
    The ``paper`` profile refuses a random-init encoder unless ``allow_random_init``.
    ``method_configs`` maps a method name to the YAML it trains with instead of ``configs/<name>.yaml``.
    """
    stream = stream or sys.stdout
    if workers < 1:
        raise GridError(f"--workers must be >= 1, got {workers}")
    common = profile_args(profile, dataset, data_root) + check_passthrough(extra_args)
    if profile == "paper" and not allow_random_init:
        trained = dict.fromkeys(m.rpartition("+")[2] for m in methods)  # the YAMLs the grid trains (`config_name`)
        random_init = [
            m for m in trained
            if encoder_weights(["--config", str(method_config(m, method_configs)), *common, *method_args(dataset, m)])
            is None
        ]
        if random_init:
            raise GridError(
                f"--profile paper with encoder_weights None (a random-init encoder) for {random_init}: the "
                "published numbers assume ImageNet-pretrained weights; pass --allow-random-init to run it anyway"
            )
    out = Path(out if out is not None else default_out(dataset, profile)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    specs = [
        RunSpec(0, 0, m, n, s, run_directory(out, m, n, s))
        for m in methods for n in labels for s in seeds
    ]
    for spec in specs:
        spec.method_args = method_args(dataset, spec.config_name)
    # Two-stage methods: one pretraining run per (pretraining method, seed), shared by every budget.
    pretraining: dict[tuple[str, int], RunSpec] = {}
    for spec in specs:
        first = spec.method.rpartition("+")[0]
        if first:
            pretrain_dir = out / "pretrain" / first / f"seed{spec.seed}"
            new = RunSpec(0, 0, first, 0, spec.seed, pretrain_dir, pretraining=True)
            spec.pretrain = pretraining.setdefault((first, spec.seed), new)
    for i, spec in enumerate([*pretraining.values(), *specs], start=1):
        spec.index, spec.total = i, len(pretraining) + len(specs)
        spec.config = method_config(spec.config_name, method_configs)
    with open(out / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            raise GridError(f"another runner is using {out} ({holder}); wait for it or choose another --out") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        lock.flush()
        for spec in [*pretraining.values(), *specs]:
            _check_same_command(spec, common)
        context = {
            "dataset": dataset,
            "profile": profile,
            "train_args": common,
            "git_commit": git_commit(),
            "versions": _versions(),
        }
        atomic_write_json(
            out / "grid.json",
            {"methods": list(methods), "labels": list(labels), "seeds": list(seeds), **context},
        )
        if pretraining:
            _run_specs(list(pretraining.values()), common, context, workers, poll_s, tty_every_s, stream)
            for spec in specs:
                if spec.pretrain is not None:
                    spec.init_from = pretrained_checkpoint(spec.pretrain)
        records = _run_specs(specs, common, context, workers, poll_s, tty_every_s, stream)
        from benchmarks.report import write_report  # pandas and matplotlib: not in the run subprocesses

        write_report([out], out, best=best, stream=stream)
    return records


def _run_specs(
    specs: list[RunSpec], common: list[str], context: dict[str, Any], workers: int, poll_s: float,
    tty_every_s: float, stream: IO[str],
) -> list[dict[str, Any]]:
    started = time.time()
    records: dict[int, dict[str, Any]] = {}
    pending: list[RunSpec] = []
    for spec in specs:
        if is_done(spec.run_dir):
            records[spec.index] = read_json(spec.run_dir / "result.json")
            print(f"{spec.name}  done, skipped", file=stream)
        elif spec.pretrain is not None and spec.init_from is None:
            reason = f"not run: its pretraining failed (see {spec.pretrain.run_dir}/train.log)"
            records[spec.index] = not_run(spec, reason, context)
            print(f"{spec.name}  {reason}", file=stream)
        else:
            pending.append(spec)
    print(f"{len(pending)} of {len(specs)} runs to do, {workers} at a time", file=stream, flush=True)
    state = GridState()
    running: list[Running] = []
    try:
        while pending or running:
            while pending and len(running) < workers:
                spec = pending.pop(0)
                atomic_write_json(spec.run_dir / "command.json", {"train_args": common})
                # Runs that will share the cores with this one: a grid's last run gets them all.
                sharing = min(workers, len(running) + 1 + len(pending))
                running.append(launch(spec, common, sharing, stream))
            time.sleep(poll_s)
            for run in list(running):
                exited = _reap(run.process)
                if exited is None:
                    continue
                running.remove(run)
                update_progress(run, state)
                record = finish(run, *exited, context)
                records[run.spec.index] = record
                if record["status"] == "ok" and record.get("fit_time_s") is not None:
                    state.overheads.append(record["wall_time_s"] - record["fit_time_s"])
                print(_result_line(run.spec, record), file=stream, flush=True)
            show_progress(running, pending, state, workers, stream, tty_every_s)
    except BaseException:
        # Ctrl-C or an error in the runner: stop the runs; each keeps its last checkpoint.
        for run in running:
            run.process.terminate()
        for run in running:
            try:
                run.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                run.process.kill()
        print(f"\ninterrupted; rerun the same command to resume {len(running) + len(pending)} run(s)", file=stream)
        raise
    failed = [r for r in records.values() if r.get("status") != "ok"]
    print(
        f"\n{len(specs)} runs, {len(failed)} failed, total wall time {format_duration(time.time() - started)}",
        file=stream,
        flush=True,
    )
    return [records[i] for i in sorted(records)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description="Train methods x label budgets x seeds and tabulate mIoU. Other --trainer.*, --model.*, "
        "--data.* and --config FILE arguments are passed to every run.",
        allow_abbrev=False,
    )
    parser.add_argument("--method", default="all", help="a method name, a comma list, or 'all' (default)")
    parser.add_argument(
        "--method-config", action="append", default=[], metavar="NAME=PATH",
        help="method NAME trains with the YAML PATH instead of configs/NAME.yaml (repeatable)",
    )
    parser.add_argument(
        "--labels", default="5,15,60",
        help="label budgets, comma-separated; 'all' labels every train image (default 5,15,60)",
    )
    parser.add_argument("--seeds", default="0", help="seeds, comma-separated (default 0)")
    parser.add_argument("--dataset", default="synthetic", choices=DATASETS)
    parser.add_argument("--data-root", default=None, help="dataset folder (all but synthetic)")
    parser.add_argument("--profile", default="default", choices=sorted(PROFILES))
    parser.add_argument("--out", default=None, help="result directory (default results/<dataset>-<profile>)")
    parser.add_argument("--workers", type=int, default=1, help="runs in parallel (default 1)")
    parser.add_argument("--best", action="store_true", help="tables use best-val mIoU instead of last-step")
    parser.add_argument(
        "--allow-random-init", action="store_true", help="let --profile paper run with encoder_weights None"
    )
    parser.add_argument("--poll", type=float, default=3.0, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: 0 when every run is ok, 1 when some failed, 2 on bad arguments or a held lock."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--train-and-test"]:
        return _train_and_test(argv[1:])
    args, extra = build_parser().parse_known_args(argv)
    try:
        method_configs = parse_method_configs(args.method_config)
        records = run_grid(
            resolve_methods(args.method, method_configs),
            parse_budgets(args.labels),
            parse_ints(args.seeds, "--seeds"),
            dataset=args.dataset,
            data_root=args.data_root,
            profile=args.profile,
            out=args.out,
            extra_args=extra,
            workers=args.workers,
            best=args.best,
            poll_s=args.poll,
            allow_random_init=args.allow_random_init,
            method_configs=method_configs,
        )
    except GridError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0 if all(r.get("status") == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
