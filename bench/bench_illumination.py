"""Illumination function (median at 0.2x scale) next to a full-resolution median filter.

    python bench/bench_illumination.py [--size 1080]

The full-resolution equivalent of CellProfiler's size-20 median at 0.2x is a size-100 median on the
full image; it is timed on ONE image of the given size, ours on the same image.  Real LINCS pixels are
used when ../shared/data is present, else an embedded demo crop tiled up to the size.
Goal (issue 2): ours >= 100x faster.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phenoprofiler_core.illumination import illumination_function, robust_rescale  # noqa: E402
from phenoprofiler_core.io import read_image  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1080)
    args = parser.parse_args()
    shared = (
        ROOT.parent
        / "shared/data/lincs_SQ000152xx_4wells_png8bit/images/SQ00015198/r01c01f01p01-ch1sk1fk1fl1.png"
    )
    if shared.is_file():
        image = read_image(shared).astype(np.float64)
    else:
        crop = read_image(next((ROOT / "resources/demo/images/SQ00015198").glob("*ch1*.png"))).astype(
            np.float64
        )
        image = np.tile(crop, (3, 3))
    image = image[: args.size, : args.size]
    print(
        f"image {image.shape[1]}x{image.shape[0]} ({'real LINCS 1080²' if shared.is_file() else 'demo crop tiled'})"
    )

    t0 = time.perf_counter()
    ours = illumination_function(image, downsample=0.2, median_size=20)
    t_ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    full = robust_rescale(ndimage.median_filter(image, size=100, mode="nearest"))
    t_full = time.perf_counter() - t0
    r = np.corrcoef(ours.ravel(), full.ravel())[0, 1]
    print(f"ours (median 20 at 0.2x): {t_ours:8.3f} s")
    print(f"full-resolution median 100: {t_full:8.3f} s")
    print(f"speed-up: {t_full / t_ours:.0f}x  (goal >= 100x); correlation of the two functions: {r:.4f}")


if __name__ == "__main__":
    main()
