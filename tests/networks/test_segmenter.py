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


# A DPT head small enough for tests: 16-32 channels instead of smp's 256-1024.
TINY_DPT = {"decoder_intermediate_channels": [16, 16, 32, 32], "decoder_fusion_channels": 16}


def tiny_vit(patch_size: int = 14, **kw) -> dict:
    """Segmenter arguments of a random-init 6-block, 64-wide ViT (timm's test_vit) with a tiny DPT head."""
    options = {"patch_size": patch_size, **TINY_DPT, **kw.pop("model_options", {})}
    return {"arch": "DPT", "encoder_name": "tu-test_vit", "model_options": options, **kw}


@pytest.mark.parametrize("size", [(32, 32), (37, 45), (20, 70)])
def test_logits_at_input_size_for_any_size(size):
    net = tiny().eval()
    logits, features = net.forward_features(torch.rand(2, 3, *size))
    assert logits.shape == (2, 3, *size)
    # DeepLabV3+ decoder features: stride 4, feature_channels wide, only the cells over the image
    # (the input is padded to a multiple of 16, the padding's cells are cut).
    assert features.shape == (2, net.feature_channels, -(-size[0] // 4), -(-size[1] // 4))


def test_features_line_up_with_the_unpadded_input():
    # A U-Net decoder has stride 1: each feature pixel is its input pixel, also for an odd size.
    net = Segmenter(3, arch="Unet", encoder_name="tu-test_resnet", model_options={"decoder_channels": (16,) * 5})
    image = torch.rand(1, 3, 37, 45)
    _, features = net.eval().forward_features(image)
    assert features.shape[-2:] == (37, 45)  # the padded input is 64 x 64


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


@pytest.mark.parametrize("patch, divisor", [(14, 28), (16, 32)])
@pytest.mark.parametrize("size", [(28, 28), (37, 45), (20, 70)])
def test_vit_dpt_logits_at_input_size_for_any_size(patch, divisor, size):
    # Two token maps per deepest one: inputs are padded to an even token grid (28 px at patch 14).
    net = Segmenter(3, **tiny_vit(patch)).eval()
    assert net.stride == divisor
    logits, features = net.forward_features(torch.rand(2, 3, *size))
    assert logits.shape == (2, 3, *size)
    assert features.shape[:2] == (2, net.feature_channels) == (2, 16)
    # The decoder's features are at half the head's output, which is 16 px per token for both patches:
    # stride patch / 8, cut to the cells over the image.
    assert features.shape[-2:] == tuple(-(-side * 8 // patch) for side in size)


def test_vit_dpt_matches_smp_own_forward_where_smp_takes_the_input():
    net = Segmenter(3, **tiny_vit(16)).eval()
    images = torch.rand(1, 3, 64, 32)
    assert torch.allclose(net(images), net.model((images - net.mean) / net.std), atol=1e-5)


def test_channel_scales_reach_every_token_map_and_the_prefix_tokens():
    net = Segmenter(3, **tiny_vit()).eval()
    seen = []
    net.model.decoder.register_forward_pre_hook(lambda module, args: seen.append(args))
    images = torch.rand(2, 3, 28, 28)
    assert torch.allclose(net.forward_channel_scaled(images, torch.ones(2, net.encoder_width)), net(images), atol=1e-6)
    scales = torch.rand(2, net.encoder_width)
    net.forward_channel_scaled(images, scales)
    (maps, prefix), (scaled_maps, scaled_prefix) = seen[0], seen[2]
    for plain, scaled in zip(maps, scaled_maps):
        torch.testing.assert_close(scaled, plain * scales[:, :, None, None])
    for plain, scaled in zip(prefix, scaled_prefix):
        torch.testing.assert_close(scaled, plain * scales[:, None, :])
    with pytest.raises(ValueError, match=r"scales of shape \(2, 3\); expected \(2, 64\)"):
        net.forward_channel_scaled(images, torch.ones(2, 3))


def test_channel_scales_skip_a_cnn_input_and_cut_to_each_map():
    net = tiny().eval()
    seen = []
    net.model.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    images, scales = torch.rand(2, 3, 32, 32), torch.rand(2, net.encoder_width)
    net(images)
    net.forward_channel_scaled(images, scales)
    plain, scaled = seen
    assert torch.equal(scaled[0], plain[0])  # the input itself
    for a, b in zip(plain[1:], scaled[1:]):
        torch.testing.assert_close(b, a * scales[:, : a.shape[1], None, None])


@pytest.mark.parametrize("levels, expected", [("reference", [0, 3]), ("all", [0, 1, 2, 3])])
def test_vit_feature_perturbation_levels(levels, expected):
    net = Segmenter(3, **tiny_vit()).train()
    seen = []
    net.model.decoder.register_forward_pre_hook(lambda module, args: seen.append(args))
    torch.manual_seed(0)
    clean, perturbed = net.forward_perturbed(torch.rand(2, 3, 28, 28), 0.5, levels)
    ((maps, prefix),) = seen
    assert [i for i, f in enumerate(maps) if not torch.equal(*f.chunk(2))] == expected
    assert all(torch.equal(*t.chunk(2)) for t in prefix)  # the class tokens are not dropped
    assert clean.shape == perturbed.shape == (2, 3, 28, 28)


def test_dinov2_weights_by_name_and_from_a_local_file(weights_cache, tmp_path):
    # DINOv2-S/14's blocks at a tenth of its width: its named weights come through timm's loader,
    # from the Hugging Face cache (the default tag, lvd142m), like any tu- encoder's.
    narrow = {"embed_dim": 32, "num_heads": 2}
    state = random_state(timm.create_model("vit_small_patch14_dinov2", **narrow))
    cache_timm_hf_weights(weights_cache, "timm/vit_small_patch14_dinov2.lvd142m", state)
    kwargs = {"arch": "DPT", "encoder_name": "tu-vit_small_patch14_dinov2", "model_options": {**narrow, **TINY_DPT}}
    net = Segmenter(3, encoder_weights="imagenet", **kwargs)
    assert_weights_loaded(net.model.encoder.model, state)
    assert net(torch.rand(1, 3, 30, 30)).shape == (1, 3, 30, 30)  # 518 px position embeddings, interpolated
    path = tmp_path / "encoder.pth"
    torch.save(net.model.encoder.state_dict(), path)
    assert_weights_loaded(Segmenter(3, encoder_weights=str(path), **kwargs).model.encoder.model, state)
