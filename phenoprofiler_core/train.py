"""``phenoprofiler train``: stepwise training of the PhenoProfiler model.

Stage 1 fits the regression target only (the published ``PhenoProfiler_MSE`` model: plain MSE);
stage 2 starts from stage 1's best weights and optimises
``w_contrastive·contrastive + w_mse·MSE + w_ce·CE`` (defaults 1 / 100 / 0.1, the paper's).
AdamW (lr 1e-3, wd 1e-3) with a StepLR decay, a fresh optimizer per stage as in the published code.

Outputs in ``--out`` (``model/<name>/``):
  ``stage1.pt``, ``stage2.pt``  best-by-validation-loss weights + everything ``embed`` needs
  ``history.csv``               one row per (stage, epoch, split): loss, mse, ce, contrastive
  ``state/``                    the latest epoch's training state (model, optimizer, scheduler, RNG,
                                history, best weights) so a killed job resumes to bit-identical
                                weights on CPU; one file, removed when training ends

Data: site tiles ``tiles/<plate>.npy`` (+ ``.sites.parquet``) or, with ``train.level: cell`` (or
``auto`` when crops exist for every plate), cell crops ``cells/<plate>.npy`` (+ ``.cells.parquet``),
each paired with its site's regression target.
Multi-process (DDP) training on one node: launch with ``torchrun --nproc_per_node N -m
phenoprofiler_core.cli train ...`` (the workflow does so for ``train.distributed.processes: N``);
``train.batch_size`` stays the global batch and N processes reproduce the 1-process result on it
(see :mod:`phenoprofiler_core.distributed`).
Targets: a per-site table (Metadata_Plate/Well/Site + numeric columns), z-scored per feature with
statistics of the training split only (NaN → 0).  Validation is split by plate or by treatment,
never by site within a well (sites of a well are near-replicates; splitting them leaks).

This module runs the two stages and the CLI; the parts live beside it: :mod:`.train_config` (the
``train`` section, device, precision), :mod:`.train_data` (tiles, targets, splits),
:mod:`.train_loader` (batches), :mod:`.train_loop` (one epoch, the schedule), :mod:`.train_state`
(checkpoints, history, resume state) and :mod:`.distributed` (N processes).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .distributed import (
    DistContext,
    all_gather_objects,
    check_batch_size,
    convert_sync_batchnorm,
    init_distributed,
    launched_world,
)
from .errors import ConfigError, DataError
from .model import LossWeights, ModelConfig, PhenoProfilerModel, create_model
from .train_config import (
    TrainConfig,
    config_sections,
    parse_config_json,
    pick_device,
    pick_precision,
)
from .train_data import (
    SITE_KEYS,
    TrainingData,
    _normalise_keys,
    image_to_float,
    load_training_data,
    normalise_keys,
    open_images,
    plate_file,
    read_targets,
)
from .train_loader import (
    TrainingBatches,
    available_cores,
    compute_cores,
    epoch_order,
    global_batches,
    loader_workers,
)
from .train_loop import (
    EpochSetup,
    Outputs,
    freeze_unused_heads,
    lr_at_epoch,
    make_scheduler,
    run_epoch,
    stage_loss_weights,
)
from .train_state import (
    CHECKPOINT_FORMAT,
    HISTORY_COLUMNS,
    ResumeState,
    StageProgress,
    Trainer,
    TrainingInterrupted,
    checkpoint_payload,
    cpu_copy,
    finished_stage,
    restore_resume_state,
    rng_state,
    run_fingerprint,
    save_atomic,
    seed_everything,
    weights_digest,
    write_history,
)

log = logging.getLogger(__name__)

# What other modules import from here (embed.py, tests); the code lives in the train_* modules.
__all__ = [
    "CHECKPOINT_FORMAT",
    "HISTORY_COLUMNS",
    "SITE_KEYS",
    "TrainConfig",
    "TrainingData",
    "TrainingInterrupted",
    "_normalise_keys",
    "config_sections",
    "image_to_float",
    "load_training_data",
    "lr_at_epoch",
    "make_scheduler",
    "normalise_keys",
    "open_images",
    "parse_config_json",
    "pick_device",
    "pick_precision",
    "read_targets",
    "register_cli",
    "seed_everything",
    "train_model",
    "weights_digest",
    "write_history",
]


def train_model(
    images_dir: str | Path,
    plates: Sequence[str],
    out_dir: str | Path,
    *,
    model_options: Mapping[str, Any] | ModelConfig | None = None,
    train_options: Mapping[str, Any] | TrainConfig | None = None,
    targets_dir: str | Path | None = None,
    seed: int = 0,
    resume: bool = True,
    stop_after_epochs: int | None = None,
    cores: int | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Run both stages; return the paths of stage1.pt, stage2.pt and history.csv.

    ``cores``: CPU cores this process may use (the CLI passes its share of ``--threads``); None =
    the cores it may run on.  DataLoader workers never exceed what compute leaves of them
    (:func:`.train_loader.loader_workers`).

    ``provenance``: what the model is trained on (e.g. ``{"datasets": {name: [plates]}}``), stored in the
    checkpoints so embeddings made with them, in this run or another, can say it.

    ``stop_after_epochs`` ends the process-wide run (raising :class:`TrainingInterrupted`) after that
    many epochs have been *completed in this call*, right after their state was saved, i.e. exactly
    where a kill between epochs would leave things.  Used to test resume.
    """
    model_cfg = (
        model_options if isinstance(model_options, ModelConfig) else ModelConfig.from_dict(model_options)
    )
    cfg = train_options if isinstance(train_options, TrainConfig) else TrainConfig.from_dict(train_options)
    if cfg.level == "auto":
        raise ConfigError("train.level: resolve 'auto' to 'site' or 'cell' before training (the CLI does)")
    plates = [str(p) for p in plates]

    # N processes (torchrun): the global batch must split evenly; fail before joining the group.
    world = launched_world()[1]
    if world > 1:
        check_batch_size(cfg.batch_size, world, source="WORLD_SIZE set by torchrun")
    target_table = read_targets(plates, targets=cfg.targets, targets_dir=targets_dir or None)
    data = load_training_data(images_dir, plates, target_table, cfg, seed)
    ctx, device = init_distributed(cfg.distributed, pick_device(cfg.device))
    batches = None
    try:
        workers = _worker_count(cfg, cores or available_cores(), device)
        batches = TrainingBatches(data, workers=workers, device=device, ctx=ctx)
        run = _TrainingRun.create(
            data, ctx, device, Path(out_dir), plates, model_cfg, cfg, seed, stop_after_epochs, batches
        )
        run.provenance = dict(provenance or {"plates": plates})
        return _train_stages(run, resume)
    finally:
        if batches is not None:  # stop the workers now, even when training was stopped
            batches.close()
        ctx.close()


