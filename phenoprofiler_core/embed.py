"""``phenoprofiler embed``: per-site PhenoProfiler embeddings → ``features/<set>/<plate>.parquet``.

Three kinds of feature set share this code:
  * a trained model (``--checkpoint model/<name>/stage2.pt``),
  * ``untrained``: the configured architecture with seeded random weights (a baseline that shows what
    training adds),
  * ``published``: the authors' released weights (``--published PATH``, see :mod:`.checkpoint`).

Site level: one embedding per site tile.  Cell level: one per cell crop, then the per-feature median
over the site's cells (robust to a few bad crops); sites without cells are dropped (logged).
Output: the index table's ``Metadata_*`` columns + float32 ``emb_000`` … ``emb_<D-1>``.

Speed: the model is run in its inference form (:func:`.model.inference_model`: BatchNorm and the
central differences folded into convolutions, channels-last) under ``torch.inference_mode``, and
compiled with TorchInductor (weights frozen) when that pays off; outputs stay within 1e-4 of the
plain eval-mode model (``bench/bench_inference.py`` measures both).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from . import io
from .checkpoint import load_trained, published_model
from .errors import ConfigError, DataError
from .model import PhenoProfilerModel, create_model, inference_model
from .train import (
    SITE_KEYS,
    _normalise_keys,
    config_sections,
    image_to_float,
    open_images,
    pick_device,
    seed_everything,
)

log = logging.getLogger(__name__)


@dataclass
class EmbedConfig:
    """Options of the ``embed`` config section (see the schema for descriptions)."""

    batch_size: int = 16
    num_workers: int = 0
    level: str = "auto"
    device: str = "auto"
    precision: str = "fp32"
    compile: str = "auto"
    untrained: bool = True
    published_weights: str | None = None

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> EmbedConfig:
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown key(s) in config section 'embed': {unknown}; known: {sorted(known)}")
        cfg = cls(**options)
        cfg.compile = str(cfg.compile).lower()
        checks = [
            (cfg.batch_size >= 1, f"embed.batch_size must be >= 1, got {cfg.batch_size}"),
            (
                cfg.level in ("auto", "site", "cell"),
                f"embed.level must be auto, site or cell, got {cfg.level!r}",
            ),
            (cfg.device in ("auto", "cpu", "cuda"), f"embed.device: unknown value {cfg.device!r}"),
            (
                cfg.precision in ("fp32", "bf16", "fp16", "auto"),
                f"embed.precision: unknown value {cfg.precision!r}",
            ),
            (
                cfg.compile in ("auto", "true", "false"),
                f"embed.compile must be auto, true or false, got {cfg.compile!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return cfg


def feature_columns(dim: int) -> list[str]:
    return [f"emb_{i:03d}" for i in range(dim)]


class _Images(Dataset):
    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(image_to_float(np.asarray(self.array[i])))


def _autocast_dtype(precision: str, device: torch.device):
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _maybe_compile(module: torch.nn.Module, choice: str, n_batches: int) -> torch.nn.Module:
    """TorchInductor with frozen weights; ~10–30 s to compile, so only for more than a few batches."""
    if choice == "false" or (choice == "auto" and n_batches < 4):
        return module
    try:
        import torch._inductor.config as inductor_config

        # Freezing lets Inductor constant-fold weights and pre-pack them for oneDNN (CPU).
        inductor_config.freezing = True
        return torch.compile(module, dynamic=False)
    except Exception as exc:  # no compiler toolchain etc.: eager is correct, just slower
        log.warning("torch.compile unavailable (%s); running eagerly", exc)
        return module


def embed_array(model: PhenoProfilerModel, array: np.ndarray, cfg: EmbedConfig) -> np.ndarray:
    """Embed every image of a (N, C, S, S) array; returns float32 (N, D)."""
    device = pick_device(cfg.device)
    amp_dtype = _autocast_dtype(cfg.precision, device)
    model = model.eval()
    dim = model.config.projection_dim
    n = array.shape[0]
    out = np.empty((n, dim), dtype=np.float32)
    if n == 0:
        return out
    fast = inference_model(model).to(device)
    n_batches = -(-n // cfg.batch_size)
    runner = _maybe_compile(fast, cfg.compile, n_batches)
    compiled = runner is not fast
    log.info(
        "embedding %d images on %s: folded inference model, %s, %s",
        n,
        device,
        "compiled" if compiled else "eager",
        f"autocast {amp_dtype}" if amp_dtype else "fp32",
    )
    loader = DataLoader(
        _Images(array),
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
    )
    from tqdm import tqdm

    position = 0
    with torch.inference_mode():
        for batch in tqdm(loader, desc="embed", file=sys.stderr, leave=False, mininterval=5.0, disable=None):
            k = batch.shape[0]
            if compiled and k < cfg.batch_size:  # pad: one static shape, no recompilation for the tail
                batch = torch.cat([batch, batch[-1:].expand(cfg.batch_size - k, *batch.shape[1:])])
            batch = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            if amp_dtype is not None:
                with torch.autocast(device.type, dtype=amp_dtype):
                    result = runner(batch)
            else:
                result = runner(batch)
            out[position : position + k] = result[:k].float().cpu().numpy()
            position += k
    if not np.isfinite(out).all():
        raise DataError(
            f"embedding produced non-finite values for {int((~np.isfinite(out)).any(1).sum())} image(s)"
        )
    return out


def embed_plate(
    model: PhenoProfilerModel,
    plate: str,
    *,
    level: str,
    tiles_dir: str | Path | None,
    cells_dir: str | Path | None,
    cfg: EmbedConfig,
) -> pd.DataFrame:
    """Per-site embedding table of one plate (Metadata_* + emb_* float32)."""
    if level == "cell":
        if cells_dir is None:
            raise ConfigError("cell-level embedding needs --cells-dir")
        array, table = open_images(cells_dir, plate, "cell")
    else:
        if tiles_dir is None:
            raise ConfigError("site-level embedding needs --tiles-dir")
        array, table = open_images(tiles_dir, plate, "site")
    if array.shape[1] != model.in_channels:
        raise DataError(
            f"plate {plate}: images have {array.shape[1]} channels but the model expects {model.in_channels}"
        )
    emb = embed_array(model, array, cfg)
    columns = feature_columns(emb.shape[1])
    meta = [c for c in table.columns if c.startswith("Metadata_")]
    if level == "site":
        return pd.concat([table[meta].reset_index(drop=True), pd.DataFrame(emb, columns=columns)], axis=1)
    # Cell level → site: median over the site's cells; site metadata from the sites table if present.
    cells = pd.concat([table[SITE_KEYS].reset_index(drop=True), pd.DataFrame(emb, columns=columns)], axis=1)
    per_site = cells.groupby(SITE_KEYS, sort=False)[columns].median().astype(np.float32).reset_index()
    sites_table = Path(tiles_dir) / f"{plate}.sites.parquet" if tiles_dir else None
    if sites_table is not None and sites_table.is_file():
        site_meta = pd.read_parquet(sites_table)
        site_meta = site_meta[[c for c in site_meta.columns if c.startswith("Metadata_")]]
        site_meta = _normalise_keys(site_meta)
        result = site_meta.merge(per_site, on=SITE_KEYS, how="inner")
        dropped = len(site_meta) - len(result)
        if dropped:
            log.warning("plate %s: %d site(s) without cells dropped", plate, dropped)
        return result
    site_cols = [c for c in meta if c not in ("Metadata_ObjectNumber", "Metadata_X", "Metadata_Y")]
    site_meta = table[site_cols].drop_duplicates(SITE_KEYS)
    return site_meta.merge(per_site, on=SITE_KEYS, how="inner")


def build_model(
    kind: str,
    *,
    checkpoint: str | None = None,
    published: str | None = None,
    model_options: Mapping[str, Any] | None = None,
    in_channels: int | None = None,
    seed: int = 0,
) -> tuple[PhenoProfilerModel, str]:
    """(model, training level) for ``kind`` in trained | untrained | published."""
    if kind == "trained":
        model, meta = load_trained(checkpoint)
        return model, meta.get("level", "site")
    if kind == "published":
        return published_model(published, in_channels=in_channels or 5), "site"
    if kind == "untrained":
        if in_channels is None:
            raise ConfigError("untrained model: channel count unknown")
        seed_everything(seed)  # same seed → same random weights in every job and plate
        return create_model(model_options, in_channels=in_channels).eval(), "site"
    raise ConfigError(f"unknown model kind {kind!r}")


def _run(args) -> None:
    options = config_sections(args.configfile, args.config_json, ("model", "embed", "seed"))
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = EmbedConfig.from_dict(options.get("embed"))
    if args.batch_size:
        cfg.batch_size = args.batch_size
    kinds = [
        k
        for k, v in (
            ("trained", args.checkpoint),
            ("untrained", args.untrained),
            ("published", args.published),
        )
        if v
    ]
    if len(kinds) != 1:
        raise ConfigError("give exactly one of --checkpoint PATH, --untrained, --published PATH")
    in_channels = None
    if args.tiles_dir and (Path(args.tiles_dir) / f"{args.plate}.npy").is_file():
        in_channels = int(np.load(Path(args.tiles_dir) / f"{args.plate}.npy", mmap_mode="r").shape[1])
    elif args.cells_dir and (Path(args.cells_dir) / f"{args.plate}.npy").is_file():
        in_channels = int(np.load(Path(args.cells_dir) / f"{args.plate}.npy", mmap_mode="r").shape[1])
    if kinds[0] == "published" and in_channels not in (None, 5):
        raise ConfigError(
            f"published weights expect 5 channels (DNA, ER, RNA, AGP, Mito); the data has {in_channels}"
        )
    seed = args.seed if args.seed is not None else int(options.get("seed", 0))
    model, trained_level = build_model(
        kinds[0],
        checkpoint=args.checkpoint,
        published=args.published,
        model_options=options.get("model"),
        in_channels=in_channels,
        seed=seed,
    )
    level = trained_level if cfg.level == "auto" else cfg.level
    table = embed_plate(
        model, args.plate, level=level, tiles_dir=args.tiles_dir, cells_dir=args.cells_dir, cfg=cfg
    )
    io.write_parquet(table, args.out)
    log.info(
        "wrote %s (%d sites × %d features, %s level)",
        args.out,
        len(table),
        sum(c.startswith("emb_") for c in table.columns),
        level,
    )


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "embed",
        help="per-site embeddings from a trained, untrained or published model",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--plate", required=True)
    p.add_argument("--tiles-dir", help="folder with <plate>.npy + <plate>.sites.parquet")
    p.add_argument("--cells-dir", help="folder with <plate>.npy + <plate>.cells.parquet (cell level)")
    p.add_argument("--checkpoint", help="stage2.pt (or stage1.pt) written by 'phenoprofiler train'")
    p.add_argument("--untrained", action="store_true", help="seeded random weights of the configured model")
    p.add_argument("--published", help="published PhenoProfiler weights (plain state dict)")
    p.add_argument("--configfile", help="dataset config YAML (its model, embed and seed sections are used)")
    p.add_argument(
        "--config-json", help="JSON (inline or a file) with 'model', 'embed', 'seed'; overrides --configfile"
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--batch-size", type=int, help="override embed.batch_size")
    p.add_argument(
        "--seed", type=int, default=None, help="seed of the untrained model (default: config 'seed' or 0)"
    )
    p.add_argument("--out", required=True, help="output features/<set>/<plate>.parquet")
    p.set_defaults(func=_run)
