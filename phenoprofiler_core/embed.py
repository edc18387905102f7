"""``phenoprofiler embed``: per-site PhenoProfiler embeddings → ``features/<set>/<plate>.parquet``.

Three kinds of feature set share this code:
  * a trained model (``--checkpoint model/<name>/stage2.pt``),
  * ``untrained``: the configured architecture with seeded random weights (a baseline that shows what
    training adds); always fp32, whatever ``embed.precision`` says (see :func:`job_precision`),
  * ``published``: the authors' released weights (``--published PATH``, see :mod:`.checkpoint`).

Site level: one embedding per site tile.  Cell level: one per cell crop, then the per-feature median
over the site's cells (robust to a few bad crops); sites without cells are dropped (logged).
The tiles/crops ``.npy`` is read batch by batch at offsets, never memory-mapped, and what was read
leaves the page cache as the pass goes (:class:`.io.NpyRowReader`); cell-level medians are taken as
the cells stream past (:class:`SiteMedians`).  So memory does not grow with the plate.
Output: the index table's ``Metadata_*`` columns + float32 ``emb_000`` … ``emb_<D-1>``, and beside it
``<plate>.embed.json`` with the job's timing (start-up, compile, throughput; :class:`EmbedStats`).

Speed: the model is run in its inference form (:func:`.model.inference_model`: BatchNorm and the
central differences folded into convolutions, channels-last) under ``torch.inference_mode``, and
compiled with TorchInductor (weights frozen) only where that pays off: compiling costs seconds per
job, so ``embed.compile: auto`` compiles only plates with at least ``embed.compile_min_sites[device]``
images (the measured break-even, :data:`DEFAULT_COMPILE_MIN_SITES`).  Compiling is lazy (it happens
at the first call), so a failure anywhere in it (tracing, code generation, a missing C++ compiler)
is caught there and the job runs eagerly with a logged warning (:class:`InferenceRunner`).
``--compile-cache DIR`` shares TorchInductor's compiled kernels between the jobs of a run.
Outputs stay within 1e-4 of the plain eval-mode model (``bench/bench_inference.py`` measures both).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import statistics
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
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

# embed.compile: auto compiles a job only when it embeds at least this many images on the device.
# CPU: the break-even of a cold compile (empty cache) against the per-site saving for the paper's
# ResNet50 at 448², measured with ``bench/bench_inference.py --break-even --threads 1``: 2,530 sites
# by CPU time, 2,882 by wall time (warm cache: 420 / 566); figures in config/README.md.  A job
# cannot know whether the shared cache will be warm (all jobs of a SLURM run start on an empty
# one), so the rule is the cold figure, rounded up.  Small models gain little from compiling (the
# demo's ResNet18 at 224²: 2 %, break-even > 70,000 sites), which the demo's 12-site plates never reach.
# CUDA: not measured (no GPU was available); off for any plate-sized job until bench/gpu_check.py
# has measured the break-even on the cluster's GPUs.
DEFAULT_COMPILE_MIN_SITES: dict[str, int] = {"cpu": 3000, "cuda": 1_000_000}
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class EmbedConfig:
    """Options of the ``embed`` config section (see the schema for descriptions)."""

    batch_size: int = 16
    num_workers: int = 0
    level: str = "auto"
    device: str = "auto"
    precision: str = "fp32"
    compile: str = "auto"
    compile_min_sites: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_COMPILE_MIN_SITES))
    untrained: bool = True
    published_weights: str | None = None
    # feature sets from checkpoints of other runs (the workflow turns each into --checkpoint)
    models: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> EmbedConfig:
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown key(s) in config section 'embed': {unknown}; known: {sorted(known)}")
        cfg = cls(**options)
        cfg.compile = str(cfg.compile).lower()
        cfg.compile_min_sites = _compile_min_sites(cfg.compile_min_sites)
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


def _compile_min_sites(options: Any) -> dict[str, int]:
    """``embed.compile_min_sites`` with defaults filled and checked (device type → image count)."""
    if not isinstance(options, Mapping):
        raise ConfigError(f"embed.compile_min_sites must be a mapping of device to count, got {options!r}")
    unknown = sorted(set(options) - set(DEFAULT_COMPILE_MIN_SITES))
    if unknown:
        raise ConfigError(
            f"unknown key(s) in config section 'embed.compile_min_sites': {unknown}; "
            f"known: {sorted(DEFAULT_COMPILE_MIN_SITES)}"
        )
    merged = {**DEFAULT_COMPILE_MIN_SITES, **options}
    for device, count in merged.items():
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ConfigError(f"embed.compile_min_sites.{device} must be an integer >= 0, got {count!r}")
    return merged


def feature_columns(dim: int) -> list[str]:
    return [f"emb_{i:03d}" for i in range(dim)]


class _Batches(Dataset):
    """Batch ``b`` of the images, rows [b·size, (b+1)·size), as one float32 block in [0, 1].

    From a :class:`io.NpyRowReader` the rows are read from the file and their pages dropped from the
    page cache as the pass goes (:meth:`io.NpyRowReader.read`); a memory map would keep every page of
    the plate it touched resident and charged to the job (6.9 GB for a 3,456-site plate of tiles).
    An in-memory array is sliced.  Item = batch, so the DataLoader neither collates nor batches."""

    def __init__(self, images: np.ndarray | io.NpyRowReader, batch_size: int) -> None:
        self.images, self.batch_size = images, batch_size

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def __getitem__(self, b: int) -> torch.Tensor:
        start, stop = b * self.batch_size, min((b + 1) * self.batch_size, len(self.images))
        if isinstance(self.images, io.NpyRowReader):
            rows = self.images.read(start, stop)
        else:
            rows = np.asarray(self.images[start:stop])
        return torch.from_numpy(image_to_float(rows))


class EmbeddingArray:
    """Collects every image's embedding in one float32 (N, D) array (site level: 2.7 KB a site)."""

    def __init__(self, n: int, dim: int) -> None:
        self.values = np.empty((n, dim), dtype=np.float32)

    def add(self, start: int, embeddings: np.ndarray) -> None:
        self.values[start : start + len(embeddings)] = embeddings


