"""Training loader throughput: sites/s per DataLoader worker, reading memory-mapped site tiles
spread over many plate files (real tile size 5 × 448², float16 as tiles.dtype's default), with the
model replaced by a no-op.  Goal (issue 16.7): >= 250 sites/s per worker, so 8 workers feed a GPU
at >= 2,000 sites/s.

    .venv/bin/python bench/bench_loader.py                          # 24 plates x 16 sites, 1 worker, batch 32
    .venv/bin/python bench/bench_loader.py --workers 2 --dtype uint8

Each round reads one epoch (every site once, shuffled, as training does) through two data paths:

  baseline  the path before this change: one item at a time, converted to float32 in the worker,
            stacked by the default collate, and a new DataLoader (new worker processes) per epoch;
  current   :class:`phenoprofiler_core.train_loader.TrainingBatches`: whole batches in the storage
            type, one copy from the memory map into shared memory, persistent workers; the float
            conversion runs after the copy to the device (:func:`batch_to_device`), on the GPU; on a
            CPU-only machine it is left out by default (``--convert yes`` times it in the
            consuming process, where it is compute, not loading).

Both end with float32 tiles on the device.  Rounds interleave the two (alternating which goes
first) after one warm-up round each; the figures are medians over rounds, and the ratio is the
median of the per-round ratios.  Besides wall-clock sites/s it prints sites per CPU-second of the
worker processes (user + system time, from /proc and getrusage): what one worker delivers with a
core to itself, which on a shared, busy machine says more than the wall clock.  The tiles are written just before, so they are read from the page
cache: this measures the CPU cost of the data path, not the disk.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from phenoprofiler_core.distributed import DistContext
from phenoprofiler_core.train import TrainConfig, image_to_float, load_training_data, read_targets
from phenoprofiler_core.train_loader import TrainingBatches, batch_to_device, epoch_order, global_batches

KEYS = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]


def write_plates(root: Path, *, plates: int, sites: int, size: int, dtype: str) -> list[str]:
    """tiles/<plate>.npy (+ .sites.parquet) and targets/<plate>.parquet, as the workflow writes them."""
    rng = np.random.default_rng(0)
    pattern = rng.random((5, size, size), dtype=np.float32)
    names = []
    for p in range(plates):
        name = f"PLATE{p:03d}"
        tiles = np.lib.format.open_memmap(
            root / "tiles" / f"{name}.npy", mode="w+", dtype=dtype, shape=(sites, 5, size, size)
        )
        for s in range(sites):
            tile = np.roll(pattern, s + 7 * p, axis=-1)
            tiles[s] = tile * 255 if dtype == "uint8" else tile * 65535 if dtype == "uint16" else tile
        tiles.flush()
        del tiles
        table = pd.DataFrame(
            {
                "Metadata_Plate": name,
                "Metadata_Well": [f"A{s // 4 + 1:02d}" for s in range(sites)],
                "Metadata_Site": [s % 4 + 1 for s in range(sites)],
                "Metadata_Treatment": [f"trt{s % 8}" for s in range(sites)],
            }
        )
        table.to_parquet(root / "tiles" / f"{name}.sites.parquet")
        targets = table[KEYS].assign(**{f"f{i}": rng.normal(size=sites) for i in range(16)})
        targets.to_parquet(root / "targets" / f"{name}.parquet")
        names.append(name)
    return names


class LegacyItemDataset(Dataset):
    """The baseline: the training dataset before this change (one item per call, float32 in the worker)."""

    def __init__(self, data, indices: np.ndarray) -> None:
        self.data, self.indices = data, np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        k, d = int(self.indices[i]), self.data
        image = image_to_float(np.asarray(d.images[d.plate_of[k]][d.row_of[k]]))
        return torch.from_numpy(image), torch.from_numpy(d.targets[k]), torch.tensor(d.labels[k])


def legacy_epoch(data, batches: list[list[int]], workers: int, device: torch.device) -> int:
    """One epoch the way training read it before: a new DataLoader (and workers) per epoch."""
    loader = DataLoader(
        LegacyItemDataset(data, np.arange(len(data.labels))),
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    sites = 0
    for images, targets, labels in loader:
        images = images.to(device, non_blocking=True)  # as training moved them; then the no-op model
        targets, labels = targets.to(device), labels.to(device)
        sites += images.shape[0]
    return sites


def current_epoch(
    reader: TrainingBatches, batches: list[list[int]], device: torch.device, convert: bool
) -> int:
    items, _ = reader.start_pass(batches)
    sites = 0
    for batch in items:
        if convert:  # what training does next: the copy to the device, then float there
            images, _, _ = batch_to_device(batch, device)
        else:  # the copy only (on a CPU "device" the conversion is compute, not loading)
            images = batch[0].to(device, non_blocking=True)
        sites += images.shape[0]  # the no-op model
    return sites


def live_workers_cpu() -> float:
    """CPU seconds (user + system) used so far by this process's live child processes."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for child in multiprocessing.active_children():
        fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / ticks


