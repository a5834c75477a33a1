"""Single runs: ``python -m src.train fit --config configs/supervised.yaml [--data.num_labeled 15 ...]``.

A LightningCLI over any method (``model.class_path``) and the datamodule its YAML names
(``data.class_path``: `SupervisedDataModule` or `SemiSupervisedDataModule`; the short forms
``--data.num_labeled 15`` set its arguments). The CLI links the dataset's class count, ignore
index and class names into the model, the crop size into the sliding-window size, and
``seed_everything`` into the label split's seed.
After ``fit`` it prints the validation mIoU and where the logs and checkpoints are, and
writes ``metrics.json`` into the run directory (atomically).
"""

from __future__ import annotations

import logging
import math
import os
import resource
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from jsonargparse import ArgumentError
from pytorch_lightning.cli import LightningCLI

import src.pl_modules  # noqa: F401  (registers every method for short class_path names)
from src.callbacks import FinalValidation, LastCheckpoint, ProgressFile, RandomState
from src.datamodules import SegmentationDataModule
from src.pl_modules import SemiSupervisedModule
from src.utils import AtomicCheckpointIO, atomic_write_json, scalar_metrics


class _DropLightningAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip: For seamless cloud")


_DROP_ADVERTS = _DropLightningAdverts()


def quiet_lightning() -> None:
    """Drop what Lightning prints that a user of this CLI cannot act on (called at import).

    Its adverts for its cloud products ("Tip: For seamless cloud logging / uploads ..."); torch's
    deprecation of a pytree idiom that Lightning itself still uses; and its warning that the
    module's `on_after_batch_transfer` (which turns the loaders' uint8 images into floats, on
    purpose) is used although a datamodule is given; and its warning that `main`'s ``args`` and the
    caller's own command line are both present (benchmarks/run.py and src.pretrain pass ``args``,
    which replace that command line by design).
    """
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if _DROP_ADVERTS not in logger.filters:
        logger.addFilter(_DROP_ADVERTS)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
    warnings.filterwarnings(
        "ignore", message="You have overridden `on_after_batch_transfer` in `LightningModule` but have passed in a"
    )
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")


quiet_lightning()


