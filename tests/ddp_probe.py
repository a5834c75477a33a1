"""A callback for the DDP test: each rank writes a digest of its teacher weights and its metrics,
and at exit whether its process group was still up (it must not be: see `src.train.release_process_group`)."""

import atexit
import hashlib
import json
from pathlib import Path

import pytorch_lightning as pl
import torch


class TeacherDigest(pl.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.first_batch: dict[str, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.first_batch:
            self.first_batch = {stream: b["index"].tolist() for stream, b in batch.items()}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(pl_module.teacher.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "teacher": digest.hexdigest(),
            "val_miou": float(trainer.callback_metrics["val/miou"]),
            "val_history": pl_module.val_history,
            "first_batch": self.first_batch,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
        atexit.register(self.write_exit_state, trainer.global_rank)

    def write_exit_state(self, rank: int) -> None:
        alive = torch.distributed.is_initialized()
        (self.out_dir / f"rank{rank}_exit.json").write_text(json.dumps({"process_group_alive": alive}))
