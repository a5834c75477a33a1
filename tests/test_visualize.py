"""`python -m src.visualize relations` and the class-relation figure training logs to TensorBoard."""

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from src import visualize
from src.pl_modules import Supervised
from src.train import main
from tests.conftest import smoke_args


@pytest.fixture(scope="module")
def reco_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("reco")
    # 2 steps, one validation (the final step), which logs the image grid and the figure.
    main(["fit", *smoke_args("reco", tmp_path, "--trainer.max_steps", "2",
                             "--model.init_args.log_images_every_n_val", "1")])
    return tmp_path / "run"


def test_fit_logs_the_class_relations_figure(reco_run):
    events = EventAccumulator(str(reco_run), size_guidance={"images": 0}).Reload()
    assert "val/class_relations" in events.Tags()["images"]
    assert [event.step for event in events.Images("val/class_relations")] == [2]


def test_relations_writes_the_figure_of_a_symmetric_similarity(reco_run, tmp_path, capsys):
    checkpoint = str(reco_run / "checkpoints" / "last.ckpt")
    out = tmp_path / "figures" / "relations.png"
    assert visualize.main(["relations", "--ckpt", checkpoint, "--out", str(out), "--device", "cpu"]) == 0
    assert "relations.png" in capsys.readouterr().out
    width, height = Image.open(out).size
    assert width > 300 and height > 300

    similarity = visualize.relations(checkpoint, str(tmp_path / "again.png"))
    present = ~similarity.diagonal().isnan()
    assert similarity.shape == (8, 8) and present.sum() >= 2  # the synthetic scenes' val set
    kept = similarity[present][:, present]
    assert torch.allclose(kept, kept.T) and torch.allclose(kept.diagonal(), torch.ones(len(kept), dtype=kept.dtype))
    assert similarity[~present].isnan().all() and similarity[:, ~present].isnan().all()


def test_relations_refuses_a_checkpoint_without_a_representation_head(tmp_path, capsys):
    module = Supervised(num_classes=3, encoder_name="tu-test_resnet", model_options={"decoder_channels": 16})
    checkpoint = tmp_path / "supervised.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "method": "supervised", "pytorch-lightning_version": "2.6.0"}, checkpoint)
    assert visualize.main(["relations", "--ckpt", str(checkpoint), "--out", str(tmp_path / "r.png")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(checkpoint) in error and "no representation head" in error
    assert not (tmp_path / "r.png").exists()