def _worker_count(cfg: TrainConfig, cores: int, device: torch.device) -> int:
    workers = loader_workers(cfg.num_workers, cores=cores, device=device)
    log.info(
        "reading batches with %d DataLoader worker(s) (train.num_workers %d; %d core(s), compute on %s uses %d)",
        workers,
        cfg.num_workers,
        cores,
        device.type,
        compute_cores(device),
    )
    return workers


# ----------------------------------------------------------------------------- a run of both stages


@dataclass
class _TrainingRun:
    """The settings and data shared by both stages of one ``train_model`` call."""

    data: TrainingData
    ctx: DistContext
    device: torch.device
    amp_dtype: torch.dtype | None
    out_dir: Path
    plates: list[str]
    model_cfg: ModelConfig
    cfg: TrainConfig
    seed: int
    fingerprint: str
    train_idx: np.ndarray
    val_batches: list[list[int]]
    batches: TrainingBatches
    drop_last: bool
    stop_after_epochs: int | None
    epochs_done_here: int = 0
    provenance: dict[str, Any] | None = None

    @classmethod
    def create(cls, data, ctx, device, out_dir, plates, model_cfg, cfg, seed, stop_after_epochs, batches):
        amp_dtype = pick_precision(cfg.precision, device)
        log.info("training on %s (autocast %s): %s", device, amp_dtype, data.split_info)
        train_idx = np.flatnonzero(~data.is_val)
        val_idx = np.flatnonzero(data.is_val)
        if ctx.active and len(train_idx) < ctx.world_size:
            raise DataError(
                f"{len(train_idx)} training item(s) cannot be shared by {ctx.world_size} processes"
            )
        return cls(
            data=data,
            ctx=ctx,
            device=device,
            amp_dtype=amp_dtype,
            out_dir=out_dir,
            plates=plates,
            model_cfg=model_cfg,
            cfg=cfg,
            seed=seed,
            fingerprint=run_fingerprint(model_cfg, cfg, seed, plates, data),
            train_idx=train_idx,
            # validation in item order, all items (a short last batch is fine in evaluation)
            val_batches=[val_idx[b].tolist() for b in global_batches(len(val_idx), cfg.batch_size, False)],
            batches=batches,
            # Drop a last partial batch: contrastive loss and BatchNorm need > 1 item per batch.
            drop_last=len(train_idx) > cfg.batch_size,
            stop_after_epochs=stop_after_epochs,
        )

    def path(self, name: str) -> Path:
        """The outputs: ``stage1``, ``stage2`` (.pt) and ``history`` (.csv)."""
        return self.out_dir / ("history.csv" if name == "history" else f"{name}.pt")

    @property
    def resume_state(self) -> ResumeState:
        return ResumeState(self.out_dir / "state")

    def count_epoch(self) -> None:
        """Called once an epoch's state is on disk: emulate a kill there when asked to."""
        self.epochs_done_here += 1
        if self.stop_after_epochs is not None and self.epochs_done_here >= self.stop_after_epochs:
            raise TrainingInterrupted(f"stopped after {self.epochs_done_here} epoch(s) as requested")


