"""Well profiles in 2-D: UMAP (PCA for few wells), coloured by MoA/treatment and by plate."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .content import Figure, Heading, blocks, bold, code, guarded, missing, note, text
from .figures import categorical_colors, fig_to_png, plt
from .options import ReportOptions
from .readers import feature_columns


def embed_2d(features: np.ndarray, options: ReportOptions) -> tuple[np.ndarray, str]:
    n = features.shape[0]
    if n >= options.umap_min_wells:
        import umap

        neighbors = min(options.umap_neighbors, n - 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "n_jobs overridden by random_state" etc.
            reducer = umap.UMAP(
                n_neighbors=neighbors,
                min_dist=options.umap_min_dist,
                metric="cosine",
                random_state=options.seed,
                init="spectral" if n > neighbors + 2 else "random",
            )
            coords = reducer.fit_transform(features)
        return coords, f"UMAP (cosine, n_neighbors={neighbors}, min_dist={options.umap_min_dist})"
    from sklearn.decomposition import PCA

    coords = PCA(n_components=2, random_state=options.seed).fit_transform(features)
    return coords, (
        f"PCA, first two components — only {n} wells, fewer than {options.umap_min_wells}, "
        "too few for a meaningful UMAP neighbourhood graph"
    )


# Profiles the map is drawn from, in order of preference: normalized well profiles, or, for a set
# that only has treatment-level profiles (an external consensus table), those.
PROFILE_TABLES = (("normalized.parquet", "well"), ("consensus.parquet", "treatment"))
_LABEL_COLUMNS = ("Metadata_Treatment", "Metadata_moa", "Metadata_Plate")


def profile_table(results: Path, name: str) -> tuple[Path, str] | None:
    for file_name, level in PROFILE_TABLES:
        path = results / "profiles" / name / file_name
        if path.is_file():
            return path, level
    return None


# Feature columns read at a time: memory is rows × this many columns, whatever the row groups.
_COLUMNS_PER_READ = 16


def read_profile_sample(path: Path, *, max_rows: int, seed: int) -> tuple[pd.DataFrame, np.ndarray, int]:
    """(label columns, float32 features, rows in the file) of at most ``max_rows`` rows.

    At JUMP size a table holds 400,000 wells × 672 features per set.  Features are read 16
    columns at a time and only the sampled rows kept: the peak is ~0.2 GB however the file's row
    groups are laid out (reading it whole, or batch by batch with pyarrow's read-ahead, peaked at
    2.3-2.9 GB on the synthetic JUMP table).  The sample is a seeded uniform draw (same seed,
    same rows).
    """
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path, pre_buffer=False)
    names = parquet.schema_arrow.names
    n_rows = parquet.metadata.num_rows
    rows = np.arange(n_rows)
    if n_rows > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(n_rows, size=max_rows, replace=False))
    labels = parquet.read(columns=[c for c in _LABEL_COLUMNS if c in names], use_threads=False)
    labels = labels.take(rows).to_pandas()
    features = feature_columns(names)
    out = np.empty((len(rows), len(features)), dtype=np.float32)
    for start in range(0, len(features), _COLUMNS_PER_READ):
        columns = features[start : start + _COLUMNS_PER_READ]
        taken = parquet.read(columns=columns, use_threads=False).take(rows).to_pandas()
        out[:, start : start + len(columns)] = taken.to_numpy(dtype=np.float32, na_value=np.nan)
    return labels, out, n_rows


def _embedding_figure(results: Path, name: str, options: ReportOptions):
    found = profile_table(results, name)
    if found is None:
        return missing(
            f"normalized well profiles of {name}", results / "profiles" / name / "normalized.parquet"
        )
    path, level = found
    unit = "wells" if level == "well" else "treatments"
    df, features, n_total = read_profile_sample(path, max_rows=options.umap_max_wells, seed=options.seed)
    # Normalisation can leave all-NaN (constant) features; they carry no information.
    keep = np.isfinite(features).any(axis=0)
    features = np.nan_to_num(features[:, keep])
    features = features[:, features.std(axis=0) > 0]
    if features.shape[0] < 3 or features.shape[1] < 2:
        return note(
            f"{name}: only {features.shape[0]} {unit} × {features.shape[1]} informative features in ",
            code(path),
            "; nothing to embed.",
        )
    coords, method = embed_2d(features, options)
    treatment = df.get("Metadata_Treatment", pd.Series("?", index=df.index)).astype(str)
    moa = df.get("Metadata_moa", pd.Series("", index=df.index)).fillna("").astype(str)
    by_moa = (moa != "").any()
    # Controls have no MoA: label them by treatment so they stay recognisable.
    colour_by = moa.where(moa != "", treatment) if by_moa else treatment
    plate = df.get("Metadata_Plate", pd.Series("?", index=df.index)).astype(str)

    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(12, 4.8))
    for ax, labels, title in (
        (axes[0], colour_by, "MoA (controls: treatment)" if by_moa else "treatment"),
        (axes[1], plate, "plate"),
    ):
        colours, palette, n_other = categorical_colors(labels, options.legend_entries)
        ax.scatter(coords[:, 0], coords[:, 1], c=colours, s=22, edgecolors="white", linewidths=0.4)
        handles = [
            pyplot.Line2D([], [], ls="", marker="o", color=c, label=label[:40])
            for label, c in palette.items()
        ]
        if n_other:
            handles.append(
                pyplot.Line2D(
                    [], [], ls="", marker="o", color=(0.75, 0.75, 0.75), label=f"other ({n_other} wells)"
                )
            )
        ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        ax.set_title(f"{name}: coloured by {title}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    sampled = (
        f"a random sample of {len(df):,} of the {n_total:,} {'well' if level == 'well' else 'treatment'} "
        f"profiles (seed {options.seed}, report.umap_max_wells)"
        if n_total > len(df)
        else f"{len(df)} {'well' if level == 'well' else 'treatment'} profiles"
    )
    meaning = (
        "Replicate wells of an active treatment should cluster together and away from the controls; "
        "clustering by plate instead signals a batch effect."
        if level == "well"
        else "Treatment-level profiles (this set has no well profiles): treatments sharing an MoA "
        "should sit together."
    )
    words = text(
        bold(name),
        f": {sampled} from ",
        code(path.relative_to(results)),
        f", {features.shape[1]} informative features, embedded with {method}. {meaning}",
    )
    return Figure(fig_to_png(fig), f"2-D embedding of {name}", words)


def umap_blocks(results: Path, sets: Sequence[str], options: ReportOptions):
    parts = []
    for name in sets:
        parts.append(Heading(name))
        parts += guarded(
            lambda name=name: blocks(_embedding_figure(results, name, options)),
            results / "profiles" / name / "normalized.parquet",
        )
    if not parts:
        parts.append(note("No feature sets were named."))
    return blocks(parts)
