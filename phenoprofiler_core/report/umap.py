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
from .readers import feature_columns, read_parquet


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


def _embedding_figure(results: Path, name: str, options: ReportOptions):
    path = results / "profiles" / name / "normalized.parquet"
    if not path.is_file():
        return missing(f"normalized well profiles of {name}", path)
    df = read_parquet(path)
    features = (
        df[feature_columns(df.columns)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    )
    # Normalisation can leave all-NaN (constant) features; they carry no information.
    keep = np.isfinite(features).any(axis=0)
    features = np.nan_to_num(features[:, keep])
    features = features[:, features.std(axis=0) > 0]
    if features.shape[0] < 3 or features.shape[1] < 2:
        return note(
            f"{name}: only {features.shape[0]} wells × {features.shape[1]} informative features in ",
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
    words = text(
        bold(name),
        f": {len(df)} well profiles from ",
        code(path.relative_to(results)),
        f", {features.shape[1]} informative features, embedded with {method}. Replicate wells of "
        "an active treatment should cluster together and away from the controls; clustering by plate "
        "instead signals a batch effect.",
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