def ended_children_cpu() -> float:
    """CPU seconds used by child processes that have ended (and were waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def readers_cpu(in_process: bool) -> float:
    """CPU seconds used so far by whoever reads the batches: the worker processes, or (0 workers)
    this process."""
    return time.process_time() if in_process else live_workers_cpu() + ended_children_cpu()


def timed(fn, *args, in_process: bool) -> tuple[float, float]:
    """(sites per wall-clock second, sites per CPU-second of the readers).  The second is what one
    worker delivers with a core to itself, whatever else runs on the machine."""
    cpu_before = readers_cpu(in_process)
    start = time.perf_counter()
    sites = fn(*args)
    wall = time.perf_counter() - start
    cpu = readers_cpu(in_process) - cpu_before
    return sites / wall, sites / cpu if cpu > 0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plates", type=int, default=24)
    parser.add_argument("--sites", type=int, default=16, help="sites per plate file")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32", "uint8", "uint16"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the consuming process")
    parser.add_argument(
        "--convert",
        choices=["auto", "yes", "no"],
        default="auto",
        help="current path: also convert to float32 on the device (auto: on CUDA only, where the "
        "GPU does it; on CPU it would time the consuming process's arithmetic, not the loader)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    convert = args.convert == "yes" or (args.convert == "auto" and device.type == "cuda")

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        root = Path(tmp)
        (root / "tiles").mkdir()
        (root / "targets").mkdir()
        plates = write_plates(root, plates=args.plates, sites=args.sites, size=args.size, dtype=args.dtype)
        cfg = TrainConfig.from_dict({"level": "site", "val_fraction": 0})
        targets = read_targets(plates, targets_dir=str(root / "targets"))
        data = load_training_data(root / "tiles", plates, targets, cfg, seed=0)
        n = len(data.labels)
        reader = TrainingBatches(data, workers=args.workers, device=device, ctx=DistContext())
        alone = args.workers == 0  # the training process reads the batches itself
        rates: dict[str, list[float]] = {"baseline": [], "current": []}
        per_cpu: dict[str, list[float]] = {"baseline": [], "current": []}
        for r in range(args.rounds + 1):  # round 0 warms up (starts the persistent workers)
            batches = global_batches(n, args.batch, True, epoch_order(n, 0, 1, r))
            runs = {
                "baseline": lambda b=batches: timed(
                    legacy_epoch, data, b, args.workers, device, in_process=alone
                ),
                "current": lambda b=batches: timed(
                    current_epoch, reader, b, device, convert, in_process=alone
                ),
            }
            for name in ("baseline", "current") if r % 2 else ("current", "baseline"):
                rate, rate_per_cpu = runs[name]()
                if r > 0:
                    rates[name].append(rate)
                    per_cpu[name].append(rate_per_cpu)
        reader.close()

    workers = max(args.workers, 1)  # 0 workers: the training process reads
    gb = n * data.images[plates[0]][0].nbytes / 1e9
    print(
        f"{n} sites in {args.plates} plate files ({gb:.2f} GB of {args.dtype} tiles 5x{args.size}x{args.size}), "
        f"batch {args.batch}, {args.workers} worker(s), device {device}, {args.rounds} interleaved rounds; "
        f"current path {'with' if convert else 'without'} the float conversion on the device"
    )
    for name, values in rates.items():
        median = statistics.median(values)
        print(
            f"{name:8s}: {median:7.1f} sites/s wall ({median / workers:7.1f} per worker), "
            f"{statistics.median(per_cpu[name]):7.1f} sites per worker CPU-second; "
            f"rounds (wall): {', '.join(f'{v:.0f}' for v in values)}"
        )
    for label, table in (("wall", rates), ("per worker CPU-second", per_cpu)):
        ratios = [c / b for c, b in zip(table["current"], table["baseline"])]
        print(
            f"current / baseline ({label}): {statistics.median(ratios):.2f}x median "
            f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})"
        )


if __name__ == "__main__":
    main()
