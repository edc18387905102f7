"""Blocks, factory and losses of the PhenoProfiler model (tiny backbones, small images)."""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from phenoprofiler_core.errors import ConfigError
from phenoprofiler_core.model import (
    CentralDifferenceConv2d,
    GradientEncoder,
    LossWeights,
    ModelConfig,
    ProjectionHead,
    TransformerBlock,
    compute_losses,
    contrastive_loss,
    create_backbone,
    create_model,
    fold_gradient_encoder,
    inference_model,
)

TINY = {"backbone": "test_resnet", "transformer_ffn": 64}


def _randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics, so that folding tests are not passed by identity BNs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)


# ----------------------------------------------------------------------------- gradient encoder


def test_theta_zero_is_a_plain_convolution():
    torch.manual_seed(0)
    cdc = CentralDifferenceConv2d(5, 3, theta=0.0)
    x = torch.rand(2, 5, 20, 20)
    expected = F.conv2d(x, cdc.conv.weight, stride=2, padding=1)
    assert torch.equal(cdc(x), expected)


def test_theta_one_constant_image_gives_zero_response_inside():
    torch.manual_seed(0)
    cdc = CentralDifferenceConv2d(5, 3, theta=1.0)
    x = torch.full((1, 5, 20, 20), 0.37)
    y = cdc(x)
    # Away from the zero-padded border every 3×3 window is constant, so the difference is zero.
    assert y[..., 1:, 1:].abs().max() < 1e-6
    # …whereas the plain convolution of the same image is clearly not zero (the test is meaningful).
    assert F.conv2d(x, cdc.conv.weight, stride=2, padding=1)[..., 1:, 1:].abs().max() > 1e-2


def test_central_difference_formula_and_folding():
    torch.manual_seed(1)
    cdc = CentralDifferenceConv2d(4, 3, theta=0.3)
    x = torch.rand(2, 4, 17, 17)
    w = cdc.conv.weight
    expected = F.conv2d(x, w, stride=2, padding=1) - 0.3 * F.conv2d(x, w.sum((2, 3), keepdim=True), stride=2)
    assert torch.allclose(cdc(x), expected, atol=1e-6)

    gem = GradientEncoder(4, 3, (0.7, 0.3)).eval()
    _randomize_batchnorm(gem)
    with torch.no_grad():
        assert torch.allclose(fold_gradient_encoder(gem)(x), gem(x), atol=1e-5)


@pytest.mark.parametrize("channels,size", [(5, 64), (3, 65), (1, 32)])
def test_gradient_encoder_shapes(channels, size):
    gem = GradientEncoder(channels, 3, (0.7, 0.3))
    y = gem(torch.rand(2, channels, size, size))
    assert y.shape == (2, 3, (size + 1) // 2, (size + 1) // 2)
    assert y.min() >= 0 and y.max() <= 6  # ReLU6


# ----------------------------------------------------------------------------- other blocks


def test_transformer_block_is_a_post_norm_encoder_layer():
    torch.manual_seed(0)
    block = TransformerBlock(32, 4, 64, dropout=0.1).eval()
    ref = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, activation="relu", norm_first=False).eval()
    with torch.no_grad():
        ref.self_attn.load_state_dict(block.attention.state_dict())
        ref.linear1.load_state_dict(block.feed_forward[0].state_dict())
        ref.linear2.load_state_dict(block.feed_forward[2].state_dict())
        ref.norm1.load_state_dict(block.layernorm1.state_dict())
        ref.norm2.load_state_dict(block.layernorm2.state_dict())
        x = torch.randn(1, 6, 32)  # (sequence, batch, features)
        assert block(x).shape == (1, 6, 32)
        assert torch.allclose(block(x), ref(x), atol=1e-5)


def test_projection_head_shape_and_residual():
    torch.manual_seed(0)
    head = ProjectionHead(48, 672, dropout=0.1).eval()
    x = torch.randn(3, 48)
    y = head(x)
    assert y.shape == (3, 672)
    projected = head.projection(x)
    expected = F.layer_norm(
        head.fc(F.gelu(projected)) + projected, (672,), head.layer_norm.weight, head.layer_norm.bias
    )
    assert torch.allclose(y, expected, atol=1e-5)


def test_full_model_shapes_and_heads():
    torch.manual_seed(0)
    model = create_model(TINY, in_channels=5, num_classes=7, target_dim=10).eval()
    x = torch.rand(2, 5, 64, 64)
    profile = model(x)
    assert profile.shape == (2, 672)
    assert model.classifier(profile).shape == (2, 7)
    assert model.regression_output(profile).shape == (2, 10)
    # Target width = profile width: the profile itself is regressed (the paper), no extra head.
    same = create_model(TINY, in_channels=5, num_classes=7, target_dim=672)
    assert same.regression_head is None


