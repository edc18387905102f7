"""The PhenoProfiler model: named blocks, a factory, and the three training losses.

Architecture (arXiv 2502.19568 and its public code, see ``../shared/reference/README.md``):

    image (B, C, S, S) ──► image_encoder.conv            gradient encoder, C → 3 channels, S → S/2
                       ──► image_encoder.model           timm backbone, classifier removed, avg pool
                       ──► image_encoder.transformer_block  post-norm block over a length-1 sequence
                       ──► image_projection              Linear, GELU, Linear, dropout, residual, LayerNorm
                       ══► profile (B, 672)
    profile ──► classifier (treatment logits)      profile ──► regression_head (only if target dim ≠ 672)

Module and parameter names mirror the published checkpoint on purpose, so that for the paper's
configuration (``resnet50``, 5 channels, one block) ``model.state_dict()`` has exactly the published
keys plus, at most, our own ``regression_head.*`` (see :mod:`phenoprofiler_core.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

log = logging.getLogger(__name__)

PROFILE_DIM = 672  # the paper's profile width (its number of CellProfiler target features)


# ----------------------------------------------------------------------------- configuration


@dataclass
class ModelConfig:
    """Options of the ``model`` config section (see the schema for descriptions)."""

    backbone: str = "resnet50"
    pretrained: bool = False
    pretrained_file: str | None = None
    gradient_encoder: bool = True
    thetas: Sequence[float] = (0.7, 0.3)
    transformer_blocks: int = 1
    transformer_heads: int = 4
    transformer_ffn: int = 4096
    dropout: float = 0.1
    projection_dim: int = PROFILE_DIM
    temperature: float = 1.0
    input_size: int | None = None

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None, *, where: str = "model") -> ModelConfig:
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"unknown key(s) in config section '{where}': {unknown}; known: {sorted(known)}"
            )
        cfg = cls(**options)
        cfg.thetas = tuple(float(t) for t in cfg.thetas)
        if len(cfg.thetas) != 2:
            raise ConfigError(
                f"{where}.thetas must hold two numbers (one per gradient branch), got {list(cfg.thetas)}"
            )
        if cfg.transformer_blocks < 0:
            raise ConfigError(f"{where}.transformer_blocks must be >= 0, got {cfg.transformer_blocks}")
        if cfg.temperature <= 0:
            raise ConfigError(f"{where}.temperature must be > 0, got {cfg.temperature}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["thetas"] = list(self.thetas)
        return out


def paper_model_config() -> ModelConfig:
    """The configuration of the published PhenoProfiler model (for loading its weights)."""
    return ModelConfig(backbone="resnet50", input_size=448)


# ----------------------------------------------------------------------------- blocks


class CentralDifferenceConv2d(nn.Module):
    """Central-difference convolution: ``y = conv(x) − θ · conv1x1(x, Σ_spatial w)``.

    The second term is the kernel's spatial sum applied as a 1×1 convolution at the same stride, so
    the output responds to local intensity *differences* (gradients) rather than to the level: with
    θ = 1 a constant image gives zero away from the zero-padded border; with θ = 0 this is a plain
    convolution.  The weight lives in ``self.conv`` (no bias) as in the published checkpoint.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 2,
        padding: int = 1,
        theta: float = 0.7,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False
        )
        self.theta = float(theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if self.theta == 0.0:
            return out
        summed = self.conv.weight.sum(dim=(2, 3), keepdim=True)
        # padding 0 with the same stride keeps the 1×1 output aligned with the k×k one (padding (k-1)/2)
        return out - self.theta * F.conv2d(x, summed, stride=self.conv.stride)

    def extra_repr(self) -> str:
        return f"theta={self.theta}"


def _cdc_branch(in_channels: int, out_channels: int, theta: float) -> nn.Sequential:
    # Indices 0/1/2 give the checkpoint names branchN.0.conv.weight and branchN.1.* (BatchNorm).
    return nn.Sequential(
        CentralDifferenceConv2d(in_channels, out_channels, 3, stride=2, padding=1, theta=theta),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class GradientEncoder(nn.Module):
    """Two central-difference branches (θ₁, θ₂), concatenated, fused by a 1×1 conv to 3 channels.

    Maps any channel count to the 3 channels an ImageNet backbone expects and halves the size
    (448² → 224², the size the ResNet stem was trained on).
    """

    def __init__(self, in_channels: int, out_channels: int = 3, thetas: Sequence[float] = (0.7, 0.3)) -> None:
        super().__init__()
        self.branch1 = _cdc_branch(in_channels, out_channels, thetas[0])
        self.branch2 = _cdc_branch(in_channels, out_channels, thetas[1])
        self.branch_last = nn.Sequential(
            nn.Conv2d(2 * out_channels, out_channels, kernel_size=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch_last(torch.cat([self.branch1(x), self.branch2(x)], dim=1))


class TransformerBlock(nn.Module):
    """Post-norm transformer encoder block (attention → add & norm → ReLU FFN → add & norm).

    Same computation as ``nn.TransformerEncoderLayer(norm_first=False, activation='relu')`` except
    that the FFN has no inner dropout; written out because the published checkpoint names its
    tensors ``attention.*``, ``feed_forward.{0,2}.*``, ``layernorm{1,2}.*``.  Input is
    sequence-first ``(L, B, E)``.
    """

    def __init__(self, embed_dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout)
        self.feed_forward = nn.Sequential(
            nn.Linear(embed_dim, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, embed_dim)
        )
        self.layernorm1 = nn.LayerNorm(embed_dim)
        self.layernorm2 = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attention(x, x, x, need_weights=False)
        x = self.layernorm1(x + self.dropout(attended))
        return self.layernorm2(x + self.dropout(self.feed_forward(x)))


class ProjectionHead(nn.Module):
    """Linear → exact GELU → Linear → dropout → + first Linear's output → LayerNorm."""

    def __init__(self, embedding_dim: int, projection_dim: int = PROFILE_DIM, dropout: float = 0.1) -> None:
        super().__init__()
        self.projection = nn.Linear(embedding_dim, projection_dim)
        self.gelu = nn.GELU()  # approximate='none': the erf form the paper's code uses
        self.fc = nn.Linear(projection_dim, projection_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(projection_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.projection(x)
        x = self.dropout(self.fc(self.gelu(projected)))
        return self.layer_norm(x + projected)


def create_backbone(
    name: str, *, in_chans: int = 3, pretrained: bool = False, pretrained_file: str | None = None
) -> nn.Module:
    """A timm model by name with its classifier removed and global average pooling.

    ``pretrained=True`` uses timm's default weights tag for ``name``; they must either be in the
    Hugging Face cache or ``pretrained_file`` must point to a local file.  Offline, this raises a
    :class:`ConfigError` at once instead of waiting on network time-outs.
    """
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"model.backbone: '{name}' is not a timm model name (see timm.list_models())")
    kwargs: dict[str, Any] = dict(num_classes=0, global_pool="avg", in_chans=in_chans)
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    if pretrained_file:
        if not os.path.isfile(pretrained_file):
            raise ConfigError(f"model.pretrained_file: {pretrained_file} does not exist")
        return timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"file": pretrained_file}, **kwargs
        )
    cached = _cached_weights(name)
    if cached:  # load the cached file directly: no network round trip at all
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": cached}, **kwargs)
    _require_reachable(name)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # network or hub errors: say what to do instead of a long traceback
        raise ConfigError(
            f"model.pretrained: could not get pretrained weights for timm model '{name}' "
            f"({type(exc).__name__}: {exc}); set model.pretrained_file to a local weights file or "
            "model.pretrained: false"
        ) from exc


def _cached_weights(name: str) -> str | None:
    """Path of timm's default weights for ``name`` in the Hugging Face cache, if they are there."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
        hf_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if not hf_id:
            return None
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(hf_id.split("@")[0], filename)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    except Exception:  # cache probing is best effort
        return None
    return None


def _require_reachable(name: str, *, timeout_s: float = 3.0) -> None:
    """Fail fast when weights would have to be downloaded but the hub cannot be reached."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    host = "huggingface.co" if cfg is not None and getattr(cfg, "hf_hub_id", None) else "download.pytorch.org"
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return
    except OSError as exc:
        raise ConfigError(
            f"model.pretrained is true but the weights of timm model '{name}' are not in the local cache "
            f"and {host} cannot be reached ({exc}); download them once on a connected machine, set "
            "model.pretrained_file to a local weights file, or set model.pretrained: false"
        ) from None


class ImageEncoder(nn.Module):
    """Gradient encoder (optional) → timm backbone → transformer block(s) → pooled feature."""

    def __init__(self, in_channels: int, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.gradient_encoder:
            self.conv: nn.Module = GradientEncoder(in_channels, 3, cfg.thetas)
            backbone_in = 3
        else:  # ablation: the backbone's stem takes the raw channels (timm adapts its first conv)
            self.conv = nn.Identity()
            backbone_in = in_channels
        self.model = create_backbone(
            cfg.backbone, in_chans=backbone_in, pretrained=cfg.pretrained, pretrained_file=cfg.pretrained_file
        )
        self.num_features = int(self.model.num_features)
        blocks = [
            TransformerBlock(self.num_features, cfg.transformer_heads, cfg.transformer_ffn, cfg.dropout)
            for _ in range(cfg.transformer_blocks)
        ]
        # One block is stored bare so its keys are transformer_block.* as in the published checkpoint.
        if len(blocks) == 1:
            self.transformer_block: nn.Module = blocks[0]
        elif blocks:
            self.transformer_block = nn.Sequential(*blocks)
        else:
            self.transformer_block = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.model(self.conv(x))  # (B, F)
        # The pooled vector is a length-1 sequence (sequence-first layout): attention over it is
        # trivially the identity on the value path, but we keep the block for checkpoint parity.
        return self.transformer_block(pooled.unsqueeze(0)).squeeze(0)


class PhenoProfilerModel(nn.Module):
    """Image → 672-d profile, plus the heads used only by the training losses.

    ``regression_head`` is a Linear from the profile to the regression-target width, created only
    when that width differs from ``projection_dim``; in the paper the target is 672 CellProfiler
    features, regressed by the profile itself.  It is not part of the published checkpoint.
    """

    def __init__(
        self,
        in_channels: int,
        cfg: ModelConfig | None = None,
        *,
        num_classes: int = 0,
        target_dim: int | None = None,
    ) -> None:
        super().__init__()
        cfg = cfg or ModelConfig()
        self.config = cfg
        self.in_channels = int(in_channels)
        self.image_encoder = ImageEncoder(in_channels, cfg)
        self.image_projection = ProjectionHead(
            self.image_encoder.num_features, cfg.projection_dim, cfg.dropout
        )
        self.classifier = nn.Linear(cfg.projection_dim, num_classes) if num_classes > 0 else None
        self.target_dim = int(target_dim) if target_dim else cfg.projection_dim
        self.regression_head = (
            nn.Linear(cfg.projection_dim, self.target_dim) if self.target_dim != cfg.projection_dim else None
        )

    def prepare_input(self, images: torch.Tensor) -> torch.Tensor:
        """Resize to ``config.input_size`` (bilinear, antialiased) when the data has another size."""
        size = self.config.input_size
        if size and tuple(images.shape[-2:]) != (size, size):
            images = F.interpolate(
                images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The profile, shape (B, projection_dim)."""
        return self.image_projection(self.image_encoder(self.prepare_input(images)))

    def regression_output(self, profile: torch.Tensor) -> torch.Tensor:
        return profile if self.regression_head is None else self.regression_head(profile)


def create_model(
    cfg: ModelConfig | Mapping[str, Any] | None,
    *,
    in_channels: int,
    num_classes: int = 0,
    target_dim: int | None = None,
) -> PhenoProfilerModel:
    """Factory: build the model from the ``model`` config section (dict or :class:`ModelConfig`)."""
    if not isinstance(cfg, ModelConfig):
        cfg = ModelConfig.from_dict(cfg)
    if in_channels < 1:
        raise ConfigError(f"the model needs at least one input channel, got {in_channels}")
    return PhenoProfilerModel(in_channels, cfg, num_classes=num_classes, target_dim=target_dim)


# ----------------------------------------------------------------------------- losses


def mse_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error to the (standardized) per-site regression target."""
    return F.mse_loss(prediction.float(), target.float())


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over treatments."""
    return F.cross_entropy(logits.float(), labels)


def contrastive_loss(
    embeddings: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """CLIP-style loss between image embeddings and their regression targets, with soft labels.

    Logits are target·embeddingᵀ / τ.  Instead of one-hot labels, each image's label distribution is
    the softmax of the mean of the two within-batch similarity matrices (images with images,
    targets with targets), so near-duplicate sites in a batch (replicates) are not pushed apart.
    Like the published code, only the image→target direction is averaged.  The published code
    multiplies the label similarities by τ where we divide; the two agree at its τ = 1.
    """
    embeddings = embeddings.float()
    targets = targets.float()
    logits = embeddings @ targets.T / temperature  # row i: image i against every target
    similarity = (embeddings @ embeddings.T + targets @ targets.T) / 2
    soft_labels = F.softmax(similarity / temperature, dim=-1)
    return -(soft_labels * F.log_softmax(logits, dim=-1)).sum(dim=1).mean()


@dataclass
class LossWeights:
    contrastive: float = 1.0
    mse: float = 100.0
    ce: float = 0.1


def compute_losses(
    model: PhenoProfilerModel,
    images: torch.Tensor,
    targets: torch.Tensor,
    labels: torch.Tensor | None,
    weights: LossWeights,
) -> dict[str, torch.Tensor]:
    """Forward a batch and return ``loss`` (weighted total) and its parts ``mse``, ``ce``, ``contrastive``.

    A part whose weight is 0 is reported (detached) but contributes no gradient.
    """
    profile = model(images)
    prediction = model.regression_output(profile)
    logits = model.classifier(profile) if model.classifier is not None and labels is not None else None
    return combine_losses(prediction, logits, targets, labels, weights, model.config.temperature)


def combine_losses(
    prediction: torch.Tensor,
    logits: torch.Tensor | None,
    targets: torch.Tensor,
    labels: torch.Tensor | None,
    weights: LossWeights,
    temperature: float,
) -> dict[str, torch.Tensor]:
    """The losses of :func:`compute_losses` from the model's outputs on a whole batch.

    Multi-process training calls this on the outputs gathered from every process, so every loss
    (the contrastive one couples all items of the batch) is the loss of the global batch.
    """
    parts: dict[str, torch.Tensor] = {"mse": mse_loss(prediction, targets)}
    parts["contrastive"] = contrastive_loss(prediction, targets, temperature)
    if logits is not None and labels is not None:
        parts["ce"] = classification_loss(logits, labels)
    else:
        parts["ce"] = torch.zeros((), device=prediction.device)
    total = torch.zeros((), device=prediction.device)
    for name in ("mse", "contrastive", "ce"):
        w = float(getattr(weights, name))
        if w != 0.0:
            total = total + w * parts[name]
        else:
            parts[name] = parts[name].detach()
    parts["loss"] = total
    return parts


__all__ = [
    "PROFILE_DIM",
    "CentralDifferenceConv2d",
    "GradientEncoder",
    "ImageEncoder",
    "LossWeights",
    "ModelConfig",
    "PhenoProfilerModel",
    "ProjectionHead",
    "TransformerBlock",
    "classification_loss",
    "combine_losses",
    "compute_losses",
    "contrastive_loss",
    "create_backbone",
    "create_model",
    "fold_gradient_encoder",
    "inference_model",
    "mse_loss",
    "paper_model_config",
]


# ----------------------------------------------------------------------------- inference form


def _fold_bn(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv weight/bias with an eval-mode BatchNorm folded in (y = γ(x−μ)/σ + β)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bias if bias is not None else torch.zeros_like(bn.running_mean)
    return weight * scale[:, None, None, None], (bias - bn.running_mean) * scale + bn.bias


def _cdc_as_plain_weight(cdc: CentralDifferenceConv2d) -> torch.Tensor:
    """The single k×k kernel equal to a central-difference conv: the 1×1 term lands on the centre tap."""
    w = cdc.conv.weight.detach().clone()
    k = w.shape[-1]
    if cdc.conv.padding != (k // 2, k // 2) or w.shape[-2] != k:
        raise ValueError("central-difference folding needs a square kernel with 'same' padding")
    w[:, :, k // 2, k // 2] -= cdc.theta * cdc.conv.weight.detach().sum(dim=(2, 3))
    return w


@torch.no_grad()
def fold_gradient_encoder(gem: GradientEncoder) -> nn.Sequential:
    """Eval-mode gradient encoder as conv(→6, BN folded) → ReLU6 → 1×1 conv(BN folded) → ReLU6.

    The two branches see the same input with the same stride, so they become one convolution with
    the branches' output channels stacked; identical math with fewer passes over the large input.
    """
    ws, bs = [], []
    for branch in (gem.branch1, gem.branch2):
        w, b = _fold_bn(_cdc_as_plain_weight(branch[0]), None, branch[1])
        ws.append(w)
        bs.append(b)
    first = gem.branch1[0].conv
    conv = nn.Conv2d(
        first.in_channels, 2 * first.out_channels, first.kernel_size, first.stride, first.padding
    )
    conv.weight.copy_(torch.cat(ws))
    conv.bias.copy_(torch.cat(bs))
    last = gem.branch_last[0]
    fuse = nn.Conv2d(last.in_channels, last.out_channels, 1)
    w, b = _fold_bn(last.weight.detach(), last.bias.detach(), gem.branch_last[1])
    fuse.weight.copy_(w)
    fuse.bias.copy_(b)
    return nn.Sequential(conv, nn.ReLU6(), fuse, nn.ReLU6())


def inference_model(model: PhenoProfilerModel, *, channels_last: bool = True) -> nn.Module:
    """A faster, eval-only copy of ``model`` with the same outputs (to ~1e-6 in fp32).

    Folds the gradient encoder (central differences and BatchNorm into plain convolutions) and the
    backbone's BatchNorms into their convolutions (torch.fx; left as is when a backbone cannot be
    traced), and uses the channels-last layout that oneDNN convolutions prefer on CPU.
    """
    import copy

    fast = copy.deepcopy(model).eval()
    if isinstance(fast.image_encoder.conv, GradientEncoder):
        fast.image_encoder.conv = fold_gradient_encoder(fast.image_encoder.conv)
    try:
        from torch.fx.experimental.optimization import fuse

        fast.image_encoder.model = fuse(fast.image_encoder.model)
    except Exception as exc:  # untraceable timm model: keep the unfused (still correct) backbone
        log.debug("backbone conv-BN fusion skipped: %s", exc)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    for p in fast.parameters():
        p.requires_grad_(False)
    return fast