def _train_stages(run: _TrainingRun, resume: bool) -> dict[str, Path]:
    history: list[dict[str, Any]] = []
    previous: Path | None = None
    for stage, n_epochs in ((1, run.cfg.epochs_stage1), (2, run.cfg.epochs_stage2)):
        final_path = run.path(f"stage{stage}")
        # A stage finished by an earlier (killed) call with the same settings is reused as is.
        done = finished_stage(final_path, run.fingerprint) if resume else None
        if done is not None:
            log.info("stage %d already complete in %s; reusing it", stage, final_path)
            history = list(done["history"])
        else:
            history = _train_stage(run, stage, n_epochs, previous, history, resume)
        previous = final_path
    if run.ctx.is_main:
        write_history(history, run.path("history"))
        run.resume_state.finish()
    run.ctx.barrier()
    return {name: run.path(name) for name in ("stage1", "stage2", "history")}


def _build_stage(run: _TrainingRun, stage: int, previous: Path | None) -> tuple[Trainer, str | None]:
    """A stage's model (from the previous stage's best weights), optimizer and schedule, and the
    digest of its starting weights (None for a fresh model)."""
    # Every stage starts from a known RNG state, so a resumed stage 2 sees the same randomness.
    seed_everything(run.seed + 1000 * stage)
    model = create_model(
        run.model_cfg,
        in_channels=run.data.in_channels,
        num_classes=len(run.data.classes),
        target_dim=len(run.data.target_columns),
    )
    if run.ctx.rank > 0:  # same initial weights on every rank, dropout draws of its own
        seed_everything(run.seed + 1000 * stage + 7919 * run.ctx.rank)
    init_digest = None
    if previous is not None:
        model.load_state_dict(torch.load(previous, map_location="cpu", weights_only=False)["model_state"])
        init_digest = weights_digest(model.state_dict())
    model.to(run.device)
    if run.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=run.cfg.lr, weight_decay=run.cfg.weight_decay)
    scaler = torch.amp.GradScaler(run.device.type) if run.amp_dtype == torch.float16 else None
    return Trainer(model, optimizer, make_scheduler(optimizer, run.cfg), scaler), init_digest


