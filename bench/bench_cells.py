"""Benchmark the single-cell path on real LINCS sites: cells/s for segmentation, crops and classic features.

Also prints the figures the cells/classic issue asks for: agreement of our nuclei with the CellProfiler
centres shipped with the data (all 60 sites, full 1080² and central 480² crop), and nuclei per well
(sum over the 3 sites) from the centres and from our segmentation.

Run:  python bench/bench_cells.py [--data ../shared/data/lincs_SQ000152xx_4wells_png8bit] [--plates 1] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from phenoprofiler_core import cells, classic
from phenoprofiler_core.io import read_image

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]
CENTRE_COLUMNS = ("Nuclei_Location_Center_X", "Nuclei_Location_Center_Y")


def lincs_manifest(root: Path) -> pd.DataFrame:
    index = pd.read_csv(root / "images.csv")
    rows = []
    for (plate, well, site), group in index.groupby(["plate", "well", "site"]):
        row = {
            "Metadata_Plate": plate,
            "Metadata_Well": well,
            "Metadata_Site": int(site),
            "Metadata_Treatment": group["pert_iname"].iloc[0],
        }
        row.update({f"Path_{g.channel_name}": str(root / g.path) for g in group.itertuples()})
        rows.append(row)
    return pd.DataFrame(rows)


def agreement(root: Path, manifest: pd.DataFrame) -> pd.DataFrame:
    """Per site and view: our nucleus count, CellProfiler's, and the share of its centres inside our nuclei."""
    records = []
    for row in manifest.itertuples():
        dna = read_image(row.Path_DNA).astype(np.float32) / 255
        centres = cells.read_locations(
            root / "locations" / row.Metadata_Plate / f"{row.Metadata_Well}-{row.Metadata_Site}-Nuclei.csv",
            *CENTRE_COLUMNS,
        )
        for view, (lo, hi) in {"full 1080²": (0, dna.shape[0]), "crop 480²": (300, 780)}.items():
            labels = cells.segment_nuclei(dna[lo:hi, lo:hi])
            shifted = centres - lo
            keep = ((shifted >= 0) & (shifted < hi - lo)).all(axis=1)
            x, y = np.round(shifted[keep]).astype(int).clip(0, hi - lo - 1).T
            records.append(
                {
                    "view": view,
                    "plate": row.Metadata_Plate,
                    "well": row.Metadata_Well,
                    "treatment": row.Metadata_Treatment,
                    "ours": int(labels.max()),
                    "cellprofiler": int(keep.sum()),
                    "inside": float(np.mean(labels[y, x] > 0)),
                }
            )
    return pd.DataFrame(records)


def main() -> None:
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "lincs_SQ000152xx_4wells_png8bit"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default)
    parser.add_argument("--plates", type=int, default=1, help="plates timed (12 sites each)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-agreement", action="store_true")
    args = parser.parse_args()
    manifest = lincs_manifest(args.data)
    print(f"CPU cores visible: {os.cpu_count()}, workers: {args.workers}")

    if not args.skip_agreement:
        table = agreement(args.data, manifest)
        table["relative_error"] = (table["ours"] - table["cellprofiler"]) / table["cellprofiler"]
        for view, group in table.groupby("view", sort=False):
            print(
                f"\n[{view}] {len(group)} sites: median |relative count error| {group['relative_error'].abs().median():.3f}, "
                f"mean relative error {group['relative_error'].mean():+.3f}, CellProfiler centres inside our nuclei "
                f"{group['inside'].mean():.4f} (worst site {group['inside'].min():.3f})"
            )
            per_well = (
                group.groupby(["plate", "well", "treatment"])[["cellprofiler", "ours"]]
                .sum()
                .unstack(["well", "treatment"])
            )
            print(per_well.to_string())
            for source in ("cellprofiler", "ours"):
                counts = per_well[source].droplevel("treatment", axis=1)
                dmso = counts[["A01", "J18"]].mean(axis=1)
                print(
                    f"  {source}: lonafarnib (P13) < DMSO mean on {(counts['P13'] < dmso).sum()}/5 plates, "
                    f"< both DMSO wells on {((counts['P13'] < counts['A01']) & (counts['P13'] < counts['J18'])).sum()}/5, "
                    f"pooled ratio P13 / DMSO mean {counts['P13'].sum() / dmso.sum():.2f}"
                )

    plates = sorted(manifest["Metadata_Plate"].unique())[: args.plates]
    timed = manifest[manifest["Metadata_Plate"].isin(plates)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "manifest.parquet"
        timed.to_parquet(path, index=False)

        # Single process, per step, on one site: where the time goes.
        row = timed.iloc[0].to_dict()
        list(
            cells.crop_cells(np.zeros((1, 8, 8), np.float32), np.array([[4.0, 4.0]]), box_size=4, crop_size=2)
        )  # import torch
        t0 = time.perf_counter()
        image = cells.load_site(row, CHANNELS)
        t1 = time.perf_counter()
        labels, centres = cells.site_nuclei(row, image, CHANNELS, cells.NucleiOptions())
        t2 = time.perf_counter()
        low, high = np.percentile(image.reshape(5, -1)[:, ::97], [0.1, 99.9], axis=1)
        crops = np.concatenate(list(cells.crop_cells(cells.rescale(image, low, high), centres)))
        t3 = time.perf_counter()
        classic.site_features(image, CHANNELS, labels)
        t4 = time.perf_counter()
        n = len(centres)
        print(
            f"\none site ({n} nuclei, 1 process): read+correct {t1 - t0:.2f} s, nuclei {t2 - t1:.2f} s, "
            f"crops {t3 - t2:.2f} s ({crops.shape}), classic features {t4 - t3:.2f} s"
        )

        t0 = time.perf_counter()
        table = (
            cells.run_cells(path, plates[0], tmp / "c.npy", tmp / "c.parquet", workers=args.workers)
            if len(plates) == 1
            else pd.concat(
                [
                    cells.run_cells(path, p, tmp / f"{p}.npy", tmp / f"{p}.parquet", workers=args.workers)
                    for p in plates
                ]
            )
        )
        t1 = time.perf_counter()
        for plate in plates:
            classic.run_classic(path, plate, tmp / f"{plate}.classic.parquet", workers=args.workers)
        t2 = time.perf_counter()
        n = len(table)
        print(f"\n{len(timed)} full 1080² sites, {n} cells, {args.workers} workers:")
        print(
            f"  cells   (segmentation + percentiles + crops 128->96): {t1 - t0:6.1f} s  {n / (t1 - t0):6.0f} cells/s"
        )
        print(
            f"  classic (segmentation + cells + features):             {t2 - t1:6.1f} s  {n / (t2 - t1):6.0f} cells/s"
        )
        print(
            f"  both:                                                  {t2 - t0:6.1f} s  {n / (t2 - t0):6.0f} cells/s"
        )


if __name__ == "__main__":
    main()
