"""Every YAML parses and instantiates; every method has a YAML, a matching module name and a docstring."""

import inspect
from pathlib import Path

import pytest
import yaml

from src.pl_modules import METHODS
from src.train import main
from tests.conftest import REPO, SMOKE, config


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_is_registered_with_yaml_module_and_docstring(name):
    cls = METHODS[name]
    assert (REPO / "configs" / f"{name}.yaml").is_file()
    assert Path(inspect.getfile(cls)).stem in (name, "mean_teacher")  # the mean-teacher family shares a file
    assert cls.__doc__ and inspect.getmodule(cls).__doc__


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_yaml_names_the_datamodule_of_its_family(name):
    data = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())["data"]
    family = "SemiSupervisedDataModule" if METHODS[name].uses_unlabeled else "SupervisedDataModule"
    assert data["class_path"] == family and "dataset" in data["init_args"]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_config_instantiates(name, tmp_path):
    cli = main(["--config", config(name), "--config", SMOKE, "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert type(cli.model).name == name
    assert cli.model.num_classes == cli.datamodule.num_classes


def test_bench_paper_overlay_builds_the_paper_network(tmp_path):
    """benchmarks/configs/paper_synthetic.yaml (bench_step's GPU check) applies over a method's YAML."""
    overlay = str(REPO / "benchmarks" / "configs" / "paper_synthetic.yaml")
    cli = main(["--config", config("reco"), "--config", overlay, "--trainer.default_root_dir", str(tmp_path)],
               run=False)
    assert type(cli.model.student.model).__name__ == "DeepLabV3Plus"
    assert cli.model.hparams.encoder_name == "resnet101"
    assert cli.datamodule.hparams.dataset_options["image_size"] == 400


def _resolved(path: Path, *keys: str):
    node = yaml.safe_load(path.read_text())
    for key in keys:
        node = node[key]
    return node


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"recon"}))  # recon is a pretraining stage, not a grid row
def test_method_yaml_shares_supervised_schedule(name):
    """The embedded grid compares methods under one schedule: steps, validations and the poly decay."""
    for keys in (("trainer", "max_steps"), ("trainer", "val_check_interval"), ("model", "init_args", "lr_power")):
        assert _resolved(REPO / "configs" / f"{name}.yaml", *keys) == _resolved(REPO / "configs/supervised.yaml", *keys)


@pytest.mark.parametrize(
    ("method", "overlays", "encoder"),
    [("reco", ["pascal_voc"], "tu-test_resnet"), ("reco", ["cityscapes"], "tu-test_resnet"),
     ("unimatch_v2", ["pascal_voc", "pascal_voc_unimatch_v2"], "tu-test_vit")],
    ids=["pascal_voc", "cityscapes", "pascal_voc_unimatch_v2"],
)
def test_paper_overlays_restore_the_references_poly_schedule(method, overlays, encoder, tmp_path):
    overlays = [config(method)] + [str(REPO / f"configs/data/{name}.yaml") for name in overlays]
    args = [arg for path in overlays for arg in ("--config", path)] + [
        "--data.dataset", "synthetic", "--data.dataset_options", "{image_size: 32, num_train: 8}",
        "--data.train_split", "train", "--data.test_split", "test", "--trainer.default_root_dir", str(tmp_path),
        "--model.init_args.encoder_weights", "null", "--model.init_args.encoder_name", encoder]
    assert main(args, run=False).model.hparams.lr_power == 0.9
