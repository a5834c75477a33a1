"""2-process DDP fits on the CPU (gloo): the EMA teacher stays identical, mIoU is reduced over ranks,
and a resumed fit continues every rank exactly."""

import json
import subprocess
import sys

import torch

from tests.conftest import REPO, smoke_args


def fit_ddp(out, *extra):
    """A smoke ReCo fit on 2 CPU processes into ``out``."""
    args = smoke_args("reco", out, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                      "--trainer.accelerator", "cpu", *extra)
    done = subprocess.run([sys.executable, "-m", "src.train", "fit", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_ddp_two_processes_reco(tmp_path):
    # 5 steps, validating every 2: the final step is validated on both ranks all the same.
    fit_ddp(tmp_path, "--trainer.max_steps", "5", "--trainer.callbacks+=tests.ddp_probe.TeacherDigest",
            f"--trainer.callbacks.out_dir={tmp_path / 'probe'}")
    ranks = [json.loads((tmp_path / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["teacher"] == ranks[1]["teacher"]
    # val/miou is computed from confusion matrices summed over both ranks: one value, the same everywhere.
    assert ranks[0]["val_miou"] == ranks[1]["val_miou"]
    assert ranks[0]["val_history"] == ranks[1]["val_history"] and [s for s, _ in ranks[0]["val_history"]] == [2, 4, 5]
    # The checkpoint keeps each rank's random states, for an exact resume of every rank.
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert len(last["random_states"]) == 2
    # Each rank's process group is destroyed before the interpreter shuts down.
    for r in (0, 1):
        assert json.loads((tmp_path / "probe" / f"rank{r}_exit.json").read_text()) == {"process_group_alive": False}
    # Each rank draws its own labeled and unlabeled order.
    assert ranks[0]["first_batch"]["unlabeled"] != ranks[1]["first_batch"]["unlabeled"]
    assert set(ranks[0]["first_batch"]) == {"labeled", "unlabeled"}


def test_ddp_resumed_fit_ends_where_the_uninterrupted_fit_ends(tmp_path):
    # Each rank has its own streams and random states; restoring rank 0's on both would not do.
    snapshot = tmp_path / "step2.ckpt"
    fit_ddp(tmp_path / "whole", "--trainer.callbacks+=tests.resume_probe.SnapshotCheckpoint",
            "--trainer.callbacks.step=2", f"--trainer.callbacks.copy_to={snapshot}")
    fit_ddp(tmp_path / "resumed", "--ckpt_path", str(snapshot))
    whole, resumed = (torch.load(tmp_path / run / "run" / "checkpoints" / "last.ckpt", map_location="cpu",
                                 weights_only=True)["state_dict"] for run in ("whole", "resumed"))
    for name, tensor in whole.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
