"""The PhenoProfiler model: the paper's configuration as values, blocks and losses against hand values.

Expected numbers come from the paper and its public code (DESIGN.md §5, ../shared/reference/README.md,
which lists the published checkpoint's tensor sizes) or are worked out in the comments with plain
Python arithmetic, never from the code under test.  Tiny timm backbones (``test_resnet``) keep the
rest fast.
"""

from __future__ import annotations

import math
import socket
import time

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from phenoprofiler_core.errors import ConfigError
from phenoprofiler_core.model import (
    PROFILE_DIM,
    CentralDifferenceConv2d,
    GradientEncoder,
    LossWeights,
    ModelConfig,
    PhenoProfilerModel,
    ProjectionHead,
    TransformerBlock,
    classification_loss,
    combine_losses,
    compute_losses,
    contrastive_loss,
    create_backbone,
    create_model,
    fold_gradient_encoder,
    inference_model,
    mse_loss,
    paper_model_config,
)
from phenoprofiler_core.train import TrainConfig

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


# ----------------------------------------------------------------------------- the paper's configuration


def test_default_model_config_is_the_papers():
    # DESIGN.md §5 / paper code: resnet50, thetas 0.7 / 0.3, 1 block, 4 heads, FFN 4096, dropout 0.1,
    # 672-d profile, tau 1 (the published code's temperature), gradient encoder on.
    cfg = ModelConfig()
    assert cfg.backbone == "resnet50"
    assert tuple(cfg.thetas) == (0.7, 0.3)
    assert cfg.transformer_blocks == 1
    assert cfg.transformer_heads == 4
    assert cfg.transformer_ffn == 4096
    assert cfg.dropout == 0.1
    assert cfg.projection_dim == 672 and PROFILE_DIM == 672
    assert cfg.temperature == 1.0
    assert cfg.gradient_encoder is True
    assert cfg.pretrained is False and cfg.pretrained_file is None  # offline by default
    assert cfg.input_size is None
    paper = paper_model_config()
    assert paper.backbone == "resnet50" and paper.input_size == 448  # the paper's 448² input
    assert tuple(paper.thetas) == (0.7, 0.3) and paper.projection_dim == 672


def test_loss_weights_and_optimizer_are_the_papers():
    # Loss = 1 * contrastive + 100 * MSE + 0.1 * CE; AdamW lr 1e-3, weight decay 1e-3.
    weights = LossWeights()
    assert (weights.contrastive, weights.mse, weights.ce) == (1.0, 100.0, 0.1)
    train = TrainConfig()
    assert train.lr == 1e-3 and train.weight_decay == 1e-3
    assert TrainConfig.from_dict({}).loss_weights == {"contrastive": 1.0, "mse": 100.0, "ce": 0.1}


def test_config_schema_defaults_are_the_papers(repo_root):
    # The workflow fills missing keys from the schema's defaults: they must be the paper's too.
    schema = yaml.safe_load((repo_root / "workflow" / "schemas" / "config.schema.yaml").read_text())
    model = {k: v.get("default") for k, v in schema["properties"]["model"]["properties"].items()}
    assert model["backbone"] == "resnet50"
    assert model["thetas"] == [0.7, 0.3]
    assert model["transformer_blocks"] == 1 and model["transformer_heads"] == 4
    assert model["transformer_ffn"] == 4096 and model["dropout"] == 0.1
    assert model["projection_dim"] == 672 and model["temperature"] == 1.0
    assert model["gradient_encoder"] is True
    train = schema["properties"]["train"]["properties"]
    assert train["lr"]["default"] == 1e-3 and train["weight_decay"]["default"] == 1e-3
    loss = {k: v["default"] for k, v in train["loss_weights"]["properties"].items()}
    assert loss == {"contrastive": 1.0, "mse": 100.0, "ce": 0.1}


@pytest.fixture(scope="module")
def paper_model():
    return create_model(paper_model_config(), in_channels=5, num_classes=2913).eval()


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_model_has_the_published_sizes(paper_model):
    # Parameter counts of the published checkpoint (../shared/reference/README.md, "Size"), e.g. the
    # transformer block: attention 3*2048*2048 + 3*2048 + 2048*2048 + 2048, FFN 2048*4096 + 4096 +
    # 4096*2048 + 2048, two LayerNorms 4*2048 = 33,576,960; the gradient encoder 2*(5*3*9 + 6) +
    # (6*3 + 3 + 6) = 309.
    encoder = paper_model.image_encoder
    assert encoder.num_features == 2048  # ResNet50's pooled feature
    assert _n_params(encoder.conv) == 309
    assert _n_params(encoder.model) == 23_508_032
    assert _n_params(encoder.transformer_block) == 33_576_960
    assert _n_params(paper_model.image_projection) == 1_830_528
    assert _n_params(paper_model.classifier) == 1_960_449
    assert _n_params(paper_model) == 60_876_278
    # The same structure as values: 4 heads, FFN 4096, dropout 0.1, post-norm block, 2048 -> 672.
    block = encoder.transformer_block
    assert isinstance(block, TransformerBlock)
    assert block.attention.num_heads == 4 and block.attention.embed_dim == 2048
    assert block.attention.dropout == 0.1 and block.dropout.p == 0.1
    assert block.feed_forward[0].out_features == 4096 and isinstance(block.feed_forward[1], nn.ReLU)
    assert paper_model.image_projection.projection.in_features == 2048
    assert paper_model.image_projection.projection.out_features == 672
    assert paper_model.image_projection.dropout.p == 0.1
    assert paper_model.classifier.in_features == 672 and paper_model.classifier.out_features == 2913
    assert paper_model.regression_head is None  # the 672-d profile itself is regressed
    assert encoder.conv.branch1[0].theta == 0.7 and encoder.conv.branch2[0].theta == 0.3