class SiteMedians:
    """Per-site median of cell embeddings, taken as the cells stream past in file order.

    Only the sites some of whose cells are still to come are held (one or two when a site's cells
    are contiguous, as ``phenoprofiler cells`` writes them), not the plate's (N_cells, D) embeddings:
    2.7 KB a cell, ~1 GB for a 350,000-cell plate.  The median is the one pandas' groupby takes
    (float64 middle value, or the mean of the two middle values), cast to float32.
    """

    def __init__(self, cells: pd.DataFrame, dim: int) -> None:
        codes, sites = pd.factorize(pd.MultiIndex.from_frame(cells[SITE_KEYS]))  # first-seen order
        if (codes < 0).any():
            raise DataError(
                f"cells table row {int(np.argmax(codes < 0))} has no site ({', '.join(SITE_KEYS)})"
            )
        self.codes, self.sites, self.dim = codes, sites, dim
        self.last_row = np.full(len(sites), -1, dtype=np.int64)
        np.maximum.at(self.last_row, codes, np.arange(len(codes)))
        self.medians = np.full((len(sites), dim), np.nan, dtype=np.float32)
        self.pending: dict[int, list[np.ndarray]] = {}

    def add(self, start: int, embeddings: np.ndarray) -> None:
        stop = start + len(embeddings)
        codes = self.codes[start:stop]
        for code in pd.unique(codes):
            self.pending.setdefault(int(code), []).append(embeddings[codes == code])
        for code in [c for c in self.pending if self.last_row[c] < stop]:
            values = np.concatenate(self.pending.pop(code)).astype(np.float64)
            self.medians[code] = np.median(values, axis=0).astype(np.float32)

    def table(self) -> pd.DataFrame:
        """``SITE_KEYS`` + the median feature columns, one row per site in first-seen order."""
        if self.pending:
            raise RuntimeError(f"cells of {len(self.pending)} site(s) were not all embedded")
        keys = self.sites.to_frame(index=False, name=SITE_KEYS)
        return pd.concat([keys, pd.DataFrame(self.medians, columns=feature_columns(self.dim))], axis=1)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of ``embed.precision`` on ``device``; None = plain fp32."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def job_precision(kind: str, precision: str) -> str:
    """The precision a feature set is embedded at: ``untrained`` always fp32.

    With random weights the spread of an embedding feature between sites (std ~0.0018) is smaller
    than the bf16 rounding error of the embedding (~0.0044): reduced precision would bury the
    baseline's signal in noise, so the baseline would look worse than it is.
    """
    if kind == "untrained" and precision != "fp32":
        log.info("embed.precision %s ignored for the untrained set: random weights need fp32", precision)
        return "fp32"
    return precision


