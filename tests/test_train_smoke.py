"""The path users take: `python -m src.train fit/validate/test` and `python -m src.predict`."""

import json
import math
import warnings
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from src import predict
from src.train import cli_entry, main, miou_at_80pct, quiet_lightning
from tests.conftest import assert_weights_loaded, cache_smp_weights, random_state, smoke_args


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("supervised")
    # 5 steps, validating at 2 and 4 (val_check_interval 2), and at 5 because it is the final step.
    main(["fit", *smoke_args("supervised", tmp_path, "--model.init_args.log_images_every_n_val", "1",
                             "--trainer.max_steps", "5")])
    return tmp_path / "run"


def test_fit_writes_checkpoints_metrics_and_tensorboard(finished_run):
    assert (finished_run / "checkpoints" / "best.ckpt").is_file()
    assert (finished_run / "checkpoints" / "last.ckpt").is_file()
    assert (finished_run / "split.json").is_file()
    summary = json.loads((finished_run / "metrics.json").read_text())
    assert summary["steps"] == 5 and summary["method"] == "supervised"
    assert 0 <= summary["val_miou_last"] <= 100 and summary["val_miou_best"] >= summary["val_miou_last"]
    events = EventAccumulator(str(finished_run), size_guidance={"images": 0}).Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("train/loss", "val/miou", "val/miou_best", "lr-AdamW"):
        assert tag in scalars, (tag, scalars)
    assert len(events.Scalars("val/miou")) == 3  # steps 2, 4 and 5
    assert "val/predictions" in events.Tags()["images"]


