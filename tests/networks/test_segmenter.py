from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from safetensors.torch import save_file

from src.networks import RepresentationHead, Segmenter
from tests.conftest import assert_weights_loaded, cache_smp_weights, random_state, smp_snapshot


def tiny(**kw):
    return Segmenter(3, arch=kw.pop("arch", "DeepLabV3Plus"), encoder_name="tu-test_resnet", model_options={"decoder_channels": 32}, **kw)


@pytest.mark.parametrize("size", [(32, 32), (37, 45), (20, 70)])
def test_logits_at_input_size_for_any_size(size):
    net = tiny().eval()
    logits, features = net.forward_features(torch.rand(2, 3, *size))
    assert logits.shape == (2, 3, *size)
    # DeepLabV3+ decoder features: stride 4 of the padded input, feature_channels wide.
    assert features.shape[:2] == (2, net.feature_channels)
    assert features.shape[-2] == -(-size[0] // 16) * 16 // 4


def test_unet_features_full_resolution():
    net = Segmenter(3, arch="Unet", encoder_name="tu-test_resnet", model_options={"decoder_channels": (16, 16, 16, 16, 16)})
    logits, features = net.eval().forward_features(torch.rand(1, 3, 32, 32))
    assert logits.shape == (1, 3, 32, 32) and features.shape == (1, 16, 32, 32)


def test_pass_hooks_see_every_pass_once_until_removed():
    net = tiny().train()
    seen = []
    handle = net.register_pass_hook(lambda images, perturbed: seen.append((len(images), perturbed)))
    net(torch.rand(2, 3, 32, 32))
    net.forward_features(torch.rand(3, 3, 32, 32))
    net.forward_perturbed(torch.rand(4, 3, 32, 32))
    assert seen == [(2, False), (3, False), (4, True)]
    handle.remove()
    net(torch.rand(2, 3, 32, 32))
    assert len(seen) == 3


def test_normalisation_is_inside_the_network():
    net = tiny().eval()
    images = torch.rand(1, 3, 32, 32)
    expected = net.model((images - net.mean) / net.std)
    assert torch.allclose(net(images), expected, atol=1e-5)


def test_unknown_arch_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown arch 'NoSuchNet'.*Unet"):
        Segmenter(3, arch="NoSuchNet")


@pytest.mark.parametrize("name", ["resnet9999", "tu-no_such_model"])
def test_unknown_encoder(name):
    with pytest.raises(ValueError, match="unknown encoder_name"):
        Segmenter(3, encoder_name=name)


def test_encoder_weights_from_local_file(tmp_path):
    source = tiny()
    path = tmp_path / "encoder.pth"
    torch.save({f"encoder.{k}": v for k, v in source.model.encoder.state_dict().items()}, path)
    loaded = tiny(encoder_weights=str(path))
    for (name, a), b in zip(source.model.encoder.state_dict().items(), loaded.model.encoder.state_dict().values()):
        assert torch.equal(a, b), name


def cache_timm_hf_weights(cache: Path, repo_id: str, state: dict[str, torch.Tensor]) -> None:
    """Put ``state`` where timm reads a Hugging Face hub model: refs/main names the snapshot."""
    storage = cache / "huggingface" / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    (storage / "snapshots" / commit).mkdir(parents=True)
    save_file(state, storage / "snapshots" / commit / "model.safetensors")


def test_smp_weights_by_name_come_from_the_hf_cache(weights_cache):
    state = random_state(smp.encoders.get_encoder("resnet18"))
    cache_smp_weights(weights_cache, "resnet18", "imagenet", state)
    net = Segmenter(3, encoder_name="resnet18", encoder_weights="imagenet", model_options={"decoder_channels": 32})
    assert_weights_loaded(net.model.encoder, state)
    assert set(net.model.encoder.state_dict()) == set(state)


@pytest.mark.parametrize("weights", ["r160_in1k", "imagenet"])  # imagenet: timm's default tag, r160_in1k
def test_timm_weights_by_tag_come_from_the_hf_cache(weights_cache, weights):
    state = random_state(timm.create_model("test_resnet"))
    cache_timm_hf_weights(weights_cache, "timm/test_resnet.r160_in1k", state)
    net = tiny(encoder_weights=weights)
    # timm's features-only model: every tensor but the classifier's.
    assert_weights_loaded(net.model.encoder.model, state)


def test_timm_weights_by_url_come_from_the_torch_hub_cache(weights_cache):
    # legacy_seresnet18's weights are a URL download (no Hugging Face repo): torch hub's cache.
    state = random_state(timm.create_model("legacy_seresnet18"))
    (weights_cache / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, weights_cache / "torch" / "hub" / "checkpoints" / "seresnet18-4bb0ce65.pth")
    net = Segmenter(3, arch="Unet", encoder_name="tu-legacy_seresnet18", encoder_weights="imagenet",
                    model_options={"decoder_channels": (16, 16, 16, 16, 16)})  # SENet has no output_stride 16
    assert_weights_loaded(net.model.encoder.model, state)


def one_line_error(**kwargs) -> str:
    with pytest.raises(ValueError) as info:
        Segmenter(3, model_options={"decoder_channels": 32}, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_cached_file_is_one_line_naming_weights_file_and_folder(weights_cache):
    folder = smp_snapshot(weights_cache, "resnet18", "imagenet")
    message = one_line_error(encoder_name="resnet18", encoder_weights="imagenet")
    assert message.startswith("encoder_weights='imagenet' for resnet18: no cached file ")
    assert f"{folder}/config.json, {folder}/model.safetensors (offline" in message
    # Only what is missing is named.
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    message = one_line_error(encoder_name="resnet18", encoder_weights="imagenet")
    assert f"no cached file {folder}/model.safetensors (offline" in message and "download it" in message


def test_missing_timm_file_names_the_snapshot_and_its_ref(weights_cache):
    storage = weights_cache / "huggingface" / "hub" / "models--timm--test_resnet.r160_in1k"
    message = one_line_error(encoder_name="tu-test_resnet", encoder_weights="imagenet")
    assert message.startswith("encoder_weights='imagenet' (timm's test_resnet.r160_in1k) for tu-test_resnet: ")
    assert f"no cached file {storage}/refs/main, {storage}/snapshots/<commit>/model.safetensors" in message
    message = one_line_error(encoder_name="tu-legacy_seresnet18", encoder_weights="imagenet")
    assert f"no cached file {weights_cache}/torch/hub/checkpoints/seresnet18-4bb0ce65.pth (offline" in message


def test_failed_download_becomes_the_one_line(weights_cache, monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    def no_connection(*args, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub ...")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(smp.encoders, "hf_hub_download", no_connection)  # the loader smp calls
    message = one_line_error(encoder_name="resnet18", encoder_weights="ssl")
    assert "encoder_weights='ssl' for resnet18: no cached file " in message
    assert "model.safetensors (download failed: LocalEntryNotFoundError; source smp-hub/resnet18.ssl@" in message


@pytest.mark.parametrize(
    "encoder_name, weights, expected",
    [
        ("resnet18", "nope", "a weight name for this encoder: ['imagenet', 'ssl', 'swsl']"),
        ("tu-test_resnet", "nope", "a weight name for this encoder: ['imagenet', 'r160_in1k']"),
        ("tu-test_resnet.r160_in1k", "r160_in1k", "encoder_name='tu-test_resnet', encoder_weights='r160_in1k'"),
    ],
)
def test_bad_weight_name_lists_the_valid_ones(weights_cache, encoder_name, weights, expected):
    assert expected in one_line_error(encoder_name=encoder_name, encoder_weights=weights)


def test_representation_head_shape():
    head = RepresentationHead(32, output_dim=8, hidden_channels=16)
    assert head(torch.rand(2, 32, 5, 7)).shape == (2, 8, 5, 7)


@pytest.mark.parametrize(("arch", "levels"), [("Unet", "reference"), ("Unet", "all"), ("DeepLabV3Plus", "reference")])
def test_feature_perturbation_drops_the_reference_levels(arch, levels):
    """'reference' drops the stride-4 map and the deepest (UniMatch's c1 and c4); 'all' every map but the input."""
    options = {"decoder_channels": (16, 16, 16, 16, 16)} if arch == "Unet" else {}
    net = Segmenter(3, arch=arch, encoder_name="tu-test_resnet", model_options=options).train()
    seen = []
    net.model.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    torch.manual_seed(0)
    net.forward_perturbed(torch.rand(2, 3, 64, 64), 0.5, levels)
    (features,) = seen
    changed = [i for i, f in enumerate(features) if not torch.equal(*f.chunk(2))]
    strides = [64 // f.shape[-1] for f in features]
    expected = [i for i, s in enumerate(strides) if s > 1] if levels == "all" else [strides.index(4), len(features) - 1]
    assert changed == expected
    with pytest.raises(ValueError, match="fp levels 'some'"):
        net.forward_perturbed(torch.rand(2, 3, 64, 64), 0.5, "some")
