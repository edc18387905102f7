"""Tile assembly speed next to the pure decode rate of the same files.

    python bench/bench_tiles.py [--source DIR] [--plate P] [--repeats 3]

Default source: the full-resolution LINCS images in ../shared/data when present (1080² PNG, what a
real plate looks like), else the embedded demo crops.  Both timings run in this process on the same
files after a warm-up read (so the OS file cache is equally warm), alternating, best of N.
Goal (issue 2): tile assembly within 1.5x of pure decoding.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from phenoprofiler_core.config import validate_config  # noqa: E402
from phenoprofiler_core.illumination import plate_illumination  # noqa: E402
from phenoprofiler_core.io import read_image, write_npy  # noqa: E402
from phenoprofiler_core.manifest import build_manifest, channels_of  # noqa: E402
from phenoprofiler_core.tiles import assemble_tiles  # noqa: E402


def demo_manifest(source: Path | None):
    with open(ROOT / "config" / "demo.yaml") as handle:
        raw = yaml.safe_load(handle)
    for key in ("barcode_platemap", "platemap_dir", "treatments"):
        raw["metadata"][key] = str(ROOT / raw["metadata"][key])
    raw["images"]["root"] = str(source / "images" if source else ROOT / raw["images"]["root"])
    return build_manifest(validate_config(raw))


def main() -> None:
    shared = ROOT.parent / "shared" / "data" / "lincs_SQ000152xx_4wells_png8bit"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=shared if shared.is_dir() else None)
    parser.add_argument("--plate", default="SQ00015198")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    manifest = demo_manifest(args.source)
    manifest = manifest[manifest.Metadata_Plate == args.plate].reset_index(drop=True)
    channels = channels_of(manifest)
    paths = [p for c in channels for p in manifest[f"Path_{c}"]]
    shape = read_image(paths[0]).shape
    print(
        f"plate {args.plate}: {len(manifest)} sites x {len(channels)} channels, {shape[1]}x{shape[0]} px "
        f"({'shared full-resolution' if args.source else 'embedded demo crops'})"
    )

    with tempfile.TemporaryDirectory() as tmp:
        illum = Path(tmp) / "illum"
        for channel, function in plate_illumination(manifest, channels, progress=False).items():
            write_npy(function, illum / f"{channel}.npy")
        for p in paths:  # warm the file cache
            read_image(p)
        decode, tiles = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for p in paths:
                read_image(p)
            decode.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            assemble_tiles(
                manifest, channels, Path(tmp) / "tiles.npy", illum_dir=illum, size=448, progress=False
            )
            tiles.append(time.perf_counter() - t0)
    n = len(manifest)
    d, t = min(decode), min(tiles)
    print(f"pure decode      : {n / d:8.1f} sites/s  ({d:.3f} s)")
    print(
        f"tile assembly    : {n / t:8.1f} sites/s  ({t:.3f} s)  [decode + illum + resize 448 + rescale + write]"
    )
    print(f"ratio tiles/decode time: {t / d:.2f}x  (goal <= 1.5x)")


if __name__ == "__main__":
    main()
