"""The benchmark runner end to end on tiny runs (configs/smoke.yaml through the passthrough)."""

from __future__ import annotations

import fcntl
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from benchmarks.run import (
    ALL_LABELS,
    GridError,
    GridState,
    Running,
    RunSpec,
    check_passthrough,
    config_hashes,
    encoder_weights,
    budget_name,
    format_duration,
    PROTOCOL_COLUMNS,
    main,
    method_args,
    parse_budget,
    parse_budgets,
    profile_args,
    protocol,
    resolve_methods,
    run_command,
    run_directory,
    run_grid,
    show_progress,
)
from tests.conftest import REPO, SMOKE

TINY = ["--config", SMOKE]
# Long enough to be killed midway: 40 steps, validation (and so checkpoints) every 2.
LONG = [*TINY, "--trainer.max_steps", "40", "--trainer.val_check_interval", "2"]


def run_dir(out: Path, method: str, labels: int, seed: int = 0) -> Path:
    return out / "runs" / method / f"labels{budget_name(labels)}" / f"seed{seed}"


def result(out: Path, method: str, labels: int, seed: int = 0) -> dict:
    return json.loads((run_dir(out, method, labels, seed) / "result.json").read_text())


def test_grid_runs_skips_finished_and_redoes_a_missing_result(tmp_path: Path) -> None:
    out = tmp_path / "out"
    grid = dict(out=out, extra_args=TINY, workers=2, poll_s=0.2)
    methods, budgets = ["supervised", "mean_teacher"], [5, 10]

    stream = io.StringIO()
    records = run_grid(methods, budgets, **grid, stream=stream)
    assert [(r["method"], r["labels"], r["status"]) for r in records] == [
        ("supervised", 5, "ok"), ("supervised", 10, "ok"), ("mean_teacher", 5, "ok"), ("mean_teacher", 10, "ok"),
    ]
    first = records[0]
    assert first["steps"] == 4 and first["seed"] == 0 and first["resumed_from"] is None
    assert 0.0 <= first["val_miou_last"] <= 100.0 and first["test_miou"] is not None
    assert set(first["val_iou_last"]) == set(first["test_iou"]) and len(first["val_iou_last"]) == 8
    assert first["protocol"]["encoder"] == "tu-test_resnet" and first["protocol"]["max_steps"] == 4
    assert first["protocol"]["lr_power"] == 1.3  # the method YAML's schedule
    assert first["protocol"]["encoder_weights"] is None and first["protocol"]["split_seed"] == 0
    assert first["protocol"]["dataset"] == "synthetic" and first["protocol"]["crop_size"] == 32
    assert first["git_commit"] and first["peak_rss_bytes"] > 0 and first["wall_time_s"] > 0
    # Budgets differ in the run config, not in the settings the table compares.
    assert records[0]["config_hash"] != records[1]["config_hash"]
    assert records[0]["settings_hash"] == records[1]["settings_hash"] != records[2]["settings_hash"]
    log = stream.getvalue()
    assert "[4/4] mean_teacher labels=10 seed=0  ok" in log and "0 failed" in log
    summary = (out / "summary.md").read_text()
    assert "| supervised |" in summary and "| mean_teacher |" in summary and "–" not in summary
    assert (out / "runs.csv").read_text().count("\n") == 5
    # Pseudo-label diagnostics: the last validation's, for methods with an unlabeled loss; empty for the others.
    assert 0.0 <= records[2]["diag_mask_ratio"] <= 1.0 and "diag_mask_ratio" not in records[0]
    diagnostics = pd.read_csv(out / "runs.csv").set_index("method")[["diag_pseudo_acc", "diag_mask_ratio"]]
    assert diagnostics.loc["supervised"].isna().all().all() and diagnostics.loc["mean_teacher"].notna().all().all()
    assert (out / "miou_vs_labels.png").is_file()

    # The same command again: nothing is retrained.
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/*/result.json")}
    assert len(mtimes) == 4
    stream = io.StringIO()
    again = run_grid(methods, budgets, **grid, stream=stream)
    assert [r["val_miou_last"] for r in again] == [r["val_miou_last"] for r in records]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert stream.getvalue().count("done, skipped") == 4 and "0 of 4 runs to do" in stream.getvalue()

    # A run without its result is done again; the others are not.
    redo = run_dir(out, "supervised", 10) / "result.json"
    redo.unlink()
    stream = io.StringIO()
    run_grid(methods, budgets, **grid, stream=stream)
    changed = [p for p in mtimes if not p.exists() or p.stat().st_mtime_ns != mtimes[p]]
    assert changed == [redo] and "1 of 4 runs to do" in stream.getvalue()
    redone = result(out, "supervised", 10)
    assert redone["status"] == "ok" and redone["steps"] == 4
    assert redone["resumed_from"]["checkpoint"].endswith("checkpoints/last.ckpt")  # it had a checkpoint
    # That checkpoint is from after the final validation: nothing is validated again, the summary
    # is the one it recorded.
    for key in ("val_miou_last", "val_miou_at_80pct", "val_history", "val_iou_last", "metrics", "best_checkpoint"):
        assert redone[key] == records[1][key], key


def test_recon_pretrains_once_per_seed_and_initialises_every_budget(tmp_path: Path) -> None:
    out = tmp_path / "out"
    grid = dict(out=out, extra_args=TINY, workers=2, poll_s=0.2)
    stream = io.StringIO()
    records = run_grid(["recon+supervised"], [5, 10], **grid, stream=stream)
    assert [(r["method"], r["labels"], r["status"]) for r in records] == [
        ("recon+supervised", 5, "ok"), ("recon+supervised", 10, "ok"),
    ]
    pretrain = out / "pretrain" / "recon" / "seed0"
    pretrained = json.loads((pretrain / "result.json").read_text())
    assert pretrained["status"] == "ok" and pretrained["method"] == "recon" and pretrained["steps"] == 4
    assert "val/loss" in pretrained["metrics"] and "val/miou" not in pretrained["metrics"]
    split = json.loads((pretrain / "split.json").read_text())
    assert split["num_labeled"] == 0 and len(split["labeled_ids"]) == 40  # every train image of the smoke data
    best = pretrain / "checkpoints" / "best.ckpt"
    for record in records:
        config = yaml.safe_load((Path(record["run_dir"]) / "config.yaml").read_text())
        assert config["model"]["class_path"].endswith("Supervised")
        assert config["model"]["init_args"]["init_from"] == str(best)
        log = (Path(record["run_dir"]) / "train.log").read_text()
        assert "model.init_from" in log and "model.segmentation_head.0.weight" in log
    assert records[0]["settings_hash"] == records[1]["settings_hash"]
    log = stream.getvalue()
    assert "[1/3] recon pretraining seed=0  ok  val loss" in log
    assert "[3/3] recon+supervised labels=10 seed=0  ok" in log
    assert list((out / "runs").iterdir()) == [out / "runs" / "recon+supervised"]
    assert "| recon+supervised |" in (out / "summary.md").read_text()

    # Again: nothing is retrained, the pretraining included.
    stream = io.StringIO()
    run_grid(["recon+supervised"], [5, 10], **grid, stream=stream)
    assert stream.getvalue().count("done, skipped") == 3

    # A failed pretraining: its budgets are recorded as failed without being started.
    failed_out = tmp_path / "failed"
    bad = [*TINY, "--model.init_args.ssim_weight", "-1"]  # only Recon has it: refused at construction
    again = run_grid(["recon+supervised"], [5], out=failed_out, extra_args=bad, poll_s=0.2, stream=io.StringIO())
    assert json.loads((failed_out / "pretrain" / "recon" / "seed0" / "result.json").read_text())["status"] == "failed"
    assert again[0]["status"] == "failed" and "its pretraining failed" in again[0]["error"]
    assert not (Path(again[0]["run_dir"]) / "train.log").exists()


def test_labels_all_is_the_last_budget_name_and_its_own_run_directory(tmp_path: Path) -> None:
    assert parse_budgets("5,15,60,all") == [5, 15, 60, ALL_LABELS]
    assert parse_budgets("all") == parse_budgets(" all ") == parse_budgets("0") == [ALL_LABELS]
    assert parse_budgets("all,5,all") == [ALL_LABELS, 5]
    assert parse_budget("all") == parse_budget(0) == ALL_LABELS and parse_budget("15") == parse_budget(15) == 15
    for bad in ("", "5,x", "-1", "5,al", "1.5"):
        with pytest.raises(GridError, match="comma-separated integers >= 1 or 'all'"):
            parse_budgets(bad)
    assert budget_name(ALL_LABELS) == "all" and budget_name(15) == "15"
    runs = tmp_path / "runs"
    assert run_directory(tmp_path, "supervised", ALL_LABELS, 2) == runs / "supervised" / "labelsall" / "seed2"
    assert run_directory(tmp_path, "reco", 15, 0) == runs / "reco" / "labels15" / "seed0"
    spec = RunSpec(3, 4, "supervised", ALL_LABELS, 1, tmp_path / "run")
    assert spec.name == "[3/4] supervised labels=all seed=1"
    command = run_command(spec, [], resume=None)
    assert command[command.index("--data.num_labeled") + 1] == "0"  # the datamodule's "every image"


def test_labels_all_runs_supervised_and_semi_supervised_methods(tmp_path: Path) -> None:
    out = tmp_path / "out"
    stream = io.StringIO()
    records = run_grid(["supervised", "mean_teacher"], [ALL_LABELS], out=out, extra_args=TINY, workers=2,
                       poll_s=0.2, stream=stream)
    assert [(r["method"], r["labels"], r["status"]) for r in records] == [
        ("supervised", ALL_LABELS, "ok"), ("mean_teacher", ALL_LABELS, "ok"),
    ]
    for record in records:
        assert Path(record["run_dir"]) == run_dir(out, record["method"], ALL_LABELS)
        split = json.loads((Path(record["run_dir"]) / "split.json").read_text())
        assert len(split["labeled_ids"]) == 40  # every train image of the smoke data
        # 4 steps validated every 2: the validation nearest to step 3.2 is the final one.
        assert [entry["step"] for entry in record["val_history"]] == [2, 4]
        assert record["val_miou_at_80pct"] == record["val_miou_last"] == record["val_history"][-1]["miou"]
    assert "[2/2] mean_teacher labels=all seed=0  ok" in stream.getvalue()
    assert "| method | all |" in (out / "summary.md").read_text()
    assert set(pd.read_csv(out / "runs.csv")["labels"]) == {"all"}


def test_method_names() -> None:
    assert "recon" not in resolve_methods("all") and "supervised" in resolve_methods("all")
    assert resolve_methods("supervised,recon+supervised") == ["supervised", "recon+supervised"]
    for bad in ("recon", "recon+recon", "supervised+supervised", "recon+nope"):
        with pytest.raises(GridError, match="recon\\+supervised"):
            resolve_methods(bad)


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--method", "supervised", "--labels", "5", "--out", str(out), "--poll", "0.2", *LONG]
    log = open(tmp_path / "runner.log", "w")
    runner = subprocess.Popen(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), *args],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    directory = run_dir(out, "supervised", 5)
    deadline = time.time() + 120
    while not (directory / "checkpoints" / "last.ckpt").exists():
        assert runner.poll() is None, (tmp_path / "runner.log").read_text()
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    # SIGKILL the runner only: its training subprocess must not outlive it.
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    log.close()
    deadline = time.time() + 20
    while True:
        try:
            os.killpg(runner.pid, 0)
        except ProcessLookupError:
            break
        assert time.time() < deadline, "the training subprocess survived its runner"
        time.sleep(0.1)
    assert not (directory / "result.json").exists() and not (directory / "metrics.json").exists()

    stream = io.StringIO()
    records = run_grid(["supervised"], [5], out=out, extra_args=LONG, poll_s=0.2, stream=stream)
    record = records[0]
    assert record["status"] == "ok" and record["steps"] == 40
    assert record["resumed_from"]["checkpoint"] == str(directory / "checkpoints" / "last.ckpt")
    assert 2 <= record["resumed_from"]["step"] < 40
    assert json.loads((directory / "progress.json").read_text())["start_step"] == record["resumed_from"]["step"]
    assert f"Restoring states from the checkpoint path at {directory}/checkpoints/last.ckpt" in (
        directory / "train.log"
    ).read_text()
    assert "resuming from step" in stream.getvalue()
    summary = (out / "summary.md").read_text()
    assert "| supervised |" in summary and "failed" not in summary


def test_failed_run_is_recorded_and_sets_the_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["--method", "supervised", "--labels", "9999", "--out", str(out), "--poll", "0.2", *TINY]) == 1
    record = result(out, "supervised", 9999)
    assert record["status"] == "failed" and record["returncode"] != 0
    assert "num_labeled=9999" in record["error"]
    assert "FAILED" in capsys.readouterr().out
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# Dataset synthetic, profile default")
    assert "| supervised | – (n=0, 1 failed) |" in summary and "1 failed run(s)" in summary


def test_second_runner_on_the_same_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["--method", "supervised", "--labels", "5", "--out", str(out), *TINY]) == 2
    assert "another runner is using" in capsys.readouterr().err
    assert not (out / "runs").exists()


def test_other_arguments_of_the_same_directory_are_refused(tmp_path: Path) -> None:
    directory = run_dir(tmp_path, "supervised", 5)
    directory.mkdir(parents=True)
    (directory / "command.json").write_text(json.dumps({"train_args": ["--trainer.max_steps", "8"]}))
    with pytest.raises(GridError, match="other training arguments"):
        run_grid(["supervised"], [5], out=tmp_path, extra_args=TINY, stream=io.StringIO())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--trainer.default_root_dir", "x"], "set by the runner"),
        (["--data.num_labeled", "3"], "set by the runner"),
        (["--seed_everything", "3"], "set by the runner"),
        (["--frobnicate", "3"], "unknown argument"),
        (["--profile", "paper"], "not 'synthetic'"),
        (["--dataset", "pascal_voc"], "needs --data-root"),
        (["--labels", "5,x"], "comma-separated integers"),
        (["--method", "nope"], "unknown ['nope']"),
        (["--workers", "0"], "--workers must be >= 1"),
        (["--method-config", "supervised=nowhere.yaml"], "expected NAME=PATH with an existing YAML file"),
    ],
)
def test_bad_arguments(argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--method", "supervised", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_paper_profile_refuses_a_random_init_encoder_unless_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    paper = ["--method", "supervised", "--dataset", "pascal_voc", "--data-root", str(tmp_path), "--profile", "paper",
             "--out", str(out)]
    random_init = ["--model.init_args.encoder_weights", "null"]
    # A held lock stops any grid that gets past the check before it trains.
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main([*paper, *random_init]) == 2
        err = capsys.readouterr().err
        assert "encoder_weights None" in err and "pretrained" in err and "--allow-random-init" in err
        imagenet_again = ["--model.encoder_weights=null", "--model.init_args.encoder_weights", "imagenet"]
        for allowed in ([], [*random_init, "--allow-random-init"], imagenet_again):
            assert main([*paper, *allowed]) == 2
            assert "another runner is using" in capsys.readouterr().err
    assert not (out / "runs").exists()


def test_encoder_weights_after_configs_and_flags(tmp_path: Path) -> None:
    paper = ["--config", "configs/supervised.yaml", *profile_args("paper", "pascal_voc", "/data/voc")]
    assert encoder_weights(paper) == "imagenet"
    override = tmp_path / "random_init.yaml"
    override.write_text("model:\n  init_args:\n    encoder_weights: null\n")
    assert encoder_weights([*paper, "--config", str(override)]) is None
    assert encoder_weights([*paper, "--config", str(override), "--model.encoder_weights", "ssl"]) == "ssl"
    # Every form the CLI takes: a config without init_args, the arguments as one dict.
    override.write_text("model:\n  encoder_weights: null\n")
    assert encoder_weights([*paper, "--config", str(override)]) is None
    assert encoder_weights([*paper, "--model.init_args", "{encoder_weights: null}"]) is None
    with pytest.raises(GridError, match="Supervised"):  # the CLI refuses an unknown option
        encoder_weights([*paper, "--model.init_args.encoder_weight", "imagenet"])


def test_profiles_and_passthrough() -> None:
    assert profile_args("default", "synthetic") == []
    quick = profile_args("quick", "synthetic")
    assert quick[quick.index("--trainer.max_steps") + 1] == "30"
    paper = profile_args("paper", "pascal_voc", "/data/voc")
    assert paper[:2] == ["--config", "configs/data/pascal_voc.yaml"] and "/data/voc" in paper
    assert profile_args("quick", "folder", "/d")[:2] == ["--config", "configs/data/folder.yaml"]
    with pytest.raises(GridError):
        profile_args("paper", "folder", "/d")
    assert check_passthrough(["--trainer.devices", "2", "--trainer.precision=bf16-mixed"]) == [
        "--trainer.devices", "2", "--trainer.precision=bf16-mixed",
    ]
    assert check_passthrough(["--config", SMOKE]) == ["--config", SMOKE]


def test_reco_gets_the_paper_settings_on_real_datasets_only(tmp_path: Path) -> None:
    reco_yaml = yaml.safe_load((REPO / "configs" / "reco.yaml").read_text())
    assert reco_yaml["model"]["init_args"]["num_queries"] == 128  # the CPU profile's choice
    c3_yaml = yaml.safe_load((REPO / "configs" / "c3semiseg.yaml").read_text())
    assert c3_yaml["model"]["init_args"]["consistency"]["weight"] == 50.0  # the reference's, everywhere
    assert method_args("synthetic", "reco") == method_args("synthetic", "c3semiseg") == ()
    assert method_args("synthetic", "supervised") == method_args("pascal_voc", "supervised") == ()
    for dataset in ("pascal_voc", "cityscapes", "folder"):
        assert method_args(dataset, "reco") == ("--model.init_args.num_queries", "256")
        assert method_args(dataset, "c3semiseg") == ()
    # After the dataset overlay and the passthrough, so that they win over both YAMLs.
    spec = RunSpec(1, 1, "reco", 60, 0, tmp_path / "run", method_args=method_args("pascal_voc", "reco"))
    common = profile_args("paper", "pascal_voc", "/data/voc")
    command = run_command(spec, common, resume=None)
    assert command.index("--model.init_args.num_queries") > command.index(common[-1])
    assert command[command.index("--model.init_args.num_queries") + 1] == "256"


def test_config_hash_ignores_run_paths_and_settings_hash_ignores_budget() -> None:
    base = {
        "seed_everything": 0,
        "trainer": {"max_steps": 10, "default_root_dir": "/a", "logger": {"init_args": {"save_dir": "/a"}}},
        "data": {"num_labeled": 5, "seed": 0},
        "model": {"init_args": {"init_from": "/out/pretrain/recon/seed0/checkpoints/best.ckpt"}},
        "ckpt_path": None,
    }
    moved = json.loads(json.dumps(base))
    moved["trainer"]["default_root_dir"], moved["ckpt_path"] = "/b", "/b/last.ckpt"
    assert config_hashes(base) == config_hashes(moved)
    other_budget = json.loads(json.dumps(base))
    other_budget["data"]["num_labeled"], other_budget["seed_everything"] = 15, 1
    other_budget["model"]["init_args"]["init_from"] = "/out/pretrain/recon/seed1/checkpoints/best.ckpt"
    assert config_hashes(base)[0] != config_hashes(other_budget)[0]
    assert config_hashes(base)[1] == config_hashes(other_budget)[1]
    longer = json.loads(json.dumps(base))
    longer["trainer"]["max_steps"] = 20
    assert config_hashes(base)[1] != config_hashes(longer)[1]


def test_settings_hash_ignores_budget_and_seed_of_a_named_datamodule() -> None:
    def config(num_labeled: int, seed: int) -> dict:
        return {"seed_everything": seed, "trainer": {"max_steps": 10},
                "data": {"class_path": "src.datamodules.SemiSupervisedDataModule",
                         "init_args": {"num_labeled": num_labeled, "seed": seed, "crop_size": 32}}}

    assert config_hashes(config(5, 0))[0] != config_hashes(config(15, 1))[0]
    assert config_hashes(config(5, 0))[1] == config_hashes(config(15, 1))[1]


def test_protocol_columns_read_the_datamodule_arguments_whether_nested_or_flat() -> None:
    flat = {
        "data": {"dataset": "synthetic", "split_strategy": "balanced", "crop_size": 32, "batch_size_labeled": 2},
        "model": {
            "class_path": "src.pl_modules.ReCo", "init_args": {"arch": "Unet", "eval_mode": "whole", "lr_power": 1.3}
        },
        "trainer": {"max_steps": 4},
    }
    nested = {**flat, "data": {"class_path": "src.datamodules.SemiSupervisedDataModule", "init_args": flat["data"]}}
    columns = protocol(nested, None)
    assert columns == protocol(flat, None) and tuple(columns) == PROTOCOL_COLUMNS
    assert (columns["dataset"], columns["crop_size"], columns["batch_size_labeled"]) == ("synthetic", 32, 2)
    assert (columns["arch"], columns["max_steps"], columns["split_source"]) == ("Unet", 4, "balanced")
    assert columns["lr_power"] == 1.3
    assert protocol(nested, {"source": "splits/15.txt"})["split_source"] == "splits/15.txt"


def test_format_duration() -> None:
    assert format_duration(42) == "42s"
    assert format_duration(250) == "4m10s"
    assert format_duration(1260, coarse=True) == "21m"
    assert format_duration(3900) == "1h05m"
    assert format_duration(None) == "?"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_lines(tmp_path: Path) -> None:
    spec = RunSpec(2, 9, "reco", 15, 0, tmp_path)
    pending = [RunSpec(i, 9, "reco", 60, 0, tmp_path / str(i)) for i in range(3, 10)]
    run = Running(spec, process=None, started=0.0, log_offset=0, resumed_from=None)  # type: ignore[arg-type]
    state = GridState()

    def step(n: int, stream: io.StringIO) -> str:
        progress = {"step": n, "max_steps": 1500, "start_step": 0, "elapsed_s": n * 0.5, "val_miou": 41.25}
        (tmp_path / "progress.json").write_text(json.dumps(progress))
        show_progress([run], pending, state, 1, stream, tty_every_s=0.0)
        return stream.getvalue()

    piped = io.StringIO()
    step(340, piped)
    # Run: 1160 steps at 0.5 s. Grid: that plus 7 runs of 1500 steps and a 15 s start-up guess each.
    assert piped.getvalue() == (
        "[2/9] reco labels=15 seed=0  step 340/1500  val mIoU 41.2  ETA 9m40s (run) / 1h38m (grid)\n"
    )
    assert step(350, piped).count("\n") == 1  # not a new tenth: nothing printed when piped
    assert step(460, piped).count("\n") == 2
    terminal = Terminal()
    step(461, terminal)
    step(462, terminal)
    assert terminal.getvalue().count("\n") == 2  # on a terminal: at every poll (here every 0 s)
