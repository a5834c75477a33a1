"""The embedded benchmark's pretrained encoder: cached by key, trained once when missing, loaded exactly."""

import subprocess
import sys

import pytest
import torch

from src.networks import Segmenter
from src.networks.source_encoder import SOURCE_WEIGHTS, source_encoder_path, source_key
from tests.conftest import REPO, assert_weights_loaded, random_state

NETWORK = ("Unet", "tu-test_resnet", {"decoder_channels": [16, 16, 16, 16, 16]})


def tiny(**kw):
    arch, encoder, options = NETWORK
    return Segmenter(3, arch=arch, encoder_name=encoder, model_options=options, **kw)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMISEG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_key_follows_the_network_and_the_cache_folder_follows_the_environment(cache):
    arch, encoder, options = NETWORK
    assert source_key(arch, encoder, options) == source_key(arch.lower(), encoder, dict(options))
    assert source_key(arch, encoder, options) != source_key(arch, encoder, {"decoder_channels": [8] * 5})
    assert source_key(arch, encoder, options) != source_key(arch, "tu-resnet10t", options)
    assert source_key(arch, encoder, options) != source_key("FPN", encoder, options)
    assert source_encoder_path(*NETWORK).parent == cache / "encoders"


def test_key_follows_the_scenes_the_generator_draws(cache, monkeypatch):
    from src.datasets import synthetic

    before = source_key(*NETWORK)
    drawn = synthetic.generate_scene
    monkeypatch.setattr(synthetic, "generate_scene", lambda rng, size, variant: tuple(a // 2 for a in drawn(rng, size, variant)))
    assert source_key(*NETWORK) != before


def test_a_cached_encoder_is_loaded_exactly_and_nothing_is_trained(cache, monkeypatch):
    state = random_state(tiny().model.encoder, seed=3)
    path = source_encoder_path(*NETWORK)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("trained although cached"))
    assert_weights_loaded(tiny(encoder_weights=SOURCE_WEIGHTS).model.encoder, state)


def test_a_missing_encoder_is_pretrained_once_with_this_network(cache, monkeypatch):
    state = random_state(tiny().model.encoder, seed=4)
    calls = []

    def fake_pretraining(command, cwd):
        calls.append(command)
        torch.save(state, command[command.index("--out") + 1])
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", fake_pretraining)
    first, second = tiny(encoder_weights=SOURCE_WEIGHTS), tiny(encoder_weights=SOURCE_WEIGHTS)
    assert len(calls) == 1
    assert calls[0][:3] == [sys.executable, "-m", "src.pretrain"]
    assert calls[0][calls[0].index("--encoder-name") + 1] == NETWORK[1]
    assert calls[0][calls[0].index("--out") + 1] == str(source_encoder_path(*NETWORK))
    for net in (first, second):
        assert_weights_loaded(net.model.encoder, state)


def test_a_failed_pretraining_says_how_to_rerun_it(cache, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda command, cwd: subprocess.CompletedProcess(command, 1))
    with pytest.raises(RuntimeError, match="source pretraining failed .*exit code 1.*-m src.pretrain"):
        tiny(encoder_weights=SOURCE_WEIGHTS)
    assert not source_encoder_path(*NETWORK).exists()


def test_pretraining_writes_the_encoder_of_its_last_step(tmp_path):
    """`python -m src.pretrain` at toy size: trains on the source scenes and saves a loadable encoder."""
    out = tmp_path / "encoder.pt"
    arch, encoder, options = NETWORK
    command = [
        sys.executable, "-m", "src.pretrain", "--arch", arch, "--encoder-name", encoder,
        "--model-options", '{"decoder_channels": [16, 16, 16, 16, 16]}', "--out", str(out),
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.accelerator", "cpu",
        "--data.dataset_options", "{variant: source, image_size: 32, num_train: 8, num_val: 2, num_test: 1}",
        "--data.crop_size", "32", "--data.batch_size_labeled", "2", "--data.num_workers", "0",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    state = torch.load(out)
    fresh = tiny().model.encoder.state_dict()
    assert set(state) == set(fresh) and all(state[k].shape == fresh[k].shape for k in fresh)
    assert any(not torch.equal(state[k], fresh[k]) for k in fresh if fresh[k].is_floating_point())
    assert_weights_loaded(tiny(encoder_weights=str(out)).model.encoder, state)
