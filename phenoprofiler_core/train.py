"""``phenoprofiler train``: stepwise training of the PhenoProfiler model.

Stage 1 fits the regression target only (the published ``PhenoProfiler_MSE`` model: plain MSE);
stage 2 starts from stage 1's best weights and optimises
``w_contrastive·contrastive + w_mse·MSE + w_ce·CE`` (defaults 1 / 100 / 0.1, the paper's).
AdamW (lr 1e-3, wd 1e-3) with a StepLR decay, a fresh optimizer per stage as in the published code.

Outputs in ``--out`` (``model/<name>/``):
  ``stage1.pt``, ``stage2.pt``  best-by-validation-loss weights + everything ``embed`` needs
  ``history.csv``               one row per (stage, epoch, split): loss, mse, ce, contrastive
  ``state/``                    per-epoch training state (model, optimizer, scheduler, RNG, history) so
                                a killed job resumes to bit-identical weights on CPU

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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import sys
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import io
from .distributed import (
    DISTRIBUTED_DEFAULTS,
    DistContext,
    all_gather_objects,
    check_batch_size,
    convert_sync_batchnorm,
    distributed_options,
    gather_rows,
    init_distributed,
    launched_world,
    shard,
    shard_sizes,
)
from .errors import ConfigError, DataError
from .model import LossWeights, ModelConfig, PhenoProfilerModel, combine_losses, compute_losses, create_model

log = logging.getLogger(__name__)

SITE_KEYS = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
HISTORY_COLUMNS = ["stage", "epoch", "split", "loss", "mse", "ce", "contrastive"]
CHECKPOINT_FORMAT = "phenoprofiler-checkpoint/1"


# ----------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """Options of the ``train`` config section (see the schema for descriptions)."""

    name: str = "phenoprofiler"
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
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {"contrastive": 1.0, "mse": 100.0, "ce": 0.1}
    )
    precision: str = "auto"
    device: str = "auto"
    num_workers: int = 0
    distributed: dict[str, Any] = field(default_factory=lambda: dict(DISTRIBUTED_DEFAULTS))

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> TrainConfig:
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown key(s) in config section 'train': {unknown}; known: {sorted(known)}")
        cfg = cls(**options)
        weights = {"contrastive": 1.0, "mse": 100.0, "ce": 0.1}
        bad = sorted(set(cfg.loss_weights) - set(weights))
        if bad:
            raise ConfigError(f"train.loss_weights: unknown loss(es) {bad}; expected {sorted(weights)}")
        weights.update({k: float(v) for k, v in cfg.loss_weights.items()})
        cfg.loss_weights = weights
        cfg.distributed = distributed_options(cfg.distributed)
        checks = [
            (
                cfg.level in ("auto", "site", "cell"),
                f"train.level must be auto, site or cell, got {cfg.level!r}",
            ),
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
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        check_batch_size(cfg.batch_size, cfg.distributed["processes"])
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


# ----------------------------------------------------------------------------- data


def image_to_float(array: np.ndarray) -> np.ndarray:
    """Tile/crop storage type → float32 in [0, 1] (ints are scaled from their full range)."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if array.dtype.kind == "f":
        return array.astype(np.float32)
    raise DataError(f"image array of unsupported dtype {array.dtype}; expected float16/32, uint8 or uint16")


def open_images(images_dir: str | Path, plate: str, level: str) -> tuple[np.ndarray, pd.DataFrame]:
    """Memory-map ``<dir>/<plate>.npy`` and read its index table (sites or cells)."""
    images_dir = Path(images_dir)
    array_path = images_dir / f"{plate}.npy"
    table_path = images_dir / f"{plate}.{'sites' if level == 'site' else 'cells'}.parquet"
    for p in (array_path, table_path):
        if not p.is_file():
            raise DataError(f"missing {level} input for plate {plate}: {p}")
    array = np.load(array_path, mmap_mode="r")
    table = pd.read_parquet(table_path)
    if array.ndim != 4 or array.shape[2] != array.shape[3]:
        raise DataError(f"{array_path}: expected shape (N, C, S, S), got {array.shape}")
    if len(table) != array.shape[0]:
        raise DataError(f"{table_path} has {len(table)} rows but {array_path} holds {array.shape[0]} images")
    missing = [c for c in SITE_KEYS if c not in table.columns]
    if missing:
        raise DataError(f"{table_path}: missing column(s) {missing}")
    return array, _normalise_keys(table)


