"""How an illumination function's max/min depends on the number of sites averaged (not a benchmark of
speed: it backs the defaults illumination.min_sites and illumination.max_ratio, config/README.md).

Real LINCS sites of ../shared/data (1080², 8-bit), sites shuffled with a fixed seed; for n sites the
function is built exactly as the pipeline does (mean image -> illumination_function).

    python bench/illumination_site_count.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phenoprofiler_core.illumination import illumination_function
from phenoprofiler_core.io import read_image

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "lincs_SQ000152xx_4wells_png8bit" / "images"
CHANNELS = {1: "DNA", 2: "ER", 5: "Mito"}  # LINCS Phenix channel numbers (resources/demo/README.md)
COUNTS = (1, 2, 3, 6, 12, 24, 60)


def main() -> None:
    if not ROOT.is_dir():
        print(f"SKIP: {ROOT} is absent")
        return
    rng = np.random.default_rng(0)
    print("max/min of the illumination function from n random sites")
    print("channel " + " ".join(f"{n:>6d}" for n in COUNTS))
    for number, name in CHANNELS.items():
        files = sorted(ROOT.glob(f"*/*-ch{number}sk1*.png"))
        rng.shuffle(files)
        ratios = []
        for n in COUNTS:
            average = np.mean([read_image(f).astype(np.float64) for f in files[:n]], axis=0)
            function = illumination_function(average)
            ratios.append(function.max() / function.min())
        print(f"{name:<7s} " + " ".join(f"{r:6.2f}" for r in ratios))


if __name__ == "__main__":
    main()
