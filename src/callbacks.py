"""Lightning callbacks of the suite."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from src.utils import atomic_write_json


class ProgressFile(pl.Callback):
    """Writes ``progress.json`` (step, max_steps, elapsed seconds, last val mIoU) into the run directory.

    The benchmark runner reads it to show which run is going, its step and ETA. Written
    atomically every ``every_n_steps`` steps and after each validation, by rank 0 only.
    """

    def __init__(self, every_n_steps: int = 10) -> None:
        self.every_n_steps = every_n_steps
        self._start = time.time()
        self._start_step = 0
        self._path: Path | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._start_step = time.time(), trainer.global_step
        # `trainer.log_dir` broadcasts from rank 0: resolve it once, on every rank.
        self._path = Path(trainer.log_dir or trainer.default_root_dir) / "progress.json"
        self._write(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._write(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write(trainer)

    def _write(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero or self._path is None:
            return
        miou = trainer.callback_metrics.get("val/miou")
        atomic_write_json(
            self._path,
            {
                "step": int(trainer.global_step),
                "max_steps": int(trainer.max_steps),
                "start_step": self._start_step,
                "elapsed_s": time.time() - self._start,
                "val_miou": None if miou is None else float(miou),
            },
        )


class LastCheckpoint(pl.Callback):
    """Keeps ``<checkpoint dir>/last.ckpt`` equal to the newest weights, for resuming.

    Lightning's ``ModelCheckpoint(save_last=True)`` with a monitor only refreshes ``last.ckpt``
    when the monitored score improves, so a killed run would resume from its best step rather
    than its latest. This callback saves after every validation, every ``every_n_steps`` steps
    (0: never in between) and when training ends. Writes go through the trainer's checkpoint IO
    (atomic in this suite) on rank 0; every rank takes part, as Lightning requires.
    """

    FILENAME = "last.ckpt"

    def __init__(self, every_n_steps: int = 0) -> None:
        self.every_n_steps = every_n_steps
        self.path: Path | None = None
        self._saved_step = -1

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The ModelCheckpoint has resolved its directory (on every rank) in its setup by now. Not
        # `on_train_start`: a fit resumed from its final step trains nothing but reports the path.
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        root = Path(dirpath) if dirpath else Path(trainer.default_root_dir) / "checkpoints"
        self.path = root / self.FILENAME

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self._save(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)

    def _save(self, trainer: pl.Trainer) -> None:
        if self.path is None or self._saved_step == trainer.global_step or trainer.fast_dev_run:
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # a full checkpoint: resumable
        self._saved_step = trainer.global_step


class FinalValidation(pl.Callback):
    """Makes a fit validate at its last step (``trainer.max_steps``) whatever ``val_check_interval`` is.

    Lightning validates every ``val_check_interval`` steps, so with 2000 steps and an interval of
    300 the final weights would never be scored: "last" would be step 1800, and with fewer steps
    than the interval there would be no score and no best checkpoint at all. At the last step this
    callback sets ``trainer.should_stop``, and Lightning's training loop then runs its ordinary
    validation for that step (as it does for early stopping) unless the interval already lands on
    it: ModelCheckpoint, `LastCheckpoint`, `ProgressFile` and the loggers see a validation like any
    other. Every rank reaches the step together, so the ranks agree without a collective. A fit
    resumed from a checkpoint of its last step has no step left to train, so it validates nothing
    again. Needs validation to be on (``limit_val_batches`` > 0), a step-counted schedule
    (``check_val_every_n_epoch: null``, the suite's) and no ``min_steps`` beyond ``max_steps``.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class PhaseTimer(pl.Callback):
    """Records the wall time of each named phase of every training step (`SemiSupervisedModule.phase`).

    While attached (from ``setup`` to ``teardown``) it is the module's ``phase_recorder``; after each
    training step ``steps`` gets that step's ``{phase: seconds}``, and ``current`` holds the phases of
    the step under way. A phase opened inside another pauses the outer one, so every second counts
    once. On a GPU each phase boundary synchronises the device (queued kernels count where they were
    queued), which adds a little to every phase.
    """

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.current: dict[str, float] = {}
        self._open: list[list[Any]] = []  # [name, start] of each open phase, the innermost last
        self._cuda = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.phase_recorder = self
        self._cuda = trainer.strategy.root_device.type == "cuda"

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.phase_recorder = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.current = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.steps.append(self.current)
        self.current = {}  # phases outside a training step (validation) are not kept

    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _add(self, name: str, seconds: float) -> None:
        self.current[name] = self.current.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def timing(self, name: str) -> Iterator[None]:
        """Add the wall time of the enclosed code to phase ``name`` of the current step."""
        start = self._now()
        if self._open:  # pause the enclosing phase
            outer = self._open[-1]
            self._add(outer[0], start - outer[1])
        self._open.append([name, start])
        try:
            yield
        finally:
            end = self._now()
            self._add(name, end - self._open.pop()[1])
            if self._open:
                self._open[-1][1] = end


class RandomState(pl.Callback):
    """Saves the global random states with every checkpoint and puts them back when a fit resumes.

    Methods draw batch augmentation, mixing, loss sampling and dropout from the global generators
    (torch's CPU generator and the current CUDA device's; numpy's and Python's for any library that
    uses them). The checkpoint holds the states of every rank; a resumed fit restores its rank's at
    ``on_train_start``, after Lightning's seeding and set-up, so the next step draws what it would
    have drawn without the interruption. (The data streams need nothing: the datamodule derives
    their positions from the restored step.)
    """

    KEY = "random_states"

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        states = [random_states()]
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            # Every rank saves together (Lightning requires it), so the gather meets on all of them.
            states = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, random_states())
        checkpoint[self.KEY] = states

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get(self.KEY)
        if states:
            self._to_restore = states[trainer.global_rank % len(states)]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._to_restore is not None:
            set_random_states(self._to_restore)
            self._to_restore = None


def random_states() -> dict[str, Any]:
    """The states of torch's CPU and current CUDA generators, numpy's and Python's global generators.

    Tensors, strings and numbers only, so that ``torch.load(..., weights_only=True)`` (which
    LightningCLI uses on ``--ckpt_path``) still reads the checkpoint.
    """
    name, key, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(key.astype(np.int64)), position, has_gauss, cached_gaussian),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_random_states(states: dict[str, Any]) -> None:
    """Restore what `random_states` returned."""
    torch.set_rng_state(states["torch"])
    name, key, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