def test_paper_model_turns_448_sites_into_672_d_profiles(paper_model):
    # 5 x 448² in (any other size is resized first), the gradient encoder halves it to the 224² the
    # ResNet50 stem expects, and out comes one 672-d profile per site.
    x = torch.rand(1, 5, 300, 300)
    with torch.no_grad():
        half = paper_model.image_encoder.conv(paper_model.prepare_input(x))
        profile = paper_model(x)
    assert half.shape == (1, 3, 224, 224)
    assert profile.shape == (1, 672)


# ----------------------------------------------------------------------------- central-difference conv

# Input x (1 channel):      kernel w (sum 8):
#   1 2 3                     1 0 2
#   4 5 6                     0 3 0
#   7 8 9                     1 1 0
# Stride 2, zero padding 1: outputs centred on x[0,0], x[0,2], x[2,0], x[2,2].  Cross-correlation:
#   at (0,0) the window is [[0,0,0],[0,1,2],[0,4,5]]: 3*1 + 1*4            = 7
#   at (0,2):              [[0,0,0],[2,3,0],[5,6,0]]: 3*3 + 1*5 + 1*6      = 20
#   at (2,0):              [[0,4,5],[0,7,8],[0,0,0]]: 2*5 + 3*7            = 31
#   at (2,2):              [[5,6,0],[8,9,0],[0,0,0]]: 1*5 + 3*9            = 32
# The central-difference term is theta * sum(w) * x at the centre = theta * 8 * [[1, 3], [7, 9]].
X33 = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)
W33 = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0], [1.0, 1.0, 0.0]]).reshape(1, 1, 3, 3)
PLAIN = torch.tensor([[7.0, 20.0], [31.0, 32.0]])
CENTRE = torch.tensor([[1.0, 3.0], [7.0, 9.0]])


def _cdc(theta: float, weight: torch.Tensor = W33) -> CentralDifferenceConv2d:
    cdc = CentralDifferenceConv2d(weight.shape[1], weight.shape[0], theta=theta)
    with torch.no_grad():
        cdc.conv.weight.copy_(weight)
    return cdc


@pytest.mark.parametrize(
    "theta, expected",
    [
        (0.25, [[5.0, 14.0], [17.0, 14.0]]),  # 7-2, 20-6, 31-14, 32-18
        (0.0, [[7.0, 20.0], [31.0, 32.0]]),  # a plain convolution
        (1.0, [[-1.0, -4.0], [-25.0, -40.0]]),  # 7-8, 20-24, 31-56, 32-72
    ],
)
def test_central_difference_conv_by_hand(theta, expected):
    with torch.no_grad():
        y = _cdc(theta)(X33)
    assert y.shape == (1, 1, 2, 2)
    torch.testing.assert_close(y[0, 0], torch.tensor(expected), rtol=0, atol=1e-5)


def test_central_difference_conv_defaults_are_the_first_branchs():
    # A bare CentralDifferenceConv2d is the gradient encoder's first branch: 3x3, stride 2, padding 1,
    # theta 0.7 (the paper's theta_1; CDC-Net's usual value), no bias (none in the published checkpoint).
    cdc = CentralDifferenceConv2d(5, 3)
    assert cdc.theta == 0.7 and cdc.conv.bias is None
    assert (cdc.conv.kernel_size, cdc.conv.stride, cdc.conv.padding) == ((3, 3), (2, 2), (1, 1))
    assert cdc.extra_repr() == "theta=0.7"


def test_central_difference_sums_the_kernel_over_channels_per_output():
    # A second input channel of ones with an all-ones kernel (sum 9): its plain response is the number
    # of in-image taps, 4 at every output (2x2 at each corner); its difference term 0.25 * 9 * 1.
    # Output channel 1 uses the negated kernels: exactly the negated output.
    weight = torch.zeros(2, 2, 3, 3)
    weight[0, 0], weight[0, 1] = W33[0, 0], 1.0
    weight[1] = -weight[0]
    with torch.no_grad():
        y = _cdc(0.25, weight)(torch.cat([X33, torch.ones(1, 1, 3, 3)], dim=1))
    first = PLAIN - 0.25 * 8 * CENTRE + (4 - 0.25 * 9)
    torch.testing.assert_close(y[0, 0], first, rtol=0, atol=1e-5)
    torch.testing.assert_close(y[0, 1], -first, rtol=0, atol=1e-5)
    assert "theta=0.25" in repr(_cdc(0.25))


