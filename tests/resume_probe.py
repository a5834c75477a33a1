"""A callback for the resume tests, in a module of its own: importing `tests.conftest` (which sets
torch's thread count) from a training process would change its floating-point results."""

import shutil
from pathlib import Path

import pytorch_lightning as pl


class SnapshotCheckpoint(pl.Callback):
    """Copies ``last.ckpt`` as it is once step ``step`` is done: what a run killed then leaves behind."""

    def __init__(self, step: int, copy_to: str) -> None:
        self.step, self.copy_to = step, copy_to

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            shutil.copy(Path(trainer.default_root_dir) / "run" / "checkpoints" / "last.ckpt", self.copy_to)