def should_compile(
    choice: str, *, n_images: int, device: torch.device, min_sites: Mapping[str, int]
) -> tuple[bool, str]:
    """Whether to compile (embed.compile) and why, for a job embedding ``n_images`` on ``device``."""
    if choice in ("true", "false"):
        return choice == "true", f"embed.compile: {choice}"
    threshold = min_sites.get(device.type, DEFAULT_COMPILE_MIN_SITES.get(device.type, 0))
    decision = n_images >= threshold
    relation = ">=" if decision else "<"
    return decision, f"auto: {n_images} images {relation} compile_min_sites.{device.type} = {threshold}"


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """The exception as one short log line (Dynamo appends a paragraph of debugging hints)."""
    text = " ".join(str(exc).split()).split(" Set TORCHDYNAMO_VERBOSE=1", 1)[0]
    return f"{type(exc).__name__}: {text[:limit]}{'…' if len(text) > limit else ''}"


def _fx_graph_cache_counts() -> dict[str, int]:
    """Inductor's FX-graph cache hits/misses/bypasses so far in this process (best effort)."""
    try:
        from torch._dynamo.utils import counters

        return {k: int(counters["inductor"][f"fxgraph_cache_{k}"]) for k in ("hit", "miss", "bypass")}
    except Exception:  # a private counter: its absence must not break embedding
        return {}


class InferenceRunner:
    """Calls the inference model on a batch: TorchInductor-compiled when asked, else eager.

    ``torch.compile`` is lazy: tracing, code generation and the C++ build all happen at the first
    call, so that is where a broken toolchain shows up (``InductorError: InvalidCxxCompiler`` on
    nodes and containers without a C++ compiler).  Any failure while compiling or running the
    compiled model logs one warning and switches this runner to the eager model for good; the batch
    that failed is recomputed eagerly without padding, so the output equals an eager run's.
    The compiled model sees one static batch shape: a short last batch is padded with copies of its
    last image (no recompilation for the tail).
    """

    def __init__(self, module: torch.nn.Module, *, compile: bool, batch_size: int) -> None:
        self.module = module
        self.batch_size = int(batch_size)
        self.compiled: Any = None
        self.fallback: str | None = None  # why compiling failed, when it did
        self.first_call_s: float | None = None  # the first compiled call: compile + one batch
        self.failed_call_s = 0.0  # time lost in a compiled call that failed
        self.cache_counts: dict[str, int] = {}  # FX-graph cache hit/miss/bypass of the first call
        if compile:
            try:
                # Freezing lets Inductor constant-fold the weights and pre-pack them for oneDNN (CPU).
                self.compiled = torch.compile(module, dynamic=False, options={"freezing": True})
            except Exception as exc:  # e.g. a Python version Dynamo does not support
                self._fall_back(exc)

    @property
    def is_compiled(self) -> bool:
        return self.compiled is not None

    def _fall_back(self, exc: BaseException) -> None:
        self.compiled = None
        self.fallback = _one_line(exc)
        log.warning("torch.compile failed (%s); running eagerly", self.fallback)

    def _pad(self, batch: torch.Tensor) -> torch.Tensor:
        k = batch.shape[0]
        if k == self.batch_size:
            return batch
        tail = batch[-1:].expand(self.batch_size - k, *batch.shape[1:])
        return torch.cat([batch, tail]).contiguous(memory_format=torch.channels_last)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            first = self.first_call_s is None
            before = _fx_graph_cache_counts() if first else {}
            start = time.perf_counter()
            try:
                result = self.compiled(self._pad(batch))[: batch.shape[0]]
                if first:
                    if batch.device.type == "cuda":
                        torch.cuda.synchronize(batch.device)
                    self.first_call_s = time.perf_counter() - start
                    after = _fx_graph_cache_counts()
                    self.cache_counts = {k: after[k] - before.get(k, 0) for k in after}
                return result
            except Exception as exc:  # trace, codegen, compiler or compiled-kernel failure
                self.failed_call_s += time.perf_counter() - start
                self._fall_back(exc)
        return self.module(batch)