def test_theta_one_constant_image_gives_zero_response_inside():
    torch.manual_seed(0)
    cdc = CentralDifferenceConv2d(5, 3, theta=1.0)
    x = torch.full((1, 5, 20, 20), 0.37)
    y = cdc(x)
    # Away from the zero-padded border every 3×3 window is constant, so the difference is zero.
    assert y[..., 1:, 1:].abs().max() < 1e-6
    # …whereas the plain convolution of the same image is clearly not zero (the test is meaningful).
    assert F.conv2d(x, cdc.conv.weight, stride=2, padding=1)[..., 1:, 1:].abs().max() > 1e-2


def test_gradient_encoder_by_hand():
    # One input channel, one output channel per branch; both branch kernels = w above, BatchNorms at
    # their initial eval state (scale 1/sqrt(1 + 1e-5), shift 0).
    #   branch1 (theta 0.7): PLAIN - 5.6 * CENTRE = [[1.4, 3.2], [-8.2, -18.4]] -> ReLU6 [[1.4, 3.2], [0, 0]]
    #   branch2 (theta 0.3): PLAIN - 2.4 * CENTRE = [[4.6, 12.8], [14.2, 10.4]] -> ReLU6 [[4.6, 6], [6, 6]]
    # Fusion 1x1 conv [1, -0.5] + 1:  [[1.4 - 2.3 + 1, 3.2 - 3 + 1], [0 - 3 + 1, 0 - 3 + 1]]
    #   = [[0.1, 1.2], [-2, -2]] -> ReLU6 -> [[0.1, 1.2], [0, 0]].
    gem = GradientEncoder(1, 1).eval()  # default thetas: the paper's (0.7, 0.3), in that order
    with torch.no_grad():
        gem.branch1[0].conv.weight.copy_(W33)
        gem.branch2[0].conv.weight.copy_(W33)
        gem.branch_last[0].weight.copy_(torch.tensor([1.0, -0.5]).reshape(1, 2, 1, 1))
        gem.branch_last[0].bias.fill_(1.0)
        y = gem(X33)
    assert y.shape == (1, 1, 2, 2)
    torch.testing.assert_close(y[0, 0], torch.tensor([[0.1, 1.2], [0.0, 0.0]]), rtol=0, atol=1e-4)


def test_gradient_encoder_maps_any_channel_count_to_three_at_half_size():
    for channels, size in [(5, 64), (3, 65), (1, 32)]:
        gem = GradientEncoder(channels)
        assert gem.branch1[0].conv.in_channels == channels
        assert gem.branch_last[0].out_channels == 3
        assert gem(torch.rand(2, channels, size, size)).shape == (2, 3, (size + 1) // 2, (size + 1) // 2)


def test_central_difference_folding_matches_the_encoder():
    # (inference form; kept from the original suite)
    torch.manual_seed(1)
    x = torch.rand(2, 4, 17, 17)
    gem = GradientEncoder(4, 3, (0.7, 0.3)).eval()
    _randomize_batchnorm(gem)
    with torch.no_grad():
        assert torch.allclose(fold_gradient_encoder(gem)(x), gem(x), atol=1e-5)


# ----------------------------------------------------------------------------- other blocks


def test_transformer_block_is_a_post_norm_encoder_layer():
    # torch's own TransformerEncoderLayer (post-norm, ReLU) with the same weights is the reference.
    torch.manual_seed(0)
    block = TransformerBlock(32, 4, 64, dropout=0.1).eval()
    ref = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, activation="relu", norm_first=False).eval()
    with torch.no_grad():
        ref.self_attn.load_state_dict(block.attention.state_dict())
        ref.linear1.load_state_dict(block.feed_forward[0].state_dict())
        ref.linear2.load_state_dict(block.feed_forward[2].state_dict())
        ref.norm1.load_state_dict(block.layernorm1.state_dict())
        ref.norm2.load_state_dict(block.layernorm2.state_dict())
        x = torch.randn(3, 6, 32)  # (sequence, batch, features)
        torch.testing.assert_close(block(x), ref(x), rtol=0, atol=1e-5)
    assert block.attention.num_heads == 4 and block.feed_forward[0].out_features == 64
    # the paper's dropout 0.1 is also the blocks' default
    default = TransformerBlock(8, 2, 16)
    assert default.dropout.p == 0.1 and default.attention.dropout == 0.1


def _gelu(v: float) -> float:
    return v * 0.5 * (1.0 + math.erf(v / math.sqrt(2.0)))  # exact (erf) GELU