def test_last_checkpoint_holds_the_final_step(finished_run):
    import torch

    last = torch.load(finished_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    best = torch.load(finished_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 5
    assert best["global_step"] in (2, 4, 5)
    summary = json.loads((finished_run / "metrics.json").read_text())
    assert summary["last_checkpoint"].endswith("checkpoints/last.ckpt")


def test_fit_validates_its_final_step(finished_run):
    summary = json.loads((finished_run / "metrics.json").read_text())
    history = summary["val_history"]
    assert [entry["step"] for entry in history] == [2, 4, 5]
    assert math.isfinite(summary["val_miou_last"]) and summary["val_miou_last"] == history[-1]["miou"]
    assert summary["val_miou_at_80pct"] == history[1]["miou"]  # step 4 = 80 % of 5
    assert summary["val_miou_best"] == max(entry["miou"] for entry in history)
    assert Path(summary["best_checkpoint"]).is_file()
    # ProgressFile saw the final validation too.
    progress = json.loads((finished_run / "progress.json").read_text())
    assert progress["step"] == 5 and progress["val_miou"] == pytest.approx(summary["val_miou_last"], abs=1e-4)


def test_a_fit_shorter_than_its_validation_interval_validates_once_at_its_end(tmp_path, capsys):
    import torch

    args = smoke_args("mean_teacher", tmp_path, "--trainer.max_steps", "3", "--trainer.val_check_interval", "250")
    main(["fit", *args])
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["val_history"] == [{"step": 3, "miou": summary["val_miou_last"]}]
    assert summary["best_step"] == 3 and math.isfinite(summary["val_miou_at_80pct"])
    assert torch.load(summary["best_checkpoint"], map_location="cpu", weights_only=False)["global_step"] == 3
    assert "nan" not in capsys.readouterr().out

    # Resumed from its final checkpoint (a run killed after its final validation): nothing is
    # trained or validated again, and the summary is the same.
    cli = main(["fit", *args, "--ckpt_path", summary["last_checkpoint"]])
    assert cli.model._num_validations == 1 and "val/miou" not in cli.trainer.callback_metrics
    resumed = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("steps", "val_miou_last", "val_history", "best_checkpoint", "last_checkpoint", "metrics"):
        assert resumed[key] == summary[key], key


def test_recon_validates_its_final_step_on_its_loss(tmp_path):
    main(["fit", *smoke_args("recon", tmp_path, "--trainer.max_steps", "3")])
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["steps"] == 3 and math.isfinite(summary["metrics"]["val/loss"])
    events = EventAccumulator(str(tmp_path / "run")).Reload()
    assert len(events.Scalars("val/loss")) == 2  # steps 2 and 3
    assert Path(summary["best_checkpoint"]).is_file()


def test_miou_at_80pct_takes_the_validation_nearest_to_80_percent_of_the_steps():
    history = [(250, 10.0), (500, 20.0), (750, 30.0), (1000, 40.0), (1250, 50.0), (1500, 60.0)]
    assert miou_at_80pct(history, 1500) == 50.0  # 1250 is 50 steps from 1200, 1000 is 200
    # 2000 steps validated every 300 and at the end: 1500 is 100 steps from 1600, 1800 is 200.
    every_300 = [(step, step / 100) for step in (300, 600, 900, 1200, 1500, 1800, 2000)]
    assert miou_at_80pct(every_300, 2000) == 15.0
    assert miou_at_80pct([(10, 1.0), (14, 2.0), (15, 3.0)], 15) == 1.0  # 12 is 2 from both: the earlier
    assert miou_at_80pct([(5, 7.0)], 5) == 7.0
    assert math.isnan(miou_at_80pct([], 1500))


def test_args_replace_the_callers_command_line_without_a_warning(tmp_path, monkeypatch):
    # src.pretrain and benchmarks/run.py call main(args) from processes with their own sys.argv.
    monkeypatch.setattr("sys.argv", ["pretrain.py", "--arch", "Unet"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_lightning()  # as src.train's import does (pytest drops filters installed while collecting)
        main(smoke_args("supervised", tmp_path), run=False)
    assert not [w for w in caught if "args parameter" in str(w.message)]


def test_named_encoder_weights_come_from_a_prefilled_cache(tmp_path, weights_cache):
    import segmentation_models_pytorch as smp

    state = random_state(smp.encoders.get_encoder("resnet18"))
    cache_smp_weights(weights_cache, "resnet18", "imagenet", state)
    weights = ["--model.init_args.encoder_name", "resnet18", "--model.init_args.encoder_weights", "imagenet"]
    cli = main(smoke_args("supervised", tmp_path / "built", *weights), run=False)
    assert_weights_loaded(cli.model.student.model.encoder, state)
    assert cli_entry(["fit", *smoke_args("supervised", tmp_path, *weights, "--trainer.max_steps", "2")]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 2


def test_validate_on_checkpoint_reproduces_best_miou(finished_run, tmp_path):
    summary = json.loads((finished_run / "metrics.json").read_text())
    cli = main(["validate", *smoke_args("supervised", tmp_path), "--ckpt_path", summary["best_checkpoint"]])
    assert math.isclose(float(cli.trainer.callback_metrics["val/miou"]), summary["val_miou_best"], abs_tol=1e-4)


def test_test_subcommand(finished_run, tmp_path):
    cli = main(["test", *smoke_args("supervised", tmp_path), "--ckpt_path", str(finished_run / "checkpoints" / "last.ckpt")])
    assert 0 <= float(cli.trainer.callback_metrics["test/miou"]) <= 100


def test_predict_writes_index_and_colour_masks(finished_run, tmp_path):
    from PIL import Image
    import numpy as np

    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(inputs / "a.jpg")
    code = predict.main(["--ckpt", str(finished_run / "checkpoints" / "best.ckpt"), "--input", str(inputs),
                         "--output", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 0
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / "a.png"))
    assert mask.shape == (40, 52) and mask.max() < 8
    assert np.asarray(Image.open(tmp_path / "out" / "color" / "a.png")).shape == (40, 52, 3)


def test_predict_bad_checkpoint(tmp_path, capsys):
    assert predict.main(["--ckpt", str(tmp_path / "nope.ckpt"), "--input", ".", "--output", str(tmp_path)]) == 2
    assert "nope.ckpt" in capsys.readouterr().err


def test_lightning_noise_a_user_cannot_act_on_is_dropped(tmp_path):
    import logging
    import warnings

    import pytorch_lightning as pl

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect()
    lightning_log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    lightning_log.addHandler(handler)
    try:
        pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    finally:
        lightning_log.removeHandler(handler)
    assert any(message.startswith("GPU available") for message in records)  # Lightning's information stays
    assert not any("Tip:" in message for message in records), records  # its adverts go
    with warnings.catch_warnings(record=True) as caught:
        quiet_lightning()  # as src.train's import does (pytest drops filters installed while collecting)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and "
                      "treespec.is_leaf()` instead.", FutureWarning)
        warnings.warn("You have overridden `on_after_batch_transfer` in `LightningModule` but have passed in a"
                      " `LightningDataModule`. It will use the implementation from `LightningModule` instance.")
        warnings.warn("a warning of ours")
    assert [str(w.message) for w in caught] == ["a warning of ours"]