@dataclass
class EmbedStats:
    """Timing of one embedding job (what ``<plate>.embed.json`` reports, see :func:`stats_record`)."""

    images: int = 0
    batches: int = 0
    batch_size: int = 0
    device: str = "cpu"
    threads: int = 0
    precision: str = "fp32"
    compile: bool = False  # the compiled model computed the embeddings
    compile_requested: bool = False
    compile_reason: str = ""
    compile_fallback: str | None = None
    compile_cache_counts: dict[str, int] = field(default_factory=dict)  # FX-graph cache hit/miss/bypass
    prepare_s: float = 0.0  # folding the model and moving it to the device
    compile_s: float = 0.0  # compiling: first compiled call minus a steady batch, or a failed attempt
    embed_s: float = 0.0  # the embedding loop without compiling
    loop_started: float = 0.0  # time.monotonic() when the loop began (for start-up time)


def embed_images(
    model: PhenoProfilerModel, images: np.ndarray | io.NpyRowReader, cfg: EmbedConfig
) -> tuple[np.ndarray, EmbedStats]:
    """Embed every image of a (N, C, S, S) array or ``.npy`` file: float32 (N, D) and the job's timing."""
    sink = EmbeddingArray(len(images), model.config.projection_dim)
    stats = embed_into(model, images, cfg, sink)
    return sink.values, stats