def test_projection_head_by_hand():
    # Identity weights, zero biases, 3 features, x = (1, -1, 0.5):
    #   projected = x;  fc(GELU(x)) = GELU(x);  + projected;  LayerNorm (eps 1e-5, weight 1, bias 0).
    head = ProjectionHead(3, 3, dropout=0.1).eval()
    with torch.no_grad():
        for linear in (head.projection, head.fc):
            linear.weight.copy_(torch.eye(3))
            linear.bias.zero_()
        y = head(torch.tensor([[1.0, -1.0, 0.5]]))
    summed = [v + _gelu(v) for v in (1.0, -1.0, 0.5)]
    mean = sum(summed) / 3
    var = sum((v - mean) ** 2 for v in summed) / 3
    expected = torch.tensor([[(v - mean) / math.sqrt(var + 1e-5) for v in summed]])
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)
    assert head.dropout.p == 0.1 and head.layer_norm.normalized_shape == (3,)
    default = ProjectionHead(5)  # the paper's 672-d profile and dropout 0.1 by default
    assert default.projection.out_features == 672 and default.dropout.p == 0.1


# ----------------------------------------------------------------------------- model wiring and options


def test_model_heads_and_regression_target():
    torch.manual_seed(0)
    model = create_model(TINY, in_channels=5, num_classes=7, target_dim=10).eval()
    x = torch.rand(2, 5, 64, 64)
    with torch.no_grad():
        profile = model(x)
        assert profile.shape == (2, 672)
        torch.testing.assert_close(
            model.classifier(profile), profile @ model.classifier.weight.T + model.classifier.bias
        )
        head = model.regression_head
        assert (head.in_features, head.out_features) == (672, 10)
        torch.testing.assert_close(model.regression_output(profile), head(profile))
    # Target width = profile width (the paper's 672 CellProfiler features): the profile is regressed.
    for target_dim in (672, None):
        same = create_model(TINY, in_channels=5, num_classes=7, target_dim=target_dim)
        assert same.regression_head is None and same.target_dim == 672
        assert same.regression_output(profile) is profile
    assert create_model(TINY, in_channels=5).classifier is None  # no classes, no classifier
    assert PhenoProfilerModel(5, ModelConfig(**TINY)).classifier is None
    assert PhenoProfilerModel(5, ModelConfig(**TINY), num_classes=1).classifier.out_features == 1


def test_profiles_of_a_batch_are_independent():
    # Each site's profile depends only on that site (eval mode): the transformer block sees a
    # length-1 sequence per site, never the other sites of the batch as a sequence.
    torch.manual_seed(0)
    model = create_model({**TINY, "transformer_heads": 2}, in_channels=3).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
        encoder = model.image_encoder
        pooled = encoder.model(encoder.conv(x))
        one_token = encoder.transformer_block(pooled[:1].unsqueeze(0)).squeeze(0)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    # the block's output for site 0 alone is what the model used for site 0
    torch.testing.assert_close(model.image_projection(one_token), together[:1], rtol=0, atol=1e-5)
    assert not torch.allclose(model.image_projection(pooled[:1]), together[:1], atol=1e-3)  # the block acts


def test_option_thetas_reach_the_gradient_encoder():
    model = create_model({**TINY, "thetas": [0.5, 0.2]}, in_channels=3)
    assert model.image_encoder.conv.branch1[0].theta == 0.5
    assert model.image_encoder.conv.branch2[0].theta == 0.2


def test_option_gradient_encoder_off():
    model = create_model({**TINY, "gradient_encoder": False}, in_channels=5)
    assert isinstance(model.image_encoder.conv, nn.Identity)
    stem = next(m for m in model.image_encoder.model.modules() if isinstance(m, nn.Conv2d))
    assert stem.in_channels == 5  # the backbone takes the raw channels
    with_gem = create_model(TINY, in_channels=5)
    assert isinstance(with_gem.image_encoder.conv, GradientEncoder)
    stem = next(m for m in with_gem.image_encoder.model.modules() if isinstance(m, nn.Conv2d))
    assert stem.in_channels == 3


def test_option_transformer_blocks():
    torch.manual_seed(0)
    none = create_model({**TINY, "transformer_blocks": 0}, in_channels=3).eval()
    assert isinstance(none.image_encoder.transformer_block, nn.Identity)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():  # without blocks the encoder's output is the pooled backbone feature
        torch.testing.assert_close(
            none.image_encoder(x), none.image_encoder.model(none.image_encoder.conv(x)), rtol=0, atol=0
        )
    two = create_model({**TINY, "transformer_blocks": 2, "transformer_heads": 2}, in_channels=3)
    blocks = two.image_encoder.transformer_block
    assert isinstance(blocks, nn.Sequential) and len(blocks) == 2
    assert all(isinstance(b, TransformerBlock) and b.attention.num_heads == 2 for b in blocks)
    assert all(b.feed_forward[0].out_features == 64 for b in blocks)
    one = create_model(TINY, in_channels=3)
    assert isinstance(one.image_encoder.transformer_block, TransformerBlock)  # stored bare (checkpoint keys)


