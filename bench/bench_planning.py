"""Planning at scale (issue 16.6): how long `snakemake -n` takes for real dataset shapes.

* a 20-plate BBBC022-shaped image folder: 20 plates x 384 wells x 9 sites x 5 channels = 345,600 (empty)
  files in ImageXpress names, with config/bbbc022.yaml (plates listed, fetch off);
* a 1,000-plate listing (JUMP-like count of plates) with the same config, no files.

The plate list comes from images.plates or, when it is empty, from the manifest (a checkpoint): no scan of
the image folder at Snakemake start-up, so planning time should not depend on the number of files.  The
baseline, measured in the same process, is the same command on a 1-plate listing: the ratios say how
planning grows with plates (DAG building) and with files (nothing, if no scan happens).  Goal: <= 30 s for
the 20-plate folder.

    python bench/bench_planning.py [--rounds 3] [--plates 1000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def make_folder(root: Path, plates: list[str]) -> int:
    """Empty files in ImageXpress names for every plate x 384 wells x 9 sites x 5 channels."""
    count = 0
    for plate in plates:
        folder = root / plate
        folder.mkdir(parents=True, exist_ok=True)
        for row in "ABCDEFGHIJKLMNOP":
            for col in range(1, 25):
                for site in range(1, 10):
                    for ch in range(1, 6):
                        name = f"IXMtest_{row}{col:02d}_s{site}_w{ch}{str(uuid.UUID(int=count)).upper()}.png"
                        (folder / name).touch()
                        count += 1
    return count


def plan(overlay: dict, workdir: Path) -> float:
    """Seconds of `snakemake -n` for config/bbbc022.yaml with ``overlay`` on top."""
    path = workdir / f"overlay-{uuid.uuid4().hex}.yaml"
    path.write_text(yaml.safe_dump(overlay))
    start = time.perf_counter()
    result = subprocess.run(
        [str(BIN / "snakemake"), "-n", "--cores", "8", "--configfile", "config/bbbc022.yaml", str(path)],
        cwd=REPO,
        env=dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}"),
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"snakemake -n failed:\n{result.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--plates", type=int, default=1000, help="plates of the large listing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bbbc022 = yaml.safe_load((REPO / "config" / "bbbc022.yaml").read_text())["images"]["plates"]
        start = time.perf_counter()
        files = make_folder(tmp / "images", bbbc022)
        print(f"made {files:,} empty files in {time.perf_counter() - start:.0f} s")
        common = {"results": str(tmp / "results"), "fetch": {"activate": False}}
        cases = {
            "1 plate listed (baseline)": {
                **common,
                "images": {"root": str(tmp / "images"), "plates": bbbc022[:1]},
            },
            f"20-plate folder, {files:,} files": {
                **common,
                "images": {"root": str(tmp / "images"), "plates": bbbc022},
            },
            f"{args.plates:,} plates listed": {
                **common,
                "images": {"root": str(tmp / "none"), "plates": [f"P{i:05d}" for i in range(args.plates)]},
            },
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):  # interleaved, so load changes hit every case alike
            for name, overlay in cases.items():
                times[name].append(plan(overlay, tmp))
    base = statistics.median(times["1 plate listed (baseline)"])
    print(f"\n{'case':<40} {'median s':>9} {'min s':>7} {'vs 1 plate':>10}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<40} {median:9.1f} {min(values):7.1f} {median / base:9.2f}x")
    print(f"\n{args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