def _for_processes(run: _TrainingRun, model: PhenoProfilerModel, weights: LossWeights) -> nn.Module:
    """The module the loop forwards: the model itself, or under N processes the DDP-wrapped
    :class:`Outputs` with synchronised BatchNorm."""
    if not run.ctx.active:
        return model
    if run.cfg.distributed["sync_batchnorm"]:
        log.info("synchronised BatchNorm in %d layer(s)", convert_sync_batchnorm(model))
    freeze_unused_heads(model, weights)
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [run.device.index] if run.device.type == "cuda" else None
    return DistributedDataParallel(Outputs(model), device_ids=device_ids)


def _train_stage(
    run: _TrainingRun, stage: int, n_epochs: int, previous: Path | None, history: list, resume: bool
) -> list[dict[str, Any]]:
    """Train one stage (resuming its saved state when there is one) and write ``stage<N>.pt`` with
    its best weights; returns the history up to the end of this stage."""
    trainer, init_digest = _build_stage(run, stage, previous)
    progress = StageProgress(
        history=list(history), best_state=cpu_copy(trainer.model.state_dict()), init_digest=init_digest
    )
    saved = run.resume_state.load(stage, run.fingerprint) if resume else None
    if saved is not None:
        restore_resume_state(saved, trainer, progress, run.ctx.rank, run.ctx.world_size)
        log.info(
            "resuming stage %d at epoch %d from %s", stage, progress.start_epoch, run.resume_state.path(stage)
        )
    weights = stage_loss_weights(stage, run.cfg)
    setup = EpochSetup(
        _for_processes(run, trainer.model, weights), weights, run.device, run.amp_dtype, run.ctx
    )
    for epoch in range(progress.start_epoch, n_epochs):
        _train_epoch(run, setup, stage, epoch, n_epochs, trainer, progress)
    if n_epochs == 0:  # nothing trained in this stage: its "best" is the starting point
        progress.best_state = cpu_copy(trainer.model.state_dict())
    if run.ctx.is_main:  # rank 0 alone writes
        save_atomic(_stage_checkpoint(run, stage, progress), run.path(f"stage{stage}"))
        run.resume_state.finish_stage(stage)
    run.ctx.barrier()  # every rank starts the next stage from this file
    return progress.history


def _stage_checkpoint(run: _TrainingRun, stage: int, progress: StageProgress) -> dict[str, Any]:
    extra = {
        "fingerprint": run.fingerprint,
        "best_epoch": progress.best_epoch,
        "best_val_loss": progress.best_loss,
        "init_digest": progress.init_digest,
        "history": progress.history,
        "seed": run.seed,
        "plates": run.plates,
        "provenance": run.provenance,
    }
    return checkpoint_payload(run.data, run.model_cfg, run.cfg, stage, progress.best_state, extra)


def _train_epoch(
    run: _TrainingRun,
    setup: EpochSetup,
    stage: int,
    epoch: int,
    n_epochs: int,
    trainer: Trainer,
    progress: StageProgress,
) -> None:
    """One training pass, the schedule step, one validation pass; then the resume state is saved."""
    order = epoch_order(len(run.train_idx), run.seed, stage, epoch)
    positions = global_batches(len(run.train_idx), run.cfg.batch_size, run.drop_last, order)
    items, counts = run.batches.start_pass([run.train_idx[b].tolist() for b in positions])
    desc = f"stage {stage} epoch {epoch + 1}/{n_epochs}"
    tr = run_epoch(setup, items, counts, trainer.optimizer, trainer.scaler, desc=f"{desc} train")
    trainer.scheduler.step()
    va = None
    if run.val_batches:
        items, counts = run.batches.start_pass(run.val_batches)
        va = run_epoch(setup, items, counts, desc=f"stage {stage} epoch {epoch + 1} val")
    for split, row in (("train", tr), ("validation", va)):
        if row is not None:
            progress.history.append({"stage": stage, "epoch": epoch + 1, "split": split, **row})
    validation = f", validation {va['loss']:.5g}" if va else ""
    log.info("stage %d epoch %d: train %.5g%s", stage, epoch + 1, tr["loss"], validation)
    _save_epoch(run, stage, epoch, trainer, progress, score=va["loss"] if va is not None else tr["loss"])