def test_option_input_size_resizes_with_antialiased_bilinear():
    model = create_model({**TINY, "input_size": 48}, in_channels=3).eval()
    x = torch.rand(2, 3, 64, 64)
    expected = F.interpolate(x, size=(48, 48), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(model.prepare_input(x), expected, rtol=0, atol=0)
    already = torch.rand(2, 3, 48, 48)
    assert model.prepare_input(already) is already  # the right size is passed through untouched
    unsized = create_model(TINY, in_channels=3)
    assert unsized.prepare_input(x) is x  # input_size None: tiles as stored
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(expected), rtol=0, atol=1e-6)


def test_option_projection_dim_and_dropout():
    model = create_model({**TINY, "projection_dim": 32, "dropout": 0.25}, in_channels=3, num_classes=2).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 32)
    assert model.classifier.in_features == 32
    assert model.image_projection.dropout.p == 0.25
    assert model.image_encoder.transformer_block.dropout.p == 0.25


def test_model_config_validation_and_round_trip():
    cfg = ModelConfig.from_dict({"thetas": [1, 0], "backbone": "test_resnet"})
    assert cfg.thetas == (1.0, 0.0) and all(isinstance(t, float) for t in cfg.thetas)
    assert cfg.to_dict()["thetas"] == [1.0, 0.0] and cfg.to_dict()["backbone"] == "test_resnet"
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_dict(None) == ModelConfig(thetas=(0.7, 0.3))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in config section 'model': \['thetaz'\]"):
        ModelConfig.from_dict({"thetaz": [0.1, 0.2]})
    with pytest.raises(ConfigError, match=r"'net'.*\['a'\]"):
        ModelConfig.from_dict({"a": 1}, where="net")
    with pytest.raises(ConfigError, match=r"model\.thetas must hold two numbers.*\[0\.5\]"):
        ModelConfig.from_dict({"thetas": [0.5]})
    with pytest.raises(ConfigError, match=r"transformer_blocks must be >= 0, got -1"):
        ModelConfig.from_dict({"transformer_blocks": -1})
    assert ModelConfig.from_dict({"transformer_blocks": 0}).transformer_blocks == 0
    with pytest.raises(ConfigError, match=r"temperature must be > 0, got 0"):
        ModelConfig.from_dict({"temperature": 0})


def test_factory_rejects_bad_backbones_and_channel_counts():
    with pytest.raises(ConfigError, match="'no_such_net' is not a timm model name"):
        create_model({"backbone": "no_such_net"}, in_channels=5)
    with pytest.raises(ConfigError, match="at least one input channel, got 0"):
        create_model(TINY, in_channels=0)
    model = create_model(ModelConfig(backbone="test_resnet", transformer_ffn=64), in_channels=1)
    assert model.in_channels == 1 and model.config.backbone == "test_resnet"


def test_backbone_has_no_classifier_and_average_pooling():
    backbone = create_backbone("test_resnet", in_chans=4).eval()
    with torch.no_grad():
        features = backbone(torch.rand(2, 4, 32, 32))
    assert features.shape == (2, backbone.num_features)  # pooled features, no class logits
    # Any timm name: a vision transformer's default would be its class token; we average the tokens.
    vit = create_backbone("test_vit").eval()
    assert vit.global_pool == "avg" and vit.num_classes == 0
    x = torch.rand(1, 3, vit.default_cfg["input_size"][1], vit.default_cfg["input_size"][2])
    with torch.no_grad():
        tokens = vit.forward_features(x)
        expected = vit.fc_norm(tokens[:, vit.num_prefix_tokens :].mean(dim=1))
        torch.testing.assert_close(vit(x), expected, rtol=0, atol=1e-5)


def test_pretrained_fails_fast_and_clearly_offline():
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=3):
            pytest.skip("huggingface.co is reachable here; the offline error path cannot be exercised")
    except OSError:
        pass
    start = time.monotonic()
    with pytest.raises(
        ConfigError,
        match=r"not in the local cache and huggingface\.co cannot be reached .*; download them once on a "
        r"connected machine, set model\.pretrained_file to a local weights file, or set model\.pretrained: false$",
    ):
        create_backbone("resnet18", pretrained=True)
    assert time.monotonic() - start < 30
    with pytest.raises(ConfigError, match=r"pretrained_file: /nonexistent/weights\.pth does not exist"):
        create_backbone("resnet18", pretrained=True, pretrained_file="/nonexistent/weights.pth")


