"""The ``train`` config section, the ``--configfile``/``--config-json`` readers shared by ``train``
and ``embed``, and the device / precision choices of a training run."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .distributed import DISTRIBUTED_DEFAULTS, check_batch_size, distributed_options
from .errors import ConfigError

# The paper's stage-2 loss weights (arXiv 2502.19568): 1·contrastive + 100·MSE + 0.1·CE.
DEFAULT_LOSS_WEIGHTS = {"contrastive": 1.0, "mse": 100.0, "ce": 0.1}


@dataclass
class TrainConfig:
    """Options of the ``train`` config section (see the schema for descriptions)."""

    name: str = "phenoprofiler"
    # configs of the datasets trained on (the workflow resolves them into --tiles-dir/--plates)
    datasets: list[str] = field(default_factory=list)
    level: str = "auto"
    targets: str | None = None
    split: str = "plate"
    val_fraction: float = 0.2
    val_plates: list[str] = field(default_factory=list)
    epochs_stage1: int = 20
    epochs_stage2: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-3
    lr_step: int = 20
    lr_gamma: float = 0.5
    # [[epoch, lr], ...]: the learning rate from that epoch on (replaces the StepLR when given)
    lr_milestones: list[list[float]] = field(default_factory=list)
    loss_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LOSS_WEIGHTS))
    precision: str = "auto"
    device: str = "auto"
    num_workers: int = 0
    # a site the teacher has no target for (the targets stage skips sites with no cells): stop, or leave it out
    missing_targets: str = "error"
    # z-score each target feature on the training split (hand-crafted features of mixed scales), or regress
    # the raw values (the paper's CNN-1 embedding medians)
    standardize_targets: bool = True
    distributed: dict[str, Any] = field(default_factory=lambda: dict(DISTRIBUTED_DEFAULTS))

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> TrainConfig:
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown key(s) in config section 'train': {unknown}; known: {sorted(known)}")
        cfg = cls(**options)
        cfg.loss_weights = _loss_weights(cfg.loss_weights)
        cfg.distributed = distributed_options(cfg.distributed)
        for ok, message in _checks(cfg):
            if not ok:
                raise ConfigError(message)
        check_batch_size(cfg.batch_size, cfg.distributed["processes"])
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _loss_weights(given: Mapping[str, Any]) -> dict[str, float]:
    """The paper's weights overlaid by the configured ones (unknown loss names are an error)."""
    bad = sorted(set(given) - set(DEFAULT_LOSS_WEIGHTS))
    if bad:
        raise ConfigError(
            f"train.loss_weights: unknown loss(es) {bad}; expected {sorted(DEFAULT_LOSS_WEIGHTS)}"
        )
    return {**DEFAULT_LOSS_WEIGHTS, **{k: float(v) for k, v in given.items()}}


def _checks(cfg: TrainConfig) -> list[tuple[bool, str]]:
    """(condition, message naming the key) pairs; the first false one is raised."""
    weights = cfg.loss_weights
    return [
        (cfg.level in ("auto", "site", "cell"), f"train.level must be auto, site or cell, got {cfg.level!r}"),
        (
            cfg.split in ("plate", "treatment"),
            f"train.split must be 'plate' or 'treatment', got {cfg.split!r}",
        ),
        (0 <= cfg.val_fraction < 1, f"train.val_fraction must be in [0, 1), got {cfg.val_fraction}"),
        (
            cfg.precision in ("auto", "fp32", "bf16", "fp16"),
            f"train.precision: unknown value {cfg.precision!r}",
        ),
        (cfg.device in ("auto", "cpu", "cuda"), f"train.device: unknown value {cfg.device!r}"),
        (
            cfg.batch_size >= 2,
            f"train.batch_size must be >= 2 (contrastive loss and BatchNorm), got {cfg.batch_size}",
        ),
        (
            cfg.epochs_stage1 >= 0 and cfg.epochs_stage2 >= 0,
            "train.epochs_stage1/epochs_stage2 must be >= 0",
        ),
        (all(w >= 0 for w in weights.values()), f"train.loss_weights must be >= 0, got {weights}"),
        (
            cfg.missing_targets in ("error", "skip"),
            f"train.missing_targets must be 'error' or 'skip', got {cfg.missing_targets!r}",
        ),
        (
            isinstance(cfg.num_workers, int) and cfg.num_workers >= 0,
            f"train.num_workers must be an integer >= 0, got {cfg.num_workers!r}",
        ),
    ]


def parse_config_json(text: str) -> dict[str, Any]:
    """``--config-json``: inline JSON or the path of a JSON file holding ``model``/``train``/... sections."""
    candidate = Path(text)
    try:
        is_file = len(text) < 4096 and candidate.is_file()
    except OSError:
        is_file = False
    try:
        return dict(json.loads(candidate.read_text() if is_file else text))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"--config-json: not valid JSON ({exc}): {text[:200]}") from exc


def config_sections(configfile: str | None, config_json: str | None, wanted: Sequence[str]) -> dict[str, Any]:
    """The ``wanted`` sections from ``--configfile`` (a dataset config YAML, validated against the
    schema so defaults are filled; other sections are ignored) overlaid by ``--config-json``."""
    sections: dict[str, Any] = {}
    if configfile:
        import yaml

        from .config import validate_config

        path = Path(configfile)
        if not path.is_file():
            raise ConfigError(f"--configfile: file not found: {path}")
        full = validate_config(yaml.safe_load(path.read_text()) or {}, source=str(path))
        sections.update({k: full[k] for k in wanted if k in full})
    if config_json:
        extra = parse_config_json(config_json)
        unknown = sorted(set(extra) - set(wanted))
        if unknown:
            raise ConfigError(f"--config-json: unknown section(s) {unknown}; expected some of {list(wanted)}")
        sections.update(extra)
    return sections


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA device is available")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def pick_precision(choice: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for plain fp32.  'auto' = bf16 (fp16 on old GPUs) on CUDA, fp32 on CPU."""
    if choice == "fp32" or (choice == "auto" and device.type != "cuda"):
        return None
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[choice]