@pytest.mark.parametrize(
    "options",
    [
        {"gradient_encoder": False},
        {"transformer_blocks": 0},
        {"transformer_blocks": 2, "transformer_heads": 2},
        {"input_size": 48},
        {"projection_dim": 32},
    ],
)
def test_ablations_and_options_build_and_run(options):
    model = create_model({**TINY, **options}, in_channels=3, num_classes=2).eval()
    with torch.no_grad():
        y = model(torch.rand(2, 3, 64, 64))
    assert y.shape == (2, options.get("projection_dim", 672))
    assert torch.isfinite(y).all()
    if options.get("gradient_encoder") is False:
        assert isinstance(model.image_encoder.conv, nn.Identity)


def test_unknown_config_key_and_backbone_are_rejected():
    with pytest.raises(ConfigError, match="thetaz"):
        ModelConfig.from_dict({"thetaz": [0.1, 0.2]})
    with pytest.raises(ConfigError, match="no_such_net"):
        create_model({"backbone": "no_such_net"}, in_channels=5)


def test_pretrained_fails_fast_and_clearly_offline():
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=3):
            pytest.skip("huggingface.co is reachable here; the offline error path cannot be exercised")
    except OSError:
        pass
    start = time.monotonic()
    with pytest.raises(ConfigError, match="pretrained"):
        create_backbone("resnet18", pretrained=True)
    assert time.monotonic() - start < 30
    with pytest.raises(ConfigError, match="pretrained_file"):
        create_backbone("resnet18", pretrained=True, pretrained_file="/nonexistent/weights.pth")


def test_inference_model_matches_eval_model():
    torch.manual_seed(0)
    model = create_model({"backbone": "resnet10t", "transformer_ffn": 64}, in_channels=5).eval()
    _randomize_batchnorm(model)
    fast = inference_model(model)
    x = torch.rand(3, 5, 64, 64)
    with torch.inference_mode():
        reference = model(x)
        optimized = fast(x.contiguous(memory_format=torch.channels_last))
    assert (reference - optimized).abs().max() < 1e-4
    # The optimized copy really is different code: no BatchNorm left in the gradient encoder.
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.image_encoder.conv.modules())


# ----------------------------------------------------------------------------- losses


def test_contrastive_loss_prefers_matching_pairs():
    torch.manual_seed(0)
    targets = F.normalize(torch.randn(6, 16), dim=1)
    matched = contrastive_loss(targets.clone(), targets, temperature=0.1)
    shuffled = contrastive_loss(targets[torch.tensor([1, 2, 3, 4, 5, 0])], targets, temperature=0.1)
    assert matched < shuffled


@pytest.mark.parametrize("loss_name", ["mse", "ce", "contrastive"])
def test_each_loss_falls_when_overfitting_a_tiny_batch(loss_name):
    torch.manual_seed(0)
    model = create_model({**TINY, "dropout": 0.0}, in_channels=5, num_classes=3, target_dim=8).train()
    # Blocky random patterns: images that differ in structure, not only in pixel noise.
    images = F.interpolate(torch.rand(6, 5, 4, 4), size=(32, 32), mode="nearest")
    targets = torch.randn(6, 8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    weights = LossWeights(**{"mse": 0.0, "ce": 0.0, "contrastive": 0.0, loss_name: 1.0})
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    values = []
    for _ in range(30):
        parts = compute_losses(model, images, targets, labels, weights)
        optimizer.zero_grad()
        parts["loss"].backward()
        optimizer.step()
        values.append(float(parts[loss_name].detach()))
    assert values[-1] < 0.2 * values[0], (loss_name, values[0], values[-1])


def test_zero_weight_loss_gives_no_gradient():
    torch.manual_seed(0)
    model = create_model(TINY, in_channels=5, num_classes=3, target_dim=8)
    parts = compute_losses(
        model,
        torch.rand(4, 5, 32, 32),
        torch.randn(4, 8),
        torch.tensor([0, 1, 2, 0]),
        LossWeights(contrastive=0.0, mse=1.0, ce=0.0),
    )
    parts["loss"].backward()
    assert model.classifier.weight.grad is None or model.classifier.weight.grad.abs().max() == 0
    assert torch.isclose(parts["loss"], parts["mse"])


def test_pretrained_file_loads_local_weights(tmp_path):
    import timm

    torch.manual_seed(3)
    source = timm.create_model("resnet10t")  # a full ImageNet-shaped model, as a weights file holds
    path = tmp_path / "resnet10t.pth"
    torch.save(source.state_dict(), path)
    backbone = create_backbone("resnet10t", pretrained=True, pretrained_file=str(path))
    assert torch.equal(backbone.conv1[0].weight, source.conv1[0].weight)
    # and through the model factory (the gradient encoder turns 5 channels into the 3 the stem expects)
    model = create_model(
        {"backbone": "resnet10t", "pretrained": True, "pretrained_file": str(path), "transformer_ffn": 64},
        in_channels=5,
    )
    assert torch.equal(model.image_encoder.model.layer4[0].conv1.weight, source.layer4[0].conv1.weight)