def test_pretrained_file_loads_local_weights(tmp_path):
    import timm

    torch.manual_seed(3)
    source = timm.create_model("resnet10t")  # a full ImageNet-shaped model, as a weights file holds
    path = tmp_path / "resnet10t.pth"
    torch.save(source.state_dict(), path)
    backbone = create_backbone("resnet10t", pretrained=True, pretrained_file=str(path)).eval()
    assert torch.equal(backbone.conv1[0].weight, source.conv1[0].weight)
    with torch.no_grad():  # still a feature extractor: pooled features, no ImageNet classifier
        assert backbone(torch.rand(1, 3, 32, 32)).shape == (1, backbone.num_features)
    # and through the model factory (the gradient encoder turns 5 channels into the 3 the stem expects)
    model = create_model(
        {"backbone": "resnet10t", "pretrained": True, "pretrained_file": str(path), "transformer_ffn": 64},
        in_channels=5,
    )
    assert torch.equal(model.image_encoder.model.layer4[0].conv1.weight, source.layer4[0].conv1.weight)


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_pretrained_weights_in_the_hugging_face_cache_load_offline(tmp_path, monkeypatch, filename):
    # timm's default weights for resnet10t are the Hub repo timm/resnet10t.c3_in1k.  A file laid out
    # as the Hub cache keeps it (refs/main -> snapshots/<commit>/<file>) is used with no network.
    import huggingface_hub.constants
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(4)
    source = timm.create_model("resnet10t")
    repo = tmp_path / "models--timm--resnet10t.c3_in1k"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if filename.endswith(".safetensors"):
        save_file(state, str(snapshot / filename))
    else:
        torch.save(state, snapshot / filename)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))

    def no_hub(*args, **kwargs):  # the cached file is read directly: timm must not ask the Hub
        raise AssertionError(f"Hub download attempted: {args} {kwargs}")

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_hub)
    backbone = create_backbone("resnet10t", pretrained=True).eval()
    assert torch.equal(backbone.layer4[0].conv1.weight, source.layer4[0].conv1.weight)
    with torch.no_grad():  # still a feature extractor: pooled features, no ImageNet classifier
        assert backbone(torch.rand(1, 3, 32, 32)).shape == (1, backbone.num_features)


def test_inference_model_matches_eval_model():
    # (inference form; kept from the original suite)
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


# ----------------------------------------------------------------------------- losses by hand

# Embeddings E and targets T (2 items, 2 features), logits and labels for the CE:
E = [[1.0, 0.0], [0.0, 1.0]]
T = [[1.0, 0.0], [1.0, 1.0]]
LOGITS = [[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
LABELS = [0, 2]


def _contrastive_by_hand(emb, tgt, tau):
    """The paper's loss in plain Python: mean_i sum_j -softmax(((E E^T + T T^T)/2)/tau)_ij * log_softmax(E T^T/tau)_ij."""

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    total = 0.0
    for i in range(len(emb)):
        logits = [dot(emb[i], tgt[j]) / tau for j in range(len(tgt))]
        sims = [(dot(emb[i], emb[j]) + dot(tgt[i], tgt[j])) / 2 / tau for j in range(len(emb))]
        log_norm = math.log(sum(math.exp(v) for v in logits))
        label_norm = sum(math.exp(v) for v in sims)
        total += -sum(math.exp(s) / label_norm * (lg - log_norm) for s, lg in zip(sims, logits))
    return total / len(emb)


def test_contrastive_loss_by_hand():
    # tau = 1: logits E T^T = [[1, 1], [0, 1]]; soft labels softmax([[1, .5], [.5, 1.5]]).
    #   row 0: -(0.6225 * -ln 2 + 0.3775 * -ln 2) = ln 2 = 0.693147
    #   row 1: -(0.268941 * -1.313262 + 0.731059 * -0.313262) = 0.582203      mean 0.637675
    got = contrastive_loss(torch.tensor(E), torch.tensor(T), temperature=1.0)
    assert float(got) == pytest.approx(0.637675, abs=1e-6)
    assert float(got) == pytest.approx(_contrastive_by_hand(E, T, 1.0), abs=1e-6)
    # tau = 2 divides both the logits and the label similarities: 0.677998
    got = contrastive_loss(torch.tensor(E), torch.tensor(T), temperature=2.0)
    assert float(got) == pytest.approx(0.677998, abs=1e-6)
    assert float(got) == pytest.approx(_contrastive_by_hand(E, T, 2.0), abs=1e-6)
    # The default temperature is the published code's 1.
    assert float(contrastive_loss(torch.tensor(E), torch.tensor(T))) == pytest.approx(0.637675, abs=1e-6)


def test_contrastive_loss_is_image_to_target_only():
    # Like the published code, only rows of E T^T are scored (not also the target->image direction):
    # swapping the roles of E and T gives another value (here logits T E^T = [[1, 0], [1, 1]]).
    forward = _contrastive_by_hand(E, T, 1.0)
    swapped = float(contrastive_loss(torch.tensor(T), torch.tensor(E)))
    assert swapped == pytest.approx(_contrastive_by_hand(T, E, 1.0), abs=1e-6)
    assert abs(swapped - forward) > 1e-2


def test_contrastive_loss_on_a_random_batch_matches_the_formula():
    torch.manual_seed(0)
    emb, tgt = torch.randn(5, 4), torch.randn(5, 4)
    expected = _contrastive_by_hand(emb.tolist(), tgt.tolist(), 0.5)
    assert float(contrastive_loss(emb, tgt, temperature=0.5)) == pytest.approx(expected, rel=1e-5)
    # computed in float32 whatever the input precision (mixed-precision training)
    assert contrastive_loss(emb.half(), tgt.half()).dtype == torch.float32


def test_mse_and_cross_entropy_by_hand():
    # MSE: differences 1, 0, -2, 3 -> (1 + 0 + 4 + 9)/4 = 3.5
    assert (
        float(mse_loss(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 2.0], [5.0, 1.0]]))) == 3.5
    )
    # CE: row 0 -log(e^2/(e^2+2)) = log(1 + 2e^-2) = 0.239545; row 1 log 3 = 1.098612; mean 0.669079
    ce = classification_loss(torch.tensor(LOGITS), torch.tensor(LABELS))
    assert float(ce) == pytest.approx((math.log(1 + 2 * math.exp(-2)) + math.log(3)) / 2, abs=1e-6)
    assert mse_loss(torch.ones(2, 2).half(), torch.zeros(2, 2).half()).dtype == torch.float32