class SemiSegCLI(LightningCLI):
    """LightningCLI with the suite's links, checkpointing defaults and run summary."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/miou",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best",
                # last.ckpt is kept by LastCheckpoint: Lightning's refreshes it only on improvement.
                "checkpoint.save_last": False,
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.ignore_index", "model.init_args.ignore_index", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")
        # In subclass mode a link read at parse time names ``init_args`` (those above read the instance).
        parser.link_arguments("data.init_args.crop_size", "model.init_args.eval_window")
        parser.link_arguments("data.init_args.scale_range", "model.init_args.scale_range")
        parser.link_arguments("seed_everything", "data.init_args.seed", compute_fn=_seed_value)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as exc:
            # jsonargparse says only that the abstract base cannot be built.
            if 'Parser key "data"' in str(exc) and "is abstract" in str(exc):
                names = sorted(cls.__name__ for cls in SegmentationDataModule.__subclasses__())
                raise ValueError(f"data.class_path is not set: name the datamodule, one of {names}") from exc
            raise

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        trainer.callbacks.extend([ProgressFile(), LastCheckpoint(), RandomState(), FinalValidation()])
        return trainer

    def before_fit(self) -> None:
        self._fit_started = time.time()

    def after_fit(self) -> None:
        summary = run_summary(self.trainer, self.model, time.time() - self._fit_started)
        if self.trainer.is_global_zero:
            atomic_write_json(Path(summary["run_dir"]) / "metrics.json", summary)
            monitor = getattr(self.trainer.checkpoint_callback, "monitor", None) or "val/miou"
            if monitor == "val/miou":
                score = (f"val mIoU: {summary['val_miou_last']:.2f} (last step), {summary['val_miou_best']:.2f} "
                         f"(best, step {summary['best_step']})")
            else:  # e.g. reconstruction pretraining, which has no mIoU
                score = f"{monitor}: {summary['metrics'].get(monitor, float('nan')):.4f} (last step)"
            print(
                f"\n{score}\n"
                f"TensorBoard logs: {summary['run_dir']}  (tensorboard --logdir {summary['run_dir']})\n"
                f"checkpoints: {summary['best_checkpoint']} (best), {summary['last_checkpoint']} (last)",
                flush=True,
            )


def _seed_value(seed: Any) -> int:
    return int(seed) if not isinstance(seed, bool) else 0


def run_summary(trainer: pl.Trainer, model: SemiSupervisedModule, wall_time_s: float) -> dict[str, Any]:
    """Final and best validation metrics of a finished fit, its validation history, and where its files are.

    ``val_miou_last`` is the score of the final step (NaN if that step was not validated), and
    ``val_miou_at_80pct`` the one of the validation nearest to 80 % of the steps (`miou_at_80pct`).
    """
    metrics = fit_metrics(trainer, model)
    steps = int(trainer.global_step)
    history = list(model.val_history)
    last_step, last_miou = history[-1] if history else (-1, float("nan"))
    checkpoint = trainer.checkpoint_callback
    last = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
    last_iou = getattr(model, "last_val_iou", None)
    run_dir = trainer.log_dir or trainer.default_root_dir
    peak_cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {
        "method": model.name,
        "run_dir": str(Path(run_dir).resolve()),
        "steps": steps,
        "val_miou_last": last_miou if last_step == steps else float("nan"),
        "val_miou_at_80pct": miou_at_80pct(history, steps),
        "val_miou_best": float(model.best_miou),
        "best_step": int(model.best_step),
        "val_iou_last": dict(zip(model.class_names, _floats(last_iou))) if last_iou is not None else {},
        # The last pseudo-label diagnostics, for methods with an unlabeled loss: diag/mask_ratio -> diag_mask_ratio.
        **{name.replace("/", "_"): value for name, value in metrics.items() if name.startswith("diag/")},
        "metrics": metrics,
        "val_history": [{"step": step, "miou": miou} for step, miou in history],
        "best_checkpoint": str(checkpoint.best_model_path) if checkpoint else None,
        "last_checkpoint": str(last.path) if last and last.path else None,
        "wall_time_s": wall_time_s,
        "peak_cuda_memory_bytes": peak_cuda,
        # Peak resident memory of this process (Linux reports KiB).
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def fit_metrics(trainer: pl.Trainer, model: SemiSupervisedModule) -> dict[str, float]:
    """The scalar metrics a fit logged; for a fit resumed from its final step (nothing left to
    train or validate), those its checkpoint recorded."""
    return scalar_metrics(trainer.callback_metrics) or dict(model.checkpoint_metrics)


def miou_at_80pct(history: Sequence[tuple[int, float]], steps: int) -> float:
    """mIoU of the validation nearest to 80 % of ``steps`` (of two as near, the earlier); NaN without one.

    Beside the final step's score it shows whether a run was still improving when it ended.

    Args:
        history: (step, mIoU) of each validation.
        steps: The run's last step.
    """
    if not history:
        return float("nan")
    # 5 * |step - 0.8 * steps|, in integers so that ties are exact.
    _, miou = min(history, key=lambda entry: (abs(5 * entry[0] - 4 * steps), entry[0]))
    return miou


def _floats(t: torch.Tensor) -> list[float | None]:
    return [None if math.isnan(v) else v * 100 for v in t.tolist()]


def main(args: list[str] | None = None, run: bool = True) -> SemiSegCLI:
    """Build the CLI (and run its subcommand when ``run``); ``args`` replaces ``sys.argv[1:]``."""
    return SemiSegCLI(
        SemiSupervisedModule,
        SegmentationDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "max_steps": 1500,
            "val_check_interval": 250,
            "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0,
            # The datamodule's streams are rank-aware and its eval loaders shard themselves.
            "use_distributed_sampler": False,
            "log_every_n_steps": 10,
        },
        # Parse errors raise (instead of printing usage and exiting) so `cli_entry` can shorten them.
        parser_kwargs={"exit_on_error": False},
        args=args,
        run=run,
    )


def one_line(message: str) -> str:
    """The informative line of an error message (parser errors list every union member they tried)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if any(line.startswith("Original Traceback") for line in lines):
        # Raised in a data-loader worker: the last line is "module.ErrorType: message".
        return lines[-1].split(": ", 1)[-1]
    tried = [line[2:] for line in lines if line.startswith("- ") and "Expected a <class 'NoneType'>" not in line]
    if tried:
        return tried[0]
    return lines[0] if lines else message


def cli_entry(args: list[str] | None = None) -> int:
    """Console entry: bad input ends with one clear ``error:`` line and exit code 2.

    Set ``SEMISEG_DEBUG=1`` for the full traceback.
    """
    try:
        main(args)
    except (ValueError, ArgumentError) as exc:
        if os.environ.get("SEMISEG_DEBUG"):
            raise
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    release_process_group()
    return 0


def release_process_group() -> None:
    """Destroy the DDP process group Lightning leaves up; call it after a successful run only.

    Left to the interpreter's shutdown, gloo's threads can still hold tensors, and a finished run
    sometimes aborts ("terminate called without an active exception"). After a failure, ranks
    stuck in a collective could hang here instead.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(cli_entry())
