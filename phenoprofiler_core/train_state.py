"""What a training run leaves on disk and reads back: the final stage checkpoints, the loss history,
and the per-epoch resume state that lets a killed job end with bit-identical weights (on CPU).

Everything is written atomically (:mod:`.io`), so a kill during a write leaves the previous file.
"""

from __future__ import annotations

import contextlib
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
# Resume state layout; files in another layout (or without one: earlier versions) are not resumed.
RESUME_FORMAT = "phenoprofiler-train-state/2"


class TrainingInterrupted(RuntimeError):
    """Raised by ``stop_after_epochs`` to emulate a killed job at an epoch boundary (tests)."""


# ----------------------------------------------------------------------------- identity of a run


def run_fingerprint(
    model_cfg: ModelConfig, cfg: TrainConfig, seed: int, plates: Sequence[str], data: TrainingData
) -> str:
    """sha256 of everything that decides the weights: saved state with another fingerprint is not
    resumed.  train.distributed is left out: N processes train the same model as one, so a job
    killed on 4 GPUs may resume on 2 (dropout draws differ, see phenoprofiler_core.distributed);
    train.num_workers too: the worker count changes neither batches nor random streams."""
    train_key = {k: v for k, v in cfg.to_dict().items() if k not in ("distributed", "num_workers")}
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


class ResumeState:
    """``<out>/state/stage<N>_last.pt``: the latest epoch of the stage in progress, nothing older.

    One file holds the model, optimizer, scheduler, RNG streams, history and the stage's best
    weights so far (omitted when the latest epoch is the best: they are the model's weights), i.e.
    at most the model + optimizer + one more copy of the weights (~4/3 of model + optimizer with
    AdamW).  It is replaced atomically, so a kill during the write leaves the previous epoch's file
    (plus a temporary file that the next save removes); once the stage's checkpoint is written the
    file goes, and the folder with it when training ends.  Only rank 0 writes.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def path(self, stage: int) -> Path:
        return self.state_dir / f"stage{stage}_last.pt"

    def leftovers(self, keep: Path | None = None) -> list[Path]:
        """Resume files other than ``keep``: other stages' state, temporary files of killed
        writes, and the separate ``stage<N>_best.pt`` files of earlier versions."""
        if not self.state_dir.is_dir():
            return []
        patterns = ("stage*_last.pt", "stage*_best.pt", ".stage*_last.pt.*", ".stage*_best.pt.*")
        found = {p for pattern in patterns for p in self.state_dir.glob(pattern)}
        return sorted(p for p in found if p != keep)

    def save(
        self,
        stage: int,
        fingerprint: str,
        epoch: int,
        trainer: Trainer,
        progress: StageProgress,
        rng_ranks: list,
    ) -> None:
        """The state after 0-based ``epoch`` (``rng_ranks`` = every rank's RNG state), then every
        older resume file is removed."""
        path = self.path(stage)
        latest_is_best = progress.best_epoch == epoch + 1
        save_atomic(
            {
                "format": RESUME_FORMAT,
                "fingerprint": fingerprint,
                "stage": stage,
                "epoch": epoch,
                "model": trainer.model.state_dict(),
                "optimizer": trainer.optimizer.state_dict(),
                "scheduler": trainer.scheduler.state_dict(),
                "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
                "best_loss": progress.best_loss,
                "best_epoch": progress.best_epoch,
                "best_state": None if latest_is_best else progress.best_state,
                "history": progress.history,
                "init_digest": progress.init_digest,
                "rng": rng_ranks[0],
                "rng_ranks": rng_ranks if len(rng_ranks) > 1 else None,
            },
            path,
        )
        self.remove(self.leftovers(keep=path))

    def finish_stage(self, stage: int) -> None:
        """The stage checkpoint is written: its resume file is no longer needed."""
        self.remove([self.path(stage), *self.leftovers()])

    def finish(self) -> None:
        self.remove(self.leftovers())
        with contextlib.suppress(OSError):  # not empty (a user's file) or already gone
            self.state_dir.rmdir()

    @staticmethod
    def remove(paths: list[Path]) -> None:
        for p in paths:
            p.unlink(missing_ok=True)

    def load(self, stage: int, fingerprint: str) -> dict[str, Any] | None:
        """The saved state of ``stage``, or None when there is none or it was written with other
        settings (or by a version that kept its state in another layout)."""
        path = self.path(stage)
        if not path.is_file():
            return None
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if saved.get("format") != RESUME_FORMAT or saved.get("fingerprint") != fingerprint:
            log.warning("ignoring %s: it was written with other settings or by another version", path)
            return None
        return saved


def restore_resume_state(
    saved: Mapping[str, Any], trainer: Trainer, progress: StageProgress, rank: int, world_size: int
) -> None:
    """Load a state written by :meth:`ResumeState.save` into ``trainer``/``progress`` and this
    rank's RNG streams."""
    trainer.model.load_state_dict(saved["model"])
    trainer.optimizer.load_state_dict(saved["optimizer"])
    trainer.scheduler.load_state_dict(saved["scheduler"])
    if trainer.scaler is not None and saved.get("scaler"):
        trainer.scaler.load_state_dict(saved["scaler"])
    progress.start_epoch = saved["epoch"] + 1
    progress.best_loss, progress.best_epoch = saved["best_loss"], saved["best_epoch"]
    best = saved["best_state"]
    progress.best_state = cpu_copy(saved["model"] if best is None else best)
    progress.history = list(saved["history"])
    progress.init_digest = saved.get("init_digest")
    rng_ranks = saved.get("rng_ranks") or [saved["rng"]]
    if len(rng_ranks) == world_size:
        set_rng_state(rng_ranks[rank])
    elif rank == 0:  # resumed with another process count: rank 0 keeps its stream
        set_rng_state(saved["rng"])
