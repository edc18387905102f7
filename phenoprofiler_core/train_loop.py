"""One epoch of training or validation, in one process or as one of N DDP processes, and the
learning-rate schedule.

One process: the model computes its losses on each batch.  N processes: every rank forwards its
slice of the global batch through the DDP-wrapped :class:`Outputs`, gathers the outputs of the whole
global batch and computes the global losses (see :mod:`.distributed`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from .distributed import DistContext, gather_rows
from .model import LossWeights, PhenoProfilerModel, combine_losses, compute_losses
from .train_config import TrainConfig
from .train_loader import batch_to_device

LOSS_NAMES = ("loss", "mse", "ce", "contrastive")


class Outputs(nn.Module):
    """The model's training outputs in one forward (what DDP wraps): regression prediction, logits."""

    def __init__(self, model: PhenoProfilerModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        profile = self.model(images)
        logits = self.model.classifier(profile) if self.model.classifier is not None else None
        return self.model.regression_output(profile), logits


def freeze_unused_heads(model: PhenoProfilerModel, weights: LossWeights) -> None:
    """DDP expects a gradient for every trainable parameter: heads whose losses are off (stage 1's
    classifier) get none, as in one process, so take them out of DDP's reach."""
    if model.classifier is not None and weights.ce == 0:
        model.classifier.requires_grad_(False)
    if model.regression_head is not None and weights.mse == 0 and weights.contrastive == 0:
        model.regression_head.requires_grad_(False)


def stage_loss_weights(stage: int, cfg: TrainConfig) -> LossWeights:
    """Stage 1 fits the regression target only; stage 2 uses all three losses (train.loss_weights)."""
    return LossWeights(contrastive=0.0, mse=1.0, ce=0.0) if stage == 1 else LossWeights(**cfg.loss_weights)


def lr_at_epoch(epoch: int, cfg: TrainConfig) -> float:
    """The learning rate of ``epoch`` (0-based): piecewise constant from ``lr_milestones``."""
    lr = cfg.lr
    for start, value in sorted((int(e), float(v)) for e, v in cfg.lr_milestones):
        if epoch >= start:
            lr = value
    return lr


def make_scheduler(optimizer, cfg: TrainConfig):
    """StepLR (``lr_step``/``lr_gamma``), or the paper's piecewise schedule given as ``lr_milestones``
    (arXiv 2502.19568's code: 1e-3, then 5e-4 from epoch 20, 1e-4 from 50, 5e-5 from 100)."""
    if cfg.lr_milestones:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_at_epoch(epoch, cfg) / cfg.lr)
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(cfg.lr_step, 1), gamma=cfg.lr_gamma)


# ----------------------------------------------------------------------------- one epoch


@dataclass
class EpochSetup:
    """What every batch of a pass needs besides the batch itself."""

    net: nn.Module  # the model, or (N processes) the DDP-wrapped Outputs
    weights: LossWeights
    device: torch.device
    amp_dtype: torch.dtype | None
    ctx: DistContext


def _empty_shard(model: PhenoProfilerModel, device: torch.device):
    """Outputs and targets of a rank without items in this global batch (a short last
    evaluation batch): zero rows, so the gather still lines up."""
    prediction = torch.zeros((0, model.target_dim), device=device)
    logits = None
    if model.classifier is not None:
        logits = torch.zeros((0, model.classifier.out_features), device=device)
    targets = torch.zeros((0, model.target_dim), dtype=torch.float32, device=device)
    labels = torch.zeros((0,), dtype=torch.int64, device=device)
    return prediction, logits, targets, labels


def _global_losses(setup: EpochSetup, batch, shard_counts: list[int], training: bool) -> dict:
    """N processes: this rank's outputs, gathered with every rank's, give the global batch's losses."""
    base = getattr(setup.net, "module", setup.net)  # evaluation bypasses DDP (no gradient sync to do)
    if batch is not None:
        images, targets, labels = batch
        prediction, logits = (setup.net if training else base)(images)
    else:
        prediction, logits, targets, labels = _empty_shard(base.model, setup.device)
    prediction = gather_rows(prediction, shard_counts, grad=training)
    logits = gather_rows(logits, shard_counts, grad=training) if logits is not None else None
    targets = gather_rows(targets, shard_counts, grad=False)
    labels = gather_rows(labels, shard_counts, grad=False)
    return combine_losses(prediction, logits, targets, labels, setup.weights, base.model.config.temperature)


def _optimizer_step(loss: torch.Tensor, optimizer, scaler) -> None:
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def _progress(counts: list[list[int]], desc: str, ctx: DistContext):
    from tqdm import tqdm

    disable = None if ctx.is_main else True  # one bar per job (rank 0); None = off when not a tty
    return tqdm(counts, desc=desc, file=sys.stderr, leave=False, mininterval=5.0, disable=disable)


def run_epoch(
    setup: EpochSetup,
    batches: Iterator,
    counts: list[list[int]],
    optimizer=None,
    scaler=None,
    desc: str = "",
) -> dict[str, float]:
    """One pass over ``batches`` (this rank's slices of the global batches whose per-rank sizes are
    ``counts``); trains when an optimizer is given.  Returns the item-weighted mean losses."""
    training = optimizer is not None
    setup.net.train(training)
    sums = dict.fromkeys(LOSS_NAMES, 0.0)
    count = 0
    autocast = (
        torch.autocast(setup.device.type, dtype=setup.amp_dtype)
        if setup.amp_dtype is not None
        else nullcontext()
    )
    bar = _progress(counts, desc, setup.ctx)
    with nullcontext() if training else torch.inference_mode():
        for shard_counts in bar:
            # a short last evaluation batch can leave a rank without items
            batch = batch_to_device(next(batches), setup.device) if shard_counts[setup.ctx.rank] > 0 else None
            with autocast:
                if setup.ctx.active:
                    parts = _global_losses(setup, batch, shard_counts, training)
                else:
                    parts = compute_losses(setup.net, *batch, setup.weights)
            if training:
                _optimizer_step(parts["loss"], optimizer, scaler)
            n = sum(shard_counts)
            count += n
            for k in sums:
                sums[k] += float(parts[k].detach()) * n
            bar.set_postfix(loss=sums["loss"] / count)
    return {k: v / max(count, 1) for k, v in sums.items()}
