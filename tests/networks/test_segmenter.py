import pytest
import torch

from src.networks import RepresentationHead, Segmenter


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


def test_encoder_weights_never_download():
    with pytest.raises(ValueError, match="encoder_weights='imagenet'.*local weights file"):
        tiny(encoder_weights="imagenet")


def test_representation_head_shape():
    head = RepresentationHead(32, output_dim=8, hidden_channels=16)
    assert head(torch.rand(2, 32, 5, 7)).shape == (2, 8, 5, 7)
