"""Adding a method needs no edit in benchmarks/: a method made up here, registered for the test and
given its YAML in tmp_path, goes through bench_step.py and run.py's quick profile."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from torch import Tensor

from benchmarks import bench_step
from benchmarks.run import main as run_main
from src.pl_modules import METHODS, SemiSupervisedModule
from src.pl_modules.timing import StepFloor
from tests.conftest import SMOKE

TOY_YAML = """\
model:
  class_path: tests.benchmarks.test_adding_a_method.ToyMethod
  init_args: {unsup_weight: 0.5}
data:
  class_path: SemiSupervisedDataModule
  init_args: {dataset: synthetic, num_labeled: 5}
"""


class ToyMethod(SemiSupervisedModule):
    """A made-up method: the student's own eval-mode labels of each unlabeled image teach it the flipped image.

    Args:
        unsup_weight: Weight of the unlabeled loss.
        **kwargs: Shared options of `SemiSupervisedModule`.
    """

    name = "toy"
    uses_unlabeled = True
    step_floor = StepFloor(passes=(1, 1), eval_forwards=1)  # labeled, then unlabeled; the labelling forward

    def __init__(self, unsup_weight: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)

    @torch.no_grad()
    def pseudo_labels(self, images: Tensor) -> tuple[Tensor, Tensor]:
        with self.phase("teacher"):
            labels = self.forward_in_mode(self.student, images, train=False).argmax(dim=1)
        return labels, torch.ones_like(labels, dtype=torch.bool)

    def compute_losses(self, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        images_l, masks_l = batch["labeled"]["image"], batch["labeled"]["mask"]
        images_u = batch["unlabeled"]["image"]
        pseudo_labels, _ = self.pseudo_labels(images_u)
        with self.phase("mix+aug"):
            images_u, pseudo_labels = images_u.flip(-1), pseudo_labels.flip(-1)
        loss_sup = self.supervised_loss(self.student(images_l), masks_l)
        loss_unsup = self.supervised_loss(self.student(images_u), pseudo_labels)
        loss = loss_sup + self.hparams.unsup_weight * loss_unsup
        return {"loss": loss, "loss_sup": loss_sup.detach(), "loss_unsup": loss_unsup.detach()}


@pytest.fixture
def toy_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setitem(METHODS, ToyMethod.name, ToyMethod)
    path = tmp_path / "toy.yaml"
    path.write_text(TOY_YAML)
    return path


def test_bench_step_times_a_new_method_against_the_floor_it_declares(toy_yaml, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = bench_step.main([
        "--methods", "toy", "--method-config", f"toy={toy_yaml}", "--config", SMOKE, "--crop", "32", "--steps", "2",
        "--warmup", "1", "--workers", "0", "--threads", "1", "--json", str(out),
    ])
    assert code == 0
    saved = json.loads(out.read_text())
    assert set(saved["rounds"]) == {"supervised", "toy", "floor 1,1:1"}
    toy = next(r for r in saved["results"] if r["method"] == "toy")
    # Its phases, recorded from inside; the floor's step runs the network as the toy does.
    assert toy["teacher"] > 0 and toy["mix+aug"] > 0 and toy["contrast"] == 0
    assert toy["grad_passes"] == [8, 8] and toy["eval_passes"] == [8]
    assert toy["floor_s"] == saved["rounds"]["floor 1,1:1"][0] and toy["x_floor"] == toy["step_s"] / toy["floor_s"]
    assert "| toy |" in capsys.readouterr().out


def test_run_grid_trains_a_new_method_with_the_quick_profile(toy_yaml, tmp_path):
    out = tmp_path / "out"
    args = ["--method", "toy", "--method-config", f"toy={toy_yaml}", "--labels", "5", "--profile", "quick",
            "--out", str(out), "--poll", "0.2", "--config", SMOKE]
    assert run_main(args) == 0
    record = json.loads((out / "runs" / "toy" / "labels5" / "seed0" / "result.json").read_text())
    assert record["status"] == "ok" and record["steps"] == 4 and record["profile"] == "quick"
    assert record["protocol"]["crop_size"] == 32 and record["protocol"]["batch_size_unlabeled"] == 2
    assert 0.0 <= record["diag_mask_ratio"] <= 1.0  # its pseudo-labels were scored at validation
    runs = pd.read_csv(out / "runs.csv")
    assert runs["method"].tolist() == ["toy"] and runs["test_miou"].notna().all()
