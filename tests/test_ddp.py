"""A 2-process DDP fit on the CPU (gloo): the EMA teacher stays identical and mIoU is reduced over ranks."""

import json
import subprocess
import sys

from tests.conftest import REPO, smoke_args


def test_ddp_two_processes_reco(tmp_path):
    # 5 steps, validating every 2: the final step is validated on both ranks all the same.
    args = smoke_args("reco", tmp_path, "--trainer.max_steps", "5") + [
        "--trainer.strategy", "ddp",
        "--trainer.devices", "2",
        "--trainer.accelerator", "cpu",
        "--trainer.callbacks+=tests.ddp_probe.TeacherDigest",
        f"--trainer.callbacks.out_dir={tmp_path / 'probe'}",
    ]
    done = subprocess.run([sys.executable, "-m", "src.train", "fit", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["teacher"] == ranks[1]["teacher"]
    # val/miou is computed from confusion matrices summed over both ranks: one value, the same everywhere.
    assert ranks[0]["val_miou"] == ranks[1]["val_miou"]
    assert ranks[0]["val_history"] == ranks[1]["val_history"] and [s for s, _ in ranks[0]["val_history"]] == [2, 4, 5]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    # Each rank's process group is destroyed before the interpreter shuts down.
    for r in (0, 1):
        assert json.loads((tmp_path / "probe" / f"rank{r}_exit.json").read_text()) == {"process_group_alive": False}
    # Each rank draws its own labeled and unlabeled order.
    assert ranks[0]["first_batch"]["unlabeled"] != ranks[1]["first_batch"]["unlabeled"]
    assert set(ranks[0]["first_batch"]) == {"labeled", "unlabeled"}
