"""Bad input ends the CLI with exit code 2 and one line naming the option or file."""

import numpy as np
import pytest
from PIL import Image

from src.train import cli_entry
from tests.conftest import smoke_args, smp_snapshot

RESNET18_IMAGENET = ("--model.init_args.encoder_name", "resnet18", "--model.init_args.encoder_weights", "imagenet")


def run_fit(tmp_path, capsys, *extra):
    code = cli_entry(["fit", *smoke_args("supervised", tmp_path, *extra)])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def write_folder(root, *, label_value=1, drop_label=None, drop_image=None, broken_image=None):
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    (root / "classes.txt").write_text("background\nthing\n")
    rng = np.random.default_rng(0)
    for split, names in (("train", ["a", "b", "c", "d"]), ("val", ["e", "f"])):
        for name in names:
            if name != drop_image:
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / "images" / split / f"{name}.png")
            if name != drop_label:
                mask = np.zeros((20, 24), np.uint8)
                mask[5:10, 5:10] = label_value
                Image.fromarray(mask).save(root / "labels" / split / f"{name}.png")
    if broken_image:
        (root / "images" / "val" / f"{broken_image}.png").write_bytes(b"not a png")


def folder_args(root):
    return ("--data.dataset", "folder", "--data.root", str(root), "--data.num_labeled", "2", "--data.dataset_options", "{}")


def test_missing_root(tmp_path, capsys):
    code, line = run_fit(tmp_path, capsys, *folder_args(tmp_path / "nowhere"))
    assert code == 2 and "nowhere" in line


def test_image_without_label_in_val(tmp_path, capsys):
    write_folder(tmp_path / "d", drop_label="e")
    code, line = run_fit(tmp_path, capsys, *folder_args(tmp_path / "d"))
    assert code == 2 and "e.png" in line


def test_label_without_image(tmp_path, capsys):
    write_folder(tmp_path / "d", drop_image="b")
    code, line = run_fit(tmp_path, capsys, *folder_args(tmp_path / "d"))
    assert code == 2 and "b.png" in line


def test_label_values_out_of_range(tmp_path, capsys):
    write_folder(tmp_path / "d", label_value=7)
    code, line = run_fit(tmp_path, capsys, *folder_args(tmp_path / "d"))
    assert code == 2 and "label values [7]" in line and ".png" in line


def test_unreadable_image(tmp_path, capsys):
    write_folder(tmp_path / "d", broken_image="e")
    code, line = run_fit(tmp_path, capsys, *folder_args(tmp_path / "d"))
    assert code == 2 and "e.png" in line and "cannot read image" in line


def test_budget_larger_than_pool(tmp_path, capsys):
    code, line = run_fit(tmp_path, capsys, "--data.num_labeled", "500")
    assert code == 2 and "num_labeled=500" in line


@pytest.mark.parametrize(
    "option, value, expected",
    [
        ("--model.init_args.arch", "NoSuchNet", "unknown arch 'NoSuchNet'"),
        ("--model.init_args.encoder_name", "resnet9999", "unknown encoder_name 'resnet9999'"),
        ("--data.dataset", "nope", "unknown dataset 'nope'"),
    ],
)
def test_unknown_names(tmp_path, capsys, option, value, expected):
    code, line = run_fit(tmp_path, capsys, option, value)
    assert code == 2 and expected in line


def test_named_encoder_weights_without_a_cached_file(tmp_path, capsys, weights_cache):
    code, line = run_fit(tmp_path, capsys, *RESNET18_IMAGENET, "--trainer.max_steps", "2")
    assert code == 2 and line.startswith("error: encoder_weights='imagenet' for resnet18: no cached file ")
    folder = smp_snapshot(weights_cache, "resnet18", "imagenet")
    assert f"{folder}/config.json, {folder}/model.safetensors (offline: HF_HUB_OFFLINE is set;" in line
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_method_on_unlabeled_images_refuses_the_labeled_only_datamodule(tmp_path, capsys):
    code = cli_entry(["fit", *smoke_args("fixmatch", tmp_path, "--data.class_path", "SupervisedDataModule")])
    assert code == 2 and capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: model FixMatch trains on unlabeled images, but data SupervisedDataModule has no unlabeled "
        "stream; use data.class_path SemiSupervisedDataModule"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_config_that_names_no_datamodule(tmp_path, capsys):
    config = tmp_path / "method.yaml"
    config.write_text("model:\n  class_path: Supervised\ndata:\n  dataset: synthetic\n")
    code = cli_entry(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path)])
    assert code == 2 and capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: data.class_path is not set: name the datamodule, one of "
        "['SemiSupervisedDataModule', 'SupervisedDataModule']"
    )
