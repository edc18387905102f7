"""What a training run leaves on disk and reads back: the final stage checkpoints, the loss history,
and the per-epoch resume state that lets a killed job end with bit-identical weights (on CPU).

Everything is written atomically (:mod:`.io`), so a kill during a write leaves the previous file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import io
from .model import ModelConfig
from .train_config import TrainConfig
from .train_data import TrainingData

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["stage", "epoch", "split", "loss", "mse", "ce", "contrastive"]
CHECKPOINT_FORMAT = "phenoprofiler-checkpoint/1"


class TrainingInterrupted(RuntimeError):
    """Raised by ``stop_after_epochs`` to emulate a killed job at an epoch boundary (tests)."""


# ----------------------------------------------------------------------------- identity of a run


def run_fingerprint(
    model_cfg: ModelConfig, cfg: TrainConfig, seed: int, plates: Sequence[str], data: TrainingData
) -> str:
    """sha256 of everything that decides the weights: saved state with another fingerprint is not
    resumed.  train.distributed is left out: N processes train the same model as one, so a job
    killed on 4 GPUs may resume on 2 (dropout draws differ, see phenoprofiler_core.distributed)."""
    train_key = {k: v for k, v in cfg.to_dict().items() if k != "distributed"}
    described = {
        "model": model_cfg.to_dict(),
        "train": train_key,
        "seed": seed,
        "plates": list(plates),
        "n_items": len(data.labels),
        "targets": data.target_columns,
        "split": data.split_info,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over all tensors in key order (to prove which weights a stage started from)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- random state


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- files


def save_atomic(obj: Any, path: Path) -> None:
    with io.atomic_path(path) as tmp:
        torch.save(obj, tmp)


def cpu_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a state dict (later optimizer steps do not change it)."""
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def write_history(rows: list[dict[str, Any]], path: Path) -> None:
    io.write_text(pd.DataFrame(rows, columns=HISTORY_COLUMNS).to_csv(index=False), path)


def checkpoint_payload(
    data: TrainingData,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    stage: int,
    state: Mapping[str, torch.Tensor],
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """``stage<N>.pt``: the stage's best weights + everything ``embed`` needs to rebuild the model."""
    return {
        "format": CHECKPOINT_FORMAT,
        "stage": stage,
        "model_state": cpu_copy(state),
        "model_config": model_cfg.to_dict(),
        "train_config": cfg.to_dict(),
        "in_channels": data.in_channels,
        "image_size": data.image_size,
        "level": cfg.level,
        "classes": list(data.classes),
        "target_columns": list(data.target_columns),
        "target_dim": len(data.target_columns),
        "target_mean": data.target_mean,
        "target_std": data.target_std,
        "split": data.split_info,
        **extra,
    }


def finished_stage(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """A stage checkpoint written by an earlier call with the same settings, else None."""
    if not path.is_file():
        return None
    done = torch.load(path, map_location="cpu", weights_only=False)
    return done if done.get("fingerprint") == fingerprint else None


# ----------------------------------------------------------------------------- resume state


@dataclass
class StageProgress:
    """Where a stage stands between epochs (what a resumed job needs besides the optimizer)."""

    history: list[dict[str, Any]]
    best_state: dict[str, torch.Tensor]
    init_digest: str | None = None
    start_epoch: int = 0
    best_loss: float = float("inf")
    best_epoch: int = -1

    def record(self, epoch: int, score: float, model: torch.nn.Module) -> bool:
        """Note a finished epoch (1-based ``epoch``); True when it is the best so far."""
        if score < self.best_loss or self.best_epoch < 0:
            self.best_loss, self.best_epoch = score, epoch
            self.best_state = cpu_copy(model.state_dict())
            return True
        return False


@dataclass
class Trainer:
    """The objects one stage updates (what the resume state holds besides its progress)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None


def save_resume_state(
    path: Path, fingerprint: str, epoch: int, trainer: Trainer, progress: StageProgress, rng_ranks: list
) -> None:
    """The state after 0-based ``epoch`` (rank 0 writes; ``rng_ranks`` = every rank's RNG state)."""
    save_atomic(
        {
            "fingerprint": fingerprint,
            "epoch": epoch,
            "model": trainer.model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
            "best_loss": progress.best_loss,
            "best_epoch": progress.best_epoch,
            "history": progress.history,
            "init_digest": progress.init_digest,
            "rng": rng_ranks[0],
            "rng_ranks": rng_ranks if len(rng_ranks) > 1 else None,
        },
        path,
    )


def restore_resume_state(
    path: Path,
    best_path: Path,
    fingerprint: str,
    trainer: Trainer,
    progress: StageProgress,
    rank: int,
    world_size: int,
) -> bool:
    """Load ``path`` into ``trainer``/``progress`` and this rank's RNG; False (nothing changed) when
    there is no state or it was written with other settings."""
    if not path.is_file():
        return False
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if saved.get("fingerprint") != fingerprint:
        log.warning("ignoring %s: it was written with other settings", path)
        return False
    trainer.model.load_state_dict(saved["model"])
    trainer.optimizer.load_state_dict(saved["optimizer"])
    trainer.scheduler.load_state_dict(saved["scheduler"])
    if trainer.scaler is not None and saved.get("scaler"):
        trainer.scaler.load_state_dict(saved["scaler"])
    progress.start_epoch = saved["epoch"] + 1
    progress.best_loss, progress.best_epoch = saved["best_loss"], saved["best_epoch"]
    progress.history = list(saved["history"])
    progress.init_digest = saved.get("init_digest")
    if best_path.is_file():
        progress.best_state = torch.load(best_path, map_location="cpu", weights_only=False)
    rng_ranks = saved.get("rng_ranks") or [saved["rng"]]
    if len(rng_ranks) == world_size:
        set_rng_state(rng_ranks[rank])
    elif rank == 0:  # resumed with another process count: rank 0 keeps its stream
        set_rng_state(saved["rng"])
    return True
