"""Tile assembly time next to the pure decode time of the same files, like for like.

    python bench/bench_tiles.py [--source DIR] [--plate P] [--threads 2] [--rounds 7]

Default source: the full-resolution LINCS images in ../shared/data when present (1080² PNG, what a
real plate looks like), else the embedded demo crops.  Like for like: the decode baseline reads the
same files with the same number of threads the assembly uses (``ThreadPoolExecutor(threads)`` over
``read_image``, the reader the assembly calls), in the same process, after a warm-up read (so the OS
file cache is equally warm for both), interleaved round by round.  Printed: each round's ratio, their
median and the ratio of the best times.  Goal (issue 16.2): tile assembly within 1.5x of decoding.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
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
    """The demo config's manifest, its images taken from ``source``/images when given."""
    with open(ROOT / "config" / "demo.yaml") as handle:
        raw = yaml.safe_load(handle)
    for key in ("barcode_platemap", "platemap_dir", "treatments"):
        raw["metadata"][key] = str(ROOT / raw["metadata"][key])
    raw["images"]["root"] = str(source / "images" if source else ROOT / raw["images"]["root"])
    return build_manifest(validate_config(raw))


def decode_all(paths: list[str], threads: int) -> None:
    """Pure decoding of every file with ``threads`` threads: the baseline."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in pool.map(read_image, paths):
            pass


def main() -> None:
    shared = ROOT.parent / "shared" / "data" / "lincs_SQ000152xx_4wells_png8bit"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=shared if shared.is_dir() else None)
    parser.add_argument("--plate", default="SQ00015198")
    parser.add_argument(
        "--threads", type=int, default=2, help="threads of both the baseline and the assembly"
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtype", default="float16")
    args = parser.parse_args()
    manifest = demo_manifest(args.source)
    manifest = manifest[manifest.Metadata_Plate == args.plate].reset_index(drop=True)
    channels = channels_of(manifest)
    paths = [p for c in channels for p in manifest[f"Path_{c}"]]
    shape = read_image(paths[0]).shape
    print(
        f"plate {args.plate}: {len(manifest)} sites x {len(channels)} channels, {shape[1]}x{shape[0]} px "
        f"({'shared full-resolution' if args.source else 'embedded demo crops'}); "
        f"{args.threads} threads for both; tiles 448² {args.dtype}"
    )

    with tempfile.TemporaryDirectory(dir=ROOT.parent if ROOT.parent.is_dir() else None) as tmp:
        illum = Path(tmp) / "illum"
        for channel, function in plate_illumination(manifest, channels, progress=False).items():
            write_npy(function, illum / f"{channel}.npy")
        decode_all(paths, args.threads)  # warm the file cache and the readers
        decode, tiles = [], []
        for r in range(args.rounds):
            # alternate which runs first, so neither always follows the other's cache state
            order = ("decode", "tiles") if r % 2 == 0 else ("tiles", "decode")
            for what in order:
                t0 = time.perf_counter()
                if what == "decode":
                    decode_all(paths, args.threads)
                    decode.append(time.perf_counter() - t0)
                else:
                    assemble_tiles(
                        manifest,
                        channels,
                        Path(tmp) / "tiles.npy",
                        illum_dir=illum,
                        size=448,
                        dtype=args.dtype,
                        threads=args.threads,
                        progress=False,
                    )
                    tiles.append(time.perf_counter() - t0)
            print(
                f"round {r + 1}: decode {decode[-1]:.3f} s, tiles {tiles[-1]:.3f} s, ratio {tiles[-1] / decode[-1]:.2f}"
            )
    n = len(manifest)
    d, t = min(decode), min(tiles)
    ratios = [b / a for a, b in zip(decode, tiles)]
    print(f"pure decode      : {n / d:8.1f} sites/s  (best {d:.3f} s)")
    print(
        f"tile assembly    : {n / t:8.1f} sites/s  (best {t:.3f} s)  "
        "[decode + illum + resize 448 + histogram + rescale + write]"
    )
    print(
        f"ratio tiles/decode time: median of rounds {statistics.median(ratios):.2f}x, "
        f"best/best {t / d:.2f}x  (goal <= 1.5x)"
    )


if __name__ == "__main__":
    main()