def embed_into(
    model: PhenoProfilerModel,
    images: np.ndarray | io.NpyRowReader,
    cfg: EmbedConfig,
    sink: EmbeddingArray | SiteMedians,
) -> EmbedStats:
    """Embed every image in batches of ``cfg.batch_size`` (rows in file order); hand each batch's
    float32 (k, D) embeddings to ``sink.add(first_row, embeddings)``; return the job's timing."""
    device = pick_device(cfg.device)
    amp_dtype = autocast_dtype(cfg.precision, device)
    model = model.eval()
    n = len(images)
    n_batches = -(-n // cfg.batch_size)
    stats = EmbedStats(
        images=n,
        batches=n_batches,
        batch_size=cfg.batch_size,
        device=str(device),
        threads=torch.get_num_threads(),
        precision=PRECISION_NAMES[amp_dtype],
    )
    if n == 0:
        stats.loop_started = time.monotonic()
        return stats
    start = time.perf_counter()
    fast = inference_model(model).to(device)
    stats.prepare_s = time.perf_counter() - start
    stats.compile_requested, stats.compile_reason = should_compile(
        cfg.compile, n_images=n, device=device, min_sites=cfg.compile_min_sites
    )
    runner = InferenceRunner(fast, compile=stats.compile_requested, batch_size=cfg.batch_size)
    log.info(
        "embedding %d images on %s: folded inference model, %s (%s), %s",
        n,
        device,
        "compiling" if runner.is_compiled else "eager",
        stats.compile_reason,
        f"autocast {amp_dtype}" if amp_dtype else "fp32",
    )
    loader = DataLoader(
        _Batches(images, cfg.batch_size),
        batch_size=None,  # an item is a batch already
        shuffle=False,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
    )
    from tqdm import tqdm

    position = non_finite = 0
    batch_times: list[float] = []
    stats.loop_started = time.monotonic()
    loop_start = time.perf_counter()
    with torch.inference_mode():
        for batch in tqdm(loader, desc="embed", file=sys.stderr, leave=False, mininterval=5.0, disable=None):
            batch_start = time.perf_counter()
            k = batch.shape[0]
            batch = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            if amp_dtype is not None:
                with torch.autocast(device.type, dtype=amp_dtype):
                    result = runner(batch)
            else:
                result = runner(batch)
            embeddings = result.float().cpu().numpy()
            non_finite += int((~np.isfinite(embeddings)).any(1).sum())
            sink.add(position, embeddings)
            position += k
            batch_times.append(time.perf_counter() - batch_start)
    loop_s = time.perf_counter() - loop_start
    stats.compile = runner.is_compiled
    stats.compile_fallback = runner.fallback
    stats.compile_cache_counts = runner.cache_counts
    if runner.first_call_s is not None:
        # The first compiled call = compiling + one batch; a later batch's median stands for the batch.
        steady = statistics.median(batch_times[1:]) if len(batch_times) > 1 else 0.0
        stats.compile_s = max(runner.first_call_s - steady, 0.0)
    stats.compile_s += runner.failed_call_s  # a failed attempt is start-up time too
    stats.embed_s = max(loop_s - stats.compile_s, 1e-9)
    if non_finite:
        raise DataError(f"embedding produced non-finite values for {non_finite} image(s)")
    return stats


def embed_array(model: PhenoProfilerModel, array: np.ndarray, cfg: EmbedConfig) -> np.ndarray:
    """Embed every image of a (N, C, S, S) array; returns float32 (N, D)."""
    return embed_images(model, array, cfg)[0]


def embed_plate(
    model: PhenoProfilerModel,
    plate: str,
    *,
    level: str,
    tiles_dir: str | Path | None,
    cells_dir: str | Path | None,
    cfg: EmbedConfig,
) -> tuple[pd.DataFrame, EmbedStats]:
    """Per-site embedding table of one plate (Metadata_* + emb_* float32) and the job's timing."""
    if level == "cell" and cells_dir is None:
        raise ConfigError("cell-level embedding needs --cells-dir")
    if level != "cell" and tiles_dir is None:
        raise ConfigError("site-level embedding needs --tiles-dir")
    folder = cells_dir if level == "cell" else tiles_dir
    with open_image_rows(folder, plate, level) as (images, table):
        if images.shape[1] != model.in_channels:
            raise DataError(
                f"plate {plate}: images have {images.shape[1]} channels but the model expects {model.in_channels}"
            )
        dim = model.config.projection_dim
        # cell level: the per-site medians are taken as the cells stream past (SiteMedians)
        sink = SiteMedians(table, dim) if level == "cell" else EmbeddingArray(len(images), dim)
        stats = embed_into(model, images, cfg, sink)
    if level == "cell":
        return with_site_metadata(sink.table(), table, plate=plate, tiles_dir=tiles_dir), stats
    return per_site_table(sink.values, table, level=level, plate=plate, tiles_dir=tiles_dir), stats


@contextlib.contextmanager
def open_image_rows(
    folder: str | Path, plate: str, level: str
) -> Iterator[tuple[io.NpyRowReader, pd.DataFrame]]:
    """``<folder>/<plate>.npy`` as a row reader (nothing mapped) and its checked index table."""
    array, table = open_images(folder, plate, level)  # the checks; maps the file but touches no page
    del array
    images = io.NpyRowReader(Path(folder) / f"{plate}.npy")
    try:
        yield images, table
    finally:
        images.close()


def per_site_table(
    emb: np.ndarray, table: pd.DataFrame, *, level: str, plate: str, tiles_dir: str | Path | None
) -> pd.DataFrame:
    """Embeddings with their site metadata; at cell level the median over each site's cells."""
    columns = feature_columns(emb.shape[1])
    meta = [c for c in table.columns if c.startswith("Metadata_")]
    if level == "site":
        return pd.concat([table[meta].reset_index(drop=True), pd.DataFrame(emb, columns=columns)], axis=1)
    medians = SiteMedians(table, emb.shape[1])
    medians.add(0, emb)
    return with_site_metadata(medians.table(), table, plate=plate, tiles_dir=tiles_dir)


def with_site_metadata(
    per_site: pd.DataFrame, cells: pd.DataFrame, *, plate: str, tiles_dir: str | Path | None
) -> pd.DataFrame:
    """Per-site medians (``SITE_KEYS`` + features) with their site metadata: from the sites table when
    there is one (in its order; sites without cells dropped, logged), else from the cells table."""
    meta = [c for c in cells.columns if c.startswith("Metadata_")]
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
    site_meta = cells[site_cols].drop_duplicates(SITE_KEYS)
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
        # what the model was trained on (datasets and plates), for the set's record and the report
        model.provenance = meta.get("provenance") or {"plates": meta.get("plates", [])}
        return model, meta.get("level", "site")
    if kind == "published":
        return published_model(published, in_channels=in_channels or 5), "site"
    if kind == "untrained":
        if in_channels is None:
            raise ConfigError("untrained model: channel count unknown")
        seed_everything(seed)  # same seed → same random weights in every job and plate
        return create_model(model_options, in_channels=in_channels).eval(), "site"
    raise ConfigError(f"unknown model kind {kind!r}")


def _process_age_s() -> float:
    """Seconds since this process started (Linux /proc), so start-up counts interpreter and imports.

    Elsewhere, or where /proc disagrees with itself (a container whose /proc/uptime is its own but
    whose start times are the host's): seconds since this module was imported, which misses the
    interpreter's start and the imports before it.
    """
    since_import = time.monotonic() - _MODULE_IMPORTED
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started_ticks = int(fields[19])  # field 22 (starttime); fields[0] is field 3 (state)
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        age = uptime - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return since_import
    return age if age >= since_import else since_import


_MODULE_IMPORTED = time.monotonic()


def stats_record(
    stats: EmbedStats, *, sites: int, level: str, kind: str, process_start: float, compile_cache: str | None
) -> dict[str, Any]:
    """The ``<plate>.embed.json`` record: where a job's time went (seconds, wall clock).

    ``startup_s`` is everything before the first image is embedded (interpreter, imports, model
    build or load, folding) plus compiling; ``embed_s`` the embedding loop without compiling (data
    reading included); ``sites_per_s`` = sites / embed_s.
    """
    startup_s = stats.loop_started - process_start + stats.compile_s
    return {
        "sites": int(sites),
        "images": stats.images,
        "level": level,
        "kind": kind,
        "device": stats.device,
        "threads": stats.threads,
        "batch_size": stats.batch_size,
        "batches": stats.batches,
        "precision": stats.precision,
        "compile": stats.compile,
        "compile_reason": stats.compile_reason,
        "compile_fallback": stats.compile_fallback,
        "compile_cache": compile_cache,
        "compile_cache_counts": stats.compile_cache_counts,
        "startup_s": round(startup_s, 3),
        "compile_s": round(stats.compile_s, 3),
        # microseconds: a small plate embeds in ~10 ms, where ms rounding would skew sites_per_s by 4 %
        "embed_s": round(stats.embed_s, 6),
        "sites_per_s": round(sites / stats.embed_s, 3) if stats.images else 0.0,
        "images_per_s": round(stats.images / stats.embed_s, 3) if stats.images else 0.0,
        "total_s": round(time.monotonic() - process_start, 3),
    }


def _model_kind(args) -> str:
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
    return kinds[0]


def _in_channels(args) -> int | None:
    for folder in (args.tiles_dir, args.cells_dir):
        if folder and (Path(folder) / f"{args.plate}.npy").is_file():
            return int(io.NpyRowReader(Path(folder) / f"{args.plate}.npy").shape[1])
    return None


def _run(args) -> None:
    process_start = time.monotonic() - _process_age_s()
    options = config_sections(args.configfile, args.config_json, ("model", "embed", "seed"))
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = EmbedConfig.from_dict(options.get("embed"))
    if args.batch_size:
        cfg.batch_size = args.batch_size
    kind = _model_kind(args)
    cfg.precision = job_precision(kind, cfg.precision)
    if args.compile_cache:
        # Inductor reads its cache folder from the environment when it compiles: jobs that share
        # the folder reuse each other's compiled graphs and kernels instead of compiling again.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(args.compile_cache).resolve())
    in_channels = _in_channels(args)
    if kind == "published" and in_channels not in (None, 5):
        raise ConfigError(
            f"published weights expect 5 channels (DNA, ER, RNA, AGP, Mito); the data has {in_channels}"
        )
    seed = args.seed if args.seed is not None else int(options.get("seed", 0))
    model, trained_level = build_model(
        kind,
        checkpoint=args.checkpoint,
        published=args.published,
        model_options=options.get("model"),
        in_channels=in_channels,
        seed=seed,
    )
    trained_on = getattr(model, "provenance", None)
    level = trained_level if cfg.level == "auto" else cfg.level
    table, stats = embed_plate(
        model, args.plate, level=level, tiles_dir=args.tiles_dir, cells_dir=args.cells_dir, cfg=cfg
    )
    io.write_parquet(table, args.out)
    record = stats_record(
        stats,
        sites=len(table),
        level=level,
        kind=kind,
        process_start=process_start,
        compile_cache=os.environ.get("TORCHINDUCTOR_CACHE_DIR") if stats.compile else None,
    )
    # which weights made the set, and (for a trained model, from this run or another) what they were
    # trained on: the report says it beside the set
    record["weights"] = args.checkpoint or args.published
    record["trained_on"] = trained_on
    stats_path = args.stats or default_stats_path(args.out)
    io.write_json(record, stats_path)
    log.info(
        "wrote %s (%d sites × %d features, %s level)",
        args.out,
        len(table),
        sum(c.startswith("emb_") for c in table.columns),
        level,
    )
    log.info(
        "embed timing: start-up %.1f s (compile %.1f s, %s), %d sites in %.1f s (%.2f sites/s), %s; %s",
        record["startup_s"],
        record["compile_s"],
        "compiled" if stats.compile else "eager",
        record["sites"],
        record["embed_s"],
        record["sites_per_s"],
        record["precision"],
        stats_path,
    )


def default_stats_path(out: str | os.PathLike) -> Path:
    """``features/<set>/<plate>.parquet`` → ``features/<set>/<plate>.embed.json``."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".parquet") + ".embed.json")


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
    p.add_argument(
        "--compile-cache",
        help="TorchInductor cache folder shared by the jobs of a run (default: Inductor's own, "
        "or $TORCHINDUCTOR_CACHE_DIR)",
    )
    p.add_argument(
        "--stats",
        help="timing record JSON (default: beside --out, <plate>.embed.json): start-up, compile, sites/s",
    )
    p.add_argument("--out", required=True, help="output features/<set>/<plate>.parquet")
    p.set_defaults(func=_run)