def _save_epoch(
    run: _TrainingRun, stage: int, epoch: int, trainer: Trainer, progress: StageProgress, score: float
) -> None:
    progress.record(epoch + 1, score, trainer.model)
    rng_ranks = all_gather_objects(run.ctx, rng_state())
    if run.ctx.is_main:
        run.resume_state.save(stage, run.fingerprint, epoch, trainer, progress, rng_ranks)
        write_history(progress.history, run.path("history"))
    run.ctx.barrier()  # the state is on disk before any rank moves on (or is stopped)
    run.count_epoch()


# ----------------------------------------------------------------------------- CLI


def _run(args) -> None:
    options = config_sections(args.configfile, args.config_json, ("model", "train", "seed"))
    train_options = dict(options.get("train") or {})
    if args.targets:
        train_options["targets"] = args.targets
    seed = args.seed if args.seed is not None else int(options.get("seed", 0))
    rank, _, _, local_world = launched_world()
    if rank > 0:  # under torchrun: one voice in the log
        logging.getLogger().setLevel(logging.WARNING)
    # The job's cores (--threads, the rule's threads:) are shared by the processes torchrun started
    # on this node; each process's share bounds its compute threads and its DataLoader workers.
    cores = max(1, args.threads // local_world) if args.threads else None
    if cores:
        torch.set_num_threads(cores)
    level = TrainConfig.from_dict(train_options).level
    if level == "auto":  # cell crops when they exist for every plate, else site tiles
        have_cells = bool(args.cells_dir) and all(
            plate_file(args.cells_dir, plate, ".npy").is_file() for plate in args.plates
        )
        level = "cell" if have_cells else "site"
        train_options["level"] = level
        log.info("train.level auto -> %s", level)
    images_dir = args.cells_dir if level == "cell" else args.tiles_dir
    if not images_dir:
        raise ConfigError(f"train.level: {level} needs --{'cells' if level == 'cell' else 'tiles'}-dir")
    targets_dir = None if train_options.get("targets") else args.targets_dir
    paths = train_model(
        images_dir,
        args.plates,
        args.out,
        model_options=options.get("model"),
        train_options=train_options,
        targets_dir=targets_dir,
        seed=seed,
        resume=not args.no_resume,
        cores=cores,
        provenance=json.loads(args.provenance) if args.provenance else None,
    )
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="stepwise training of the PhenoProfiler model", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--tiles-dir",
        action="append",
        help="folder with <plate>.npy + <plate>.sites.parquet (train.level: site); repeat it for the "
        "folders of several datasets (each plate is looked up in the one folder that has it)",
    )
    p.add_argument(
        "--cells-dir",
        action="append",
        help="folder with <plate>.npy + <plate>.cells.parquet (train.level: cell); repeatable",
    )
    p.add_argument("--plates", nargs="+", required=True, help="plates to train and validate on")
    p.add_argument(
        "--targets-dir",
        action="append",
        help="folder with per-plate target tables <plate>.parquet (e.g. features/classic); repeatable",
    )
    p.add_argument(
        "--provenance",
        help="JSON saying what the model is trained on (stored in the checkpoints), e.g. "
        '\'{"datasets": {"bbbc022": ["20585"]}}\'',
    )
    p.add_argument("--targets", help="one per-site target table (parquet/csv); overrides train.targets")
    p.add_argument("--configfile", help="dataset config YAML (its model, train and seed sections are used)")
    p.add_argument(
        "--config-json", help="JSON (inline or a file) with 'model', 'train', 'seed'; overrides --configfile"
    )
    p.add_argument(
        "--threads",
        type=int,
        help="the job's CPU cores: torch threads and DataLoader workers share them (default: all this "
        "process may use; torch picks its threads)",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (default: config 'seed' or 0)")
    p.add_argument("--no-resume", action="store_true", help="ignore saved state in OUT/state and start over")
    p.add_argument("--out", required=True, help="output folder model/<name>/")
    p.set_defaults(func=_run)