def test_combined_loss_by_hand_with_the_papers_weights():
    # MSE(E, T) = (0 + 0 + 1 + 0)/4 = 0.25; contrastive 0.637675; CE 0.669079.
    # Total = 1 * 0.637675 + 100 * 0.25 + 0.1 * 0.669079 = 25.704583.
    parts = combine_losses(
        torch.tensor(E), torch.tensor(LOGITS), torch.tensor(T), torch.tensor(LABELS), LossWeights(), 1.0
    )
    assert float(parts["mse"]) == pytest.approx(0.25)
    assert float(parts["contrastive"]) == pytest.approx(0.637675, abs=1e-6)
    assert float(parts["ce"]) == pytest.approx(0.669079, abs=1e-6)
    assert float(parts["loss"]) == pytest.approx(25.704583, abs=1e-5)
    # Without class labels (or logits) the CE part is 0 and the total is 1 * 0.637675 + 100 * 0.25.
    for logits, labels in [(None, torch.tensor(LABELS)), (torch.tensor(LOGITS), None)]:
        parts = combine_losses(torch.tensor(E), logits, torch.tensor(T), labels, LossWeights(), 1.0)
        assert float(parts["ce"]) == 0.0
        assert float(parts["loss"]) == pytest.approx(25.637675, abs=1e-5)
    # The temperature reaches the contrastive part (tau = 2: 0.677998).
    parts = combine_losses(torch.tensor(E), None, torch.tensor(T), None, LossWeights(mse=0.0), 2.0)
    assert float(parts["loss"]) == pytest.approx(0.677998, abs=1e-6)


def test_compute_losses_uses_the_models_outputs():
    # compute_losses = combine_losses on (regression output, classifier logits) of the model.
    torch.manual_seed(0)
    model = create_model(
        {**TINY, "dropout": 0.0, "temperature": 0.5}, in_channels=5, num_classes=3, target_dim=8
    )
    model.eval()
    images, targets, labels = torch.rand(4, 5, 32, 32), torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        parts = compute_losses(model, images, targets, labels, LossWeights())
        profile = model(images)
        prediction = model.regression_head(profile)
        logits = model.classifier(profile)
    assert float(parts["mse"]) == pytest.approx(float(((prediction - targets) ** 2).mean()), rel=1e-5)
    assert float(parts["ce"]) == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
    expected_c = _contrastive_by_hand(prediction.tolist(), targets.tolist(), 0.5)
    assert float(parts["contrastive"]) == pytest.approx(expected_c, rel=1e-4)
    # A model without a classifier reports CE 0 even when labels are given.
    plain = create_model(TINY, in_channels=5, target_dim=8).eval()
    with torch.no_grad():
        assert float(compute_losses(plain, images, targets, labels, LossWeights())["ce"]) == 0.0


