"""Knobs of the report (config section ``report``), checked once before anything is read."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class ReportOptions:
    """Knobs of the report (config section ``report``)."""

    title: str | None = None
    umap_neighbors: int = 15
    umap_min_dist: float = 0.1
    # UMAP's k-NN graph needs n_neighbors < n; below this many wells PCA is the honest choice.
    umap_min_wells: int = 15
    # UMAP of 10,000 points takes about a minute on one core; more wells are a seeded sample.
    umap_max_wells: int = 10000
    example_treatments: int = 24
    # Plates that get an illumination picture and a cell-count map each (~150 KB per plate in
    # the page); every plate is still in the tables and the all-plates overview.
    qc_plates: int = 24
    table_rows: int = 50
    legend_entries: int = 20
    seed: int = 0

    def check(self) -> None:
        for key, value, minimum in (
            ("umap_neighbors", self.umap_neighbors, 2),
            ("umap_min_wells", self.umap_min_wells, 3),
            ("umap_max_wells", self.umap_max_wells, self.umap_min_wells),
            ("example_treatments", self.example_treatments, 0),
            ("qc_plates", self.qc_plates, 1),
            ("table_rows", self.table_rows, 1),
        ):
            if value < minimum:
                raise ConfigError(f"report.{key} must be ≥ {minimum}, got {value}")
        if self.umap_min_dist < 0:
            raise ConfigError(f"report.umap_min_dist must be ≥ 0, got {self.umap_min_dist}")