def _normalise_keys(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["Metadata_Plate"] = df["Metadata_Plate"].astype(str)
    df["Metadata_Well"] = df["Metadata_Well"].astype(str)
    df["Metadata_Site"] = pd.to_numeric(df["Metadata_Site"]).astype("int64")
    return df


def read_targets(
    plates: Sequence[str], *, targets: str | None = None, targets_dir: str | None = None
) -> pd.DataFrame:
    """Per-site regression targets: one table (``train.targets``) or ``<targets_dir>/<plate>.parquet``."""
    if targets:
        path = Path(targets)
        if not path.is_file():
            raise ConfigError(f"train.targets: file not found: {path}")
        if path.suffix.lower() == ".parquet":
            table = pd.read_parquet(path)
        else:  # csv / tsv, optionally compressed: let pandas sniff the separator
            table = pd.read_csv(path, sep=None, engine="python")
        sources = str(path)
    elif targets_dir:
        frames = []
        for plate in plates:
            path = Path(targets_dir) / f"{plate}.parquet"
            if not path.is_file():
                raise DataError(f"regression targets for plate {plate} not found: {path}")
            frames.append(pd.read_parquet(path))
        table = pd.concat(frames, ignore_index=True)
        sources = str(targets_dir)
    else:
        raise ConfigError("no regression targets: give --targets-dir or set train.targets")
    missing = [c for c in SITE_KEYS if c not in table.columns]
    if missing:
        raise DataError(f"regression target table {sources}: missing key column(s) {missing}")
    table = _normalise_keys(table)
    feature_cols = [
        c for c in table.columns if not c.startswith("Metadata_") and pd.api.types.is_numeric_dtype(table[c])
    ]
    if not feature_cols:
        raise DataError(f"regression target table {sources}: no numeric feature columns")
    dup = table.duplicated(SITE_KEYS)
    if dup.any():
        row = table.loc[dup, SITE_KEYS].iloc[0].tolist()
        raise DataError(f"regression target table {sources}: duplicate site {row} (plate, well, site)")
    return table[SITE_KEYS + feature_cols]


@dataclass
class TrainingData:
    """Everything the loop needs, as plain arrays; ``images[p]`` is a memory map per plate."""

    images: dict[str, np.ndarray]
    plate_of: np.ndarray  # (N,) plate name per item
    row_of: np.ndarray  # (N,) row in that plate's array
    targets: np.ndarray  # (N, D) standardized float32
    labels: np.ndarray  # (N,) int64 class index
    is_val: np.ndarray  # (N,) bool
    classes: list[str]
    target_columns: list[str]
    target_mean: np.ndarray
    target_std: np.ndarray
    in_channels: int
    image_size: int
    split_info: dict[str, Any]


def _choose_validation(items: pd.DataFrame, cfg: TrainConfig, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    rng = np.random.default_rng(seed)
    if cfg.val_fraction == 0 and not cfg.val_plates:
        return np.zeros(len(items), bool), {"split": "none"}
    if cfg.split == "plate":
        plates = sorted(items["Metadata_Plate"].unique())
        if cfg.val_plates:
            unknown = sorted(set(cfg.val_plates) - set(plates))
            if unknown:
                raise ConfigError(
                    f"train.val_plates: plate(s) {unknown} are not among the training plates {plates}"
                )
            val = sorted(cfg.val_plates)
        else:
            if len(plates) < 2:
                raise ConfigError(
                    f"train.split: plate needs at least 2 plates, got {plates}; use train.split: treatment "
                    "or train.val_fraction: 0"
                )
            n_val = min(max(1, round(cfg.val_fraction * len(plates))), len(plates) - 1)
            val = sorted(rng.choice(plates, size=n_val, replace=False).tolist())
        if set(val) == set(plates):
            raise ConfigError(f"train.val_plates: {val} leaves no plate for training")
        return items["Metadata_Plate"].isin(val).to_numpy(), {"split": "plate", "validation": val}
    # Treatment split: hold out whole treatments; negative controls stay in training because every
    # plate needs them and they are not a perturbation to generalise to.
    label = items["_label"]
    negcon = set()
    if "Metadata_pert_type" in items.columns:
        negcon = set(label[items["Metadata_pert_type"].astype(str) == "negcon"])
    candidates = sorted(set(label) - negcon)
    if len(candidates) < 2:
        raise ConfigError(f"train.split: treatment needs at least 2 non-control treatments, got {candidates}")
    n_val = min(max(1, round(cfg.val_fraction * len(candidates))), len(candidates) - 1)
    val = sorted(rng.choice(candidates, size=n_val, replace=False).tolist())
    return label.isin(val).to_numpy(), {"split": "treatment", "validation": val}


def load_training_data(
    images_dir: str | Path, plates: Sequence[str], target_table: pd.DataFrame, cfg: TrainConfig, seed: int
) -> TrainingData:
    """Pair every site tile (or cell crop) with its site's target and treatment, then split."""
    if not plates:
        raise ConfigError("train: no plates given")
    images, tables = {}, []
    for plate in plates:
        array, table = open_images(images_dir, plate, cfg.level)
        images[plate] = array
        # the file's plate name keys the array (the table's Metadata_Plate could be spelt differently)
        table = table.assign(_row=np.arange(len(table)), _file=plate)
        tables.append(table)
    shapes = {p: a.shape[1:] for p, a in images.items()}
    if len(set(shapes.values())) != 1:
        raise DataError(f"image arrays differ in (C, S, S) between plates: {shapes}")
    items = pd.concat(tables, ignore_index=True)
    label_col = next((c for c in ("Metadata_TreatmentId", "Metadata_Treatment") if c in items.columns), None)
    if label_col is None:
        raise DataError(f"{images_dir}: index tables have no Metadata_TreatmentId/Metadata_Treatment column")
    items["_label"] = items[label_col].astype(str)

    feature_cols = [c for c in target_table.columns if c not in SITE_KEYS]
    merged = items.merge(target_table, on=SITE_KEYS, how="left", indicator=True, validate="many_to_one")
    absent = merged["_merge"] != "both"
    if absent.any():
        rows = merged.loc[absent, SITE_KEYS].drop_duplicates()
        raise DataError(
            f"{int(absent.sum())} {cfg.level}(s) have no regression target row, e.g. (plate, well, site) "
            f"{rows.head(3).values.tolist()}"
        )
    is_val, split_info = _choose_validation(merged, cfg, seed)
    if (~is_val).sum() < 2:
        raise DataError(
            f"only {(~is_val).sum()} training item(s) after the {cfg.split} split; need at least 2"
        )

    values = merged[feature_cols].to_numpy(dtype=np.float64)
    # Statistics from the training split only, one row per site (cells share their site's target).
    train_sites = merged.loc[~is_val].drop_duplicates(SITE_KEYS)
    fit = train_sites[feature_cols].to_numpy(dtype=np.float64)
    with np.errstate(all="ignore"):
        mean = np.nanmean(fit, axis=0)
        std = np.nanstd(fit, axis=0)
    std = np.where(np.isfinite(std) & (std > 0), std, np.inf)  # constant feature → 0 after scaling
    mean = np.where(np.isfinite(mean), mean, 0.0)
    standardized = np.nan_to_num((values - mean) / std, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)

    classes = sorted(merged["_label"].unique())
    class_index = {c: i for i, c in enumerate(classes)}
    c, s = next(iter(shapes.values()))[0], next(iter(shapes.values()))[1]
    split_info.update(n_train=int((~is_val).sum()), n_validation=int(is_val.sum()), label_column=label_col)
    return TrainingData(
        images=images,
        plate_of=merged["_file"].to_numpy(),
        row_of=merged["_row"].to_numpy(),
        targets=standardized,
        labels=merged["_label"].map(class_index).to_numpy(dtype=np.int64),
        is_val=is_val,
        classes=classes,
        target_columns=feature_cols,
        target_mean=mean.astype(np.float32),
        target_std=np.where(np.isfinite(std), std, 0.0).astype(np.float32),
        in_channels=int(c),
        image_size=int(s),
        split_info=split_info,
    )


class ItemDataset(Dataset):
    def __init__(self, data: TrainingData, indices: np.ndarray) -> None:
        self.data = data
        self.indices = np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        k = int(self.indices[i])
        d = self.data
        image = image_to_float(np.asarray(d.images[d.plate_of[k]][d.row_of[k]]))
        return torch.from_numpy(image), torch.from_numpy(d.targets[k]), torch.tensor(d.labels[k])


# ----------------------------------------------------------------------------- helpers


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


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over all tensors in key order (to prove which weights a stage started from)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _save(obj: Any, path: Path) -> None:
    with io.atomic_path(path) as tmp:
        torch.save(obj, tmp)


class TrainingInterrupted(RuntimeError):
    """Raised by ``stop_after_epochs`` to emulate a killed job at an epoch boundary (tests)."""


# ----------------------------------------------------------------------------- the loop


class _Outputs(nn.Module):
    """The model's training outputs in one forward (what DDP wraps): regression prediction, logits."""

    def __init__(self, model: PhenoProfilerModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        profile = self.model(images)
        logits = self.model.classifier(profile) if self.model.classifier is not None else None
        return self.model.regression_output(profile), logits


def _global_batches(
    n: int, batch_size: int, drop_last: bool, order: np.ndarray | None = None
) -> list[list[int]]:
    """Positions of each global batch, in order (the DataLoader's batching of ``order``)."""
    order = np.arange(n) if order is None else np.asarray(order)
    stop = n - n % batch_size if drop_last else n
    return [order[i : i + batch_size].tolist() for i in range(0, stop, batch_size)]


def _loader(dataset: Dataset, batches: list[list[int]], ctx: DistContext, loader_kw: Mapping[str, Any]):
    """This rank's DataLoader over its slice of every global batch + the per-rank item counts."""
    counts = [shard_sizes(len(b), ctx.world_size) for b in batches]
    local = [shard(b, ctx.rank, ctx.world_size) for b in batches]
    loader = DataLoader(dataset, batch_sampler=[b for b in local if b], **loader_kw)
    return loader, counts


def _run_epoch(
    net: nn.Module,
    loader: DataLoader,
    counts: list[list[int]],
    weights: LossWeights,
    device: torch.device,
    amp_dtype,
    ctx: DistContext,
    optimizer=None,
    scaler=None,
    desc: str = "",
) -> dict[str, float]:
    """One pass over ``loader``; returns the item-weighted mean losses of the global batches.

    One process: ``net`` is the model.  N processes: ``net`` is the DDP-wrapped :class:`_Outputs`;
    every rank gathers the outputs of the whole global batch and computes the global losses.
    """
    training = optimizer is not None
    net.train(training)
    sums = {k: 0.0 for k in ("loss", "mse", "ce", "contrastive")}
    count = 0
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    grad = nullcontext() if training else torch.inference_mode()
    from tqdm import tqdm

    base = getattr(net, "module", net)  # evaluation bypasses DDP (no gradient sync to do)
    bar = tqdm(
        counts,
        desc=desc,
        file=sys.stderr,
        leave=False,
        mininterval=5.0,
        disable=None if ctx.is_main else True,
    )
    batches = iter(loader)
    with grad:
        for shard_counts in bar:
            if shard_counts[ctx.rank] > 0:
                images, targets, labels = next(batches)
                images = images.to(device, non_blocking=True)
                if device.type == "cuda":
                    images = images.contiguous(memory_format=torch.channels_last)
                targets, labels = targets.to(device), labels.to(device)
            else:  # evaluation only: a short last batch can leave a rank without items
                images = None
            with autocast:
                if not ctx.active:
                    parts = compute_losses(net, images, targets, labels, weights)
                else:
                    if images is not None:
                        prediction, logits = (net if training else base)(images)
                    else:
                        model = base.model
                        prediction = torch.zeros((0, model.target_dim), device=device)
                        logits = (
                            None
                            if model.classifier is None
                            else torch.zeros((0, model.classifier.out_features), device=device)
                        )
                        targets = torch.zeros((0, model.target_dim), dtype=torch.float32, device=device)
                        labels = torch.zeros((0,), dtype=torch.int64, device=device)
                    prediction = gather_rows(prediction, shard_counts, grad=training)
                    logits = gather_rows(logits, shard_counts, grad=training) if logits is not None else None
                    targets = gather_rows(targets, shard_counts, grad=False)
                    labels = gather_rows(labels, shard_counts, grad=False)
                    parts = combine_losses(
                        prediction, logits, targets, labels, weights, base.model.config.temperature
                    )
            if training:
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(parts["loss"]).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    parts["loss"].backward()
                    optimizer.step()
            n = sum(shard_counts)
            count += n
            for k in sums:
                sums[k] += float(parts[k].detach()) * n
            bar.set_postfix(loss=sums["loss"] / count)
    return {k: v / max(count, 1) for k, v in sums.items()}


def _freeze_unused_heads(model: PhenoProfilerModel, weights: LossWeights) -> None:
    """DDP expects a gradient for every trainable parameter: heads whose losses are off (stage 1's
    classifier) get none, as in one process, so take them out of DDP's reach."""
    if model.classifier is not None and weights.ce == 0:
        model.classifier.requires_grad_(False)
    if model.regression_head is not None and weights.mse == 0 and weights.contrastive == 0:
        model.regression_head.requires_grad_(False)


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


def _checkpoint_payload(
    model,
    data: TrainingData,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    stage: int,
    state: Mapping[str, torch.Tensor],
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "stage": stage,
        "model_state": {k: v.detach().cpu().clone() for k, v in state.items()},
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
) -> dict[str, Path]:
    """Run both stages; return the paths of stage1.pt, stage2.pt and history.csv.

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
    out_dir = Path(out_dir)
    plates = [str(p) for p in plates]

    # N processes (torchrun): the global batch must split evenly; fail before joining the group.
    world = launched_world()[1]
    if world > 1:
        check_batch_size(cfg.batch_size, world, source="WORLD_SIZE set by torchrun")
    target_table = read_targets(
        plates, targets=cfg.targets, targets_dir=str(targets_dir) if targets_dir else None
    )
    data = load_training_data(images_dir, plates, target_table, cfg, seed)
    ctx, device = init_distributed(cfg.distributed, pick_device(cfg.device))
    try:
        return _train_stages(
            data, ctx, device, out_dir, plates, model_cfg, cfg, seed, resume, stop_after_epochs
        )
    finally:
        ctx.close()


def _train_stages(
    data: TrainingData,
    ctx: DistContext,
    device: torch.device,
    out_dir: Path,
    plates: list[str],
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    seed: int,
    resume: bool,
    stop_after_epochs: int | None,
) -> dict[str, Path]:
    state_dir = out_dir / "state"
    amp_dtype = pick_precision(cfg.precision, device)
    log.info("training on %s (autocast %s): %s", device, amp_dtype, data.split_info)

    # train.distributed is left out: N processes train the same model as one, so a job killed on
    # 4 GPUs may resume on 2 (dropout draws differ, see phenoprofiler_core.distributed).
    train_key = {k: v for k, v in cfg.to_dict().items() if k != "distributed"}
    fingerprint = hashlib.sha256(
        json.dumps(
            {
                "model": model_cfg.to_dict(),
                "train": train_key,
                "seed": seed,
                "plates": plates,
                "n_items": len(data.labels),
                "targets": data.target_columns,
                "split": data.split_info,
            },
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()

    train_idx = np.flatnonzero(~data.is_val)
    val_idx = np.flatnonzero(data.is_val)
    loader_kw = dict(num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    train_set = ItemDataset(data, train_idx)
    val_loader = (
        _loader(
            ItemDataset(data, val_idx), _global_batches(len(val_idx), cfg.batch_size, False), ctx, loader_kw
        )
        if len(val_idx)
        else None
    )
    # Drop a last partial batch: contrastive loss and BatchNorm need > 1 item per batch.
    drop_last = len(train_idx) > cfg.batch_size
    if ctx.active and len(train_idx) < ctx.world_size:
        raise DataError(f"{len(train_idx)} training item(s) cannot be shared by {ctx.world_size} processes")

    history: list[dict[str, Any]] = []
    epochs_done_here = 0
    previous: Path | None = None
    paths = {
        "stage1": out_dir / "stage1.pt",
        "stage2": out_dir / "stage2.pt",
        "history": out_dir / "history.csv",
    }

    def save(obj: Any, path: Path) -> None:  # rank 0 alone writes
        if ctx.is_main:
            _save(obj, path)

    for stage, n_epochs in ((1, cfg.epochs_stage1), (2, cfg.epochs_stage2)):
        final_path = paths[f"stage{stage}"]
        last_path = state_dir / f"stage{stage}_last.pt"
        best_path = state_dir / f"stage{stage}_best.pt"
        weights = (
            LossWeights(contrastive=0.0, mse=1.0, ce=0.0) if stage == 1 else LossWeights(**cfg.loss_weights)
        )

        # A stage finished by an earlier (killed) call with the same settings is reused as is.
        if resume and final_path.is_file():
            done = torch.load(final_path, map_location="cpu", weights_only=False)
            if done.get("fingerprint") == fingerprint:
                log.info("stage %d already complete in %s; reusing it", stage, final_path)
                history = list(done["history"])
                previous = final_path
                continue

        # Every stage starts from a known RNG state, so a resumed stage 2 sees the same randomness.
        seed_everything(seed + 1000 * stage)
        model = create_model(
            model_cfg,
            in_channels=data.in_channels,
            num_classes=len(data.classes),
            target_dim=len(data.target_columns),
        )
        if ctx.rank > 0:  # same initial weights on every rank, dropout draws of its own
            seed_everything(seed + 1000 * stage + 7919 * ctx.rank)
        init_digest = None
        if previous is not None:
            model.load_state_dict(torch.load(previous, map_location="cpu", weights_only=False)["model_state"])
            init_digest = weights_digest(model.state_dict())
        model.to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = make_scheduler(optimizer, cfg)
        scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
        start_epoch, best_loss, best_epoch = 0, float("inf"), -1
        best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        stage_history = list(history)

        if resume and last_path.is_file():
            saved = torch.load(last_path, map_location="cpu", weights_only=False)
            if saved.get("fingerprint") == fingerprint:
                model.load_state_dict(saved["model"])
                optimizer.load_state_dict(saved["optimizer"])
                scheduler.load_state_dict(saved["scheduler"])
                if scaler is not None and saved.get("scaler"):
                    scaler.load_state_dict(saved["scaler"])
                start_epoch, best_loss, best_epoch = (
                    saved["epoch"] + 1,
                    saved["best_loss"],
                    saved["best_epoch"],
                )
                stage_history = list(saved["history"])
                init_digest = saved.get("init_digest")
                best_state = (
                    torch.load(best_path, map_location="cpu", weights_only=False)
                    if best_path.is_file()
                    else best_state
                )
                rng_ranks = saved.get("rng_ranks") or [saved["rng"]]
                if len(rng_ranks) == ctx.world_size:
                    _set_rng_state(rng_ranks[ctx.rank])
                elif ctx.is_main:  # resumed with another process count: rank 0 keeps its stream
                    _set_rng_state(saved["rng"])
                log.info("resuming stage %d at epoch %d from %s", stage, start_epoch, last_path)
            else:
                log.warning("ignoring %s: it was written with other settings", last_path)

        net: nn.Module = model
        if ctx.active:
            if cfg.distributed["sync_batchnorm"]:
                log.info("synchronised BatchNorm in %d layer(s)", convert_sync_batchnorm(model))
            _freeze_unused_heads(model, weights)
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(
                _Outputs(model), device_ids=[device.index] if device.type == "cuda" else None
            )

        for epoch in range(start_epoch, n_epochs):
            # The shuffle order depends only on (seed, stage, epoch): a resumed run replays it exactly.
            order = torch.randperm(
                len(train_idx),
                generator=torch.Generator().manual_seed(seed * 1_000_003 + stage * 10_007 + epoch),
            )
            train_loader, train_counts = _loader(
                train_set,
                _global_batches(len(train_idx), cfg.batch_size, drop_last, order.numpy()),
                ctx,
                loader_kw,
            )
            tr = _run_epoch(
                net,
                train_loader,
                train_counts,
                weights,
                device,
                amp_dtype,
                ctx,
                optimizer,
                scaler,
                desc=f"stage {stage} epoch {epoch + 1}/{n_epochs} train",
            )
            scheduler.step()
            va = (
                _run_epoch(
                    net,
                    val_loader[0],
                    val_loader[1],
                    weights,
                    device,
                    amp_dtype,
                    ctx,
                    desc=f"stage {stage} epoch {epoch + 1} val",
                )
                if val_loader is not None
                else None
            )
            for split, row in (("train", tr), ("validation", va)):
                if row is not None:
                    stage_history.append({"stage": stage, "epoch": epoch + 1, "split": split, **row})
            score = va["loss"] if va is not None else tr["loss"]
            log.info(
                "stage %d epoch %d: train %.5g%s",
                stage,
                epoch + 1,
                tr["loss"],
                f", validation {va['loss']:.5g}" if va else "",
            )
            if score < best_loss or best_epoch < 0:
                best_loss, best_epoch = score, epoch + 1
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                save(best_state, best_path)
            rng_ranks = all_gather_objects(ctx, _rng_state())
            save(
                {
                    "fingerprint": fingerprint,
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "best_loss": best_loss,
                    "best_epoch": best_epoch,
                    "history": stage_history,
                    "init_digest": init_digest,
                    "rng": rng_ranks[0],
                    "rng_ranks": rng_ranks if ctx.active else None,
                },
                last_path,
            )
            if ctx.is_main:
                write_history(stage_history, paths["history"])
            ctx.barrier()  # the state is on disk before any rank moves on (or is stopped)
            epochs_done_here += 1
            if stop_after_epochs is not None and epochs_done_here >= stop_after_epochs:
                raise TrainingInterrupted(f"stopped after {epochs_done_here} epoch(s) as requested")

        if n_epochs == 0:  # nothing trained in this stage: its "best" is the starting point
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        history = stage_history
        save(
            _checkpoint_payload(
                model,
                data,
                model_cfg,
                cfg,
                stage,
                best_state,
                {
                    "fingerprint": fingerprint,
                    "best_epoch": best_epoch,
                    "best_val_loss": best_loss,
                    "init_digest": init_digest,
                    "history": history,
                    "seed": seed,
                    "plates": plates,
                },
            ),
            final_path,
        )
        ctx.barrier()  # every rank starts the next stage from this file
        previous = final_path

    if ctx.is_main:
        write_history(history, paths["history"])
    ctx.barrier()
    return paths


def write_history(rows: list[dict[str, Any]], path: Path) -> None:
    io.write_text(pd.DataFrame(rows, columns=HISTORY_COLUMNS).to_csv(index=False), path)


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
    if args.threads:  # the job's threads are shared by the processes torchrun started on this node
        torch.set_num_threads(max(1, args.threads // local_world))
    level = TrainConfig.from_dict(train_options).level
    if level == "auto":  # cell crops when they exist for every plate, else site tiles
        have_cells = args.cells_dir is not None and all(
            (Path(args.cells_dir) / f"{plate}.npy").is_file() for plate in args.plates
        )
        level = "cell" if have_cells else "site"
        train_options["level"] = level
        log.info("train.level auto -> %s", level)
    images_dir = args.cells_dir if level == "cell" else args.tiles_dir
    if images_dir is None:
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
    )
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="stepwise training of the PhenoProfiler model", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--tiles-dir", help="folder with <plate>.npy + <plate>.sites.parquet (train.level: site)")
    p.add_argument("--cells-dir", help="folder with <plate>.npy + <plate>.cells.parquet (train.level: cell)")
    p.add_argument("--plates", nargs="+", required=True, help="plates to train and validate on")
    p.add_argument(
        "--targets-dir", help="folder with per-plate target tables <plate>.parquet (e.g. features/classic)"
    )
    p.add_argument("--targets", help="one per-site target table (parquet/csv); overrides train.targets")
    p.add_argument("--configfile", help="dataset config YAML (its model, train and seed sections are used)")
    p.add_argument(
        "--config-json", help="JSON (inline or a file) with 'model', 'train', 'seed'; overrides --configfile"
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: config 'seed' or 0)")
    p.add_argument("--no-resume", action="store_true", help="ignore saved state in OUT/state and start over")
    p.add_argument("--out", required=True, help="output folder model/<name>/")
    p.set_defaults(func=_run)
