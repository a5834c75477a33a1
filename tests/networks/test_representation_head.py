import torch

from src.networks import RepresentationHead, projection_head


def test_heads_embed_every_location():
    features = torch.rand(2, 8, 5, 7)
    assert RepresentationHead(8, output_dim=4, hidden_channels=6)(features).shape == (2, 4, 5, 7)
    assert projection_head(8, 4)(features).shape == (2, 4, 5, 7)


def test_projection_head_is_c3s_mlp_with_small_initial_weights():
    torch.manual_seed(0)
    head = projection_head(64, 32)
    first, _, second = head
    assert first.kernel_size == second.kernel_size == (1, 1) and first.bias is not None and second.bias is not None
    for weight in (first.weight.detach(), second.weight.detach()):
        assert abs(float(weight.std()) - 0.01) < 0.002 and abs(float(weight.mean())) < 0.002
