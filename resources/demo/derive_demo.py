"""Derive the embedded demo (resources/demo/) from the real LINCS images in ../shared/data.

Source: ../shared/data/lincs_SQ000152xx_4wells_png8bit (cpg0004 LINCS Cell Painting, CC0; see its
README).  The full set (5 plates x 4 wells x 3 sites x 5 channels of 1080^2 PNG) is 114 MB; the demo
must stay under 25 MB, so every image is cropped to its central 480 x 480 pixels at NATIVE resolution
(real pixels, unchanged values; only the field of view shrinks) and re-saved as optimised PNG.
CellProfiler nucleus centres are kept for the nuclei inside the crop, shifted into crop coordinates.
The plate map, barcode map and MoA table are copied unchanged.

Run:  python resources/demo/derive_demo.py [--source ../shared/data/lincs_SQ000152xx_4wells_png8bit]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

HERE = Path(__file__).resolve().parent
CROP = (300, 780)  # rows/cols [300:780) of the 1080 x 1080 field: the central 480 x 480 pixels
METADATA_FILES = (
    "barcode_platemap_rows.csv",
    "C-7161-01-LM6-014.txt",
    "moa_rows_repurposing_info_external_moa_map_resolved.tsv",
    "LICENSE_CC0_lincs-cell-painting.md",
)


def derive(source: Path, out: Path = HERE) -> None:
    lo, hi = CROP
    images = sorted((source / "images").glob("*/*.png"))
    if len(images) != 300:
        raise SystemExit(f"expected 300 PNG under {source / 'images'}, found {len(images)}")
    for path in images:
        pixels = np.asarray(Image.open(path))
        target = out / "images" / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[lo:hi, lo:hi]).save(target, optimize=True)
    for csv in sorted((source / "locations").glob("*/*-Nuclei.csv")):
        centres = pd.read_csv(csv)
        x, y = centres["Nuclei_Location_Center_X"], centres["Nuclei_Location_Center_Y"]
        inside = (x >= lo) & (x < hi) & (y >= lo) & (y < hi)
        kept = centres[inside].copy()
        kept["Nuclei_Location_Center_X"] -= lo
        kept["Nuclei_Location_Center_Y"] -= lo
        target = out / "locations" / csv.parent.name / csv.name
        target.parent.mkdir(parents=True, exist_ok=True)
        kept.to_csv(target, index=False)
    (out / "metadata").mkdir(exist_ok=True)
    for name in METADATA_FILES:
        shutil.copy2(source / "metadata" / name, out / "metadata" / name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = HERE.parents[2] / "shared" / "data" / "lincs_SQ000152xx_4wells_png8bit"
    parser.add_argument("--source", type=Path, default=default)
    derive(parser.parse_args().source)
