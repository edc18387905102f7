"""Loading the published PhenoProfiler weights (and our own checkpoints) for inference.

The published file is expected to be what the authors' ``train.py`` saves: a plain state dict of
the bare model (``../shared/reference/README.md``).  Because the released file's exact format could
not be verified, we also accept a ``module.`` prefix (DataParallel/DDP) and a one-level wrapper dict
(``{"state_dict": ...}``, ``{"model": ...}``, ...).  Anything else fails loudly, naming keys.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, DataError
from .model import PhenoProfilerModel, create_model, paper_model_config

log = logging.getLogger(__name__)

# Our model's tensors that the published checkpoint does not have (may stay at their init values).
ALLOWED_MISSING_PREFIXES = ("regression_head.",)
_WRAPPER_KEYS = ("state_dict", "model_state", "model", "model_state_dict", "net", "weights")
_MAX_NAMED = 12  # keys listed per category in an error message


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def unwrap_state_dict(obj: Any, *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Return the plain ``{name: tensor}`` dict inside ``obj`` with any ``module.`` prefix removed."""
    if not _is_state_dict(obj):
        inner = None
        if isinstance(obj, Mapping):
            for key in _WRAPPER_KEYS:
                if key in obj and _is_state_dict(obj[key]):
                    inner = obj[key]
                    break
            if inner is None:
                candidates = [v for v in obj.values() if _is_state_dict(v)]
                if len(candidates) == 1:
                    inner = candidates[0]
        if inner is None:
            kind = type(obj).__name__
            top = list(obj)[:8] if isinstance(obj, Mapping) else []
            raise DataError(
                f"{source}: expected a state dict of tensors (optionally under one of {list(_WRAPPER_KEYS)}), "
                f"got a {kind} with top-level keys {top}"
            )
        obj = inner
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _fmt(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_NAMED])
    more = f" … (+{len(keys) - _MAX_NAMED} more)" if len(keys) > _MAX_NAMED else ""
    return f"[{shown}{more}]"


def check_state_dict(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str = "checkpoint",
    allowed_missing: tuple[str, ...] = ALLOWED_MISSING_PREFIXES,
) -> None:
    """Raise :class:`DataError` naming every missing, unexpected and mis-shaped key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith(allowed_missing)]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} (checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)})"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) {_fmt(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) {_fmt(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped key(s) {_fmt(misshaped)}")
    if problems:
        raise DataError(f"{source} does not match the model: " + "; ".join(problems))


def load_published(
    model: PhenoProfilerModel, path: str | os.PathLike | Mapping[str, Any], *, source: str | None = None
) -> PhenoProfilerModel:
    """Load published PhenoProfiler weights into ``model`` (in place) and return it in eval mode.

    ``path`` may be a file or an already loaded object.  Every key of the model must be present
    with the same shape (except our own ``regression_head.*``) and the file must have no extra
    keys; otherwise a :class:`DataError` lists the offending keys.
    """
    source = source or ("state dict" if isinstance(path, Mapping) else str(path))
    if isinstance(path, Mapping):
        obj = path
    else:
        if not Path(path).is_file():
            raise ConfigError(f"embed.published_weights: file not found: {path}")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DataError(
                f"{path}: cannot read as a PyTorch checkpoint ({type(exc).__name__}: {exc})"
            ) from exc
    state = unwrap_state_dict(obj, source=source)
    check_state_dict(model, state, source=source)
    model.load_state_dict(state, strict=False)  # strictness enforced above, minus allowed-missing heads
    return model.eval()


def published_model(path: str | os.PathLike, *, in_channels: int = 5) -> PhenoProfilerModel:
    """Build the paper's architecture sized from the file (number of classes) and load the weights."""
    if not Path(path).is_file():
        raise ConfigError(f"embed.published_weights: file not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = unwrap_state_dict(obj, source=str(path))
    num_classes = int(state["classifier.weight"].shape[0]) if "classifier.weight" in state else 0
    model = create_model(paper_model_config(), in_channels=in_channels, num_classes=num_classes)
    return load_published(model, state, source=str(path))


# ----------------------------------------------------------------------------- our own checkpoints


def load_trained(path: str | os.PathLike) -> tuple[PhenoProfilerModel, dict[str, Any]]:
    """Rebuild a model saved by ``phenoprofiler train`` (stage1.pt/stage2.pt) and its metadata."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, Mapping) or "model_state" not in ckpt or "model_config" not in ckpt:
        raise DataError(
            f"{path}: not a checkpoint written by 'phenoprofiler train' (no model_state/model_config)"
        )
    model = create_model(
        ckpt["model_config"],
        in_channels=int(ckpt["in_channels"]),
        num_classes=len(ckpt.get("classes", [])),
        target_dim=ckpt.get("target_dim"),
    )
    model.load_state_dict(ckpt["model_state"], strict=True)
    return model.eval(), dict(ckpt)
