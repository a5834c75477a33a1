"""`python -m src.visualize relations` and the class-relation figure training logs to TensorBoard."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from src import visualize
from src.networks import RepresentationHead, Segmenter
from src.pl_modules import Supervised
from src.pl_modules.visualize import prototype_similarity, prototype_sums, relation_order
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


def test_prototype_sums_match_a_loop_over_pixels():
    torch.manual_seed(0)
    student = Segmenter(3, "DeepLabV3Plus", "tu-test_resnet", model_options={"decoder_channels": 16}).eval()
    head = RepresentationHead(student.feature_channels, 4, hidden_channels=8).eval()
    # 40 px is not a multiple of the stride (16): the input is padded to 48, a 12x12 representation grid.
    images = torch.rand(2, 3, 40, 40)
    masks = torch.randint(0, 3, (2, 40, 40))
    masks[:, :8] = 255
    masks[masks == 2] = 255  # class 2 absent
    sums, counts = prototype_sums(student, head, images, masks, num_classes=3, ignore_index=255)

    with torch.no_grad():
        rep = head(student.forward_features(images)[1])  # DeepLabV3+ features are at stride 4 already
    assert rep.shape[-1] == 12
    expected_sums = torch.zeros(3, 4, dtype=torch.float64)
    expected_counts = torch.zeros(3, dtype=torch.long)
    for image in range(2):
        for row in range(12):
            for col in range(12):
                y, x = row * 4, col * 4  # the cell's top-left input pixel; the padding (40..47) is unlabelled
                label = int(masks[image, y, x]) if y < 40 and x < 40 else 255
                if label < 3:
                    expected_sums[label] += rep[image, :, row, col].double()
                    expected_counts[label] += 1
    assert torch.equal(counts, expected_counts) and counts[2] == 0 and counts[:2].min() > 0
    assert torch.allclose(sums, expected_sums, atol=1e-5)

    similarity = prototype_similarity(sums, counts)
    cosine = torch.cosine_similarity(sums[0], sums[1], dim=0)
    assert math.isclose(similarity[0, 1], cosine, rel_tol=1e-9) and similarity[0, 0] == pytest.approx(1.0)
    assert similarity[2].isnan().all() and similarity[:, 2].isnan().all()


def test_relation_order_keeps_each_cluster_contiguous():
    # Classes 0, 2, 4 are alike, and so are 1 and 3: average linkage joins each group first.
    similarity = np.full((5, 5), -0.5)
    for group in ((0, 2, 4), (1, 3)):
        similarity[np.ix_(group, group)] = 0.9
    np.fill_diagonal(similarity, 1.0)
    order, tree = relation_order(similarity)
    assert sorted(order) == list(range(5)) and tree.shape == (4, 4)
    first = {order[0], order[1], order[2]} if order[0] in (0, 2, 4) else {order[2], order[3], order[4]}
    assert first == {0, 2, 4}
    assert tree[:3, 2].max() == pytest.approx(0.1) and tree[3, 2] == pytest.approx(1.5)
    assert relation_order(np.ones((1, 1))) == ([0], None)