@pytest.mark.parametrize("loss_name", ["mse", "ce", "contrastive"])
def test_one_gradient_step_lowers_each_loss(loss_name):
    # The loss is connected to the weights with the right sign: a small step against the gradient
    # lowers it (first order), and the weights that produce it get a gradient.
    torch.manual_seed(0)
    model = create_model({**TINY, "dropout": 0.0}, in_channels=5, num_classes=3, target_dim=8).eval()
    images = F.interpolate(torch.rand(6, 5, 4, 4), size=(32, 32), mode="nearest")
    targets, labels = torch.randn(6, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    weights = LossWeights(**{"mse": 0.0, "ce": 0.0, "contrastive": 0.0, loss_name: 1.0})
    before = compute_losses(model, images, targets, labels, weights)
    before["loss"].backward()
    assert model.image_projection.projection.weight.grad.abs().max() > 0
    assert model.image_encoder.conv.branch1[0].conv.weight.grad.abs().max() > 0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-5 / norm * p.grad  # a short step (length 1e-5) downhill
        after = compute_losses(model, images, targets, labels, weights)
    assert float(after[loss_name]) < float(before[loss_name].detach())


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
    assert not parts["ce"].requires_grad and not parts["contrastive"].requires_grad  # reported, detached
    assert float(parts["ce"]) > 0 and float(parts["contrastive"]) > 0


# ----------------------------------------------------------------------------- reaching the weights


def test_a_hub_id_with_a_revision_finds_the_cached_repo(tmp_path, monkeypatch):
    # timm writes a pinned Hub revision as 'repo@revision' (timm.models._hub.hf_split); the cache is
    # laid out by repo name, so the revision must be cut off before looking there.
    import dataclasses

    import huggingface_hub.constants
    import timm

    from phenoprofiler_core.model import _cached_weights

    repo = tmp_path / "models--timm--resnet10t.c3_in1k"
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd" / "model.safetensors").write_bytes(b"weights")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    real_cfg = timm.models.get_pretrained_cfg("resnet10t")
    pinned = dataclasses.replace(real_cfg, hf_hub_id="timm/resnet10t.c3_in1k@0123abcd")
    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda name: pinned)
    assert _cached_weights("resnet10t") == str(repo / "snapshots" / "0123abcd" / "model.safetensors")
    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda name: None)  # no pretrained config
    assert _cached_weights("resnet10t") is None


def test_reachability_check_asks_the_right_host_once_with_a_short_timeout(monkeypatch):
    # No network here: a stand-in for socket.create_connection records what would be asked and
    # fails as an offline machine does.  Weights on the Hub -> huggingface.co; timm models without a
    # Hub id download from download.pytorch.org.  Port 443 (https), 3 s: fail fast, not hang.
    import timm

    from phenoprofiler_core.model import _require_reachable

    asked = []

    def offline(address, timeout=None):
        asked.append((address, timeout))
        raise OSError("network unreachable (test)")

    import dataclasses

    real_cfg = timm.models.get_pretrained_cfg("resnet10t")
    monkeypatch.setattr(socket, "create_connection", offline)
    with pytest.raises(
        ConfigError, match=r"huggingface\.co cannot be reached \(network unreachable \(test\)\)"
    ):
        _require_reachable("resnet10t")
    assert asked == [(("huggingface.co", 443), 3.0)]
    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda name: None)
    with pytest.raises(ConfigError, match=r"and download\.pytorch\.org cannot be reached"):
        _require_reachable("resnet10t")
    assert asked[-1] == (("download.pytorch.org", 443), 3.0)
    # a pretrained config without a Hub id (weights hosted by pytorch.org) also asks pytorch.org
    no_hub_id = dataclasses.replace(real_cfg, hf_hub_id=None)
    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda name: no_hub_id)
    with pytest.raises(ConfigError, match=r"and download\.pytorch\.org cannot be reached"):
        _require_reachable("resnet10t")
    assert asked[-1] == (("download.pytorch.org", 443), 3.0)

    class Connection:  # reachable: the check returns quietly
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: Connection())
    assert _require_reachable("resnet10t") is None


class _Reachable:
    """What socket.create_connection returns when the host answers (a context manager)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_weights_from_the_hub_when_it_answers_and_a_clear_error_when_it_fails(tmp_path, monkeypatch):
    # No network here: stand-ins for the reachable host and for timm's Hub download.  When the Hub
    # hands over the weights file they are loaded into a feature extractor; when the download fails,
    # a ConfigError says what failed and what to set instead.
    import huggingface_hub.constants
    import timm
    from safetensors.torch import save_file

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: _Reachable())
    torch.manual_seed(5)
    source = timm.create_model("resnet10t")
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    asked = []

    def hub(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return str(weights)

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", hub)
    backbone = create_backbone("resnet10t", pretrained=True, in_chans=3).eval()
    assert asked == [("timm/resnet10t.c3_in1k", "model.safetensors")]
    assert torch.equal(backbone.layer4[0].conv1.weight, source.layer4[0].conv1.weight)
    with torch.no_grad():  # a feature extractor: pooled features, no ImageNet classifier
        assert backbone(torch.rand(1, 3, 32, 32)).shape == (1, backbone.num_features)

    def hub_down(repo_id, filename, **kwargs):
        raise OSError("503 from the Hub (test)")

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", hub_down)
    with pytest.raises(
        ConfigError,
        match=r"^model\.pretrained: could not get pretrained weights for timm model 'resnet10t' \(OSError: 503 "
        r"from the Hub \(test\)\); set model\.pretrained_file to a local weights file or model\.pretrained: false$",
    ):
        create_backbone("resnet10t", pretrained=True)
