"""Batches for the training loop: the global batch order of each epoch, this rank's slice of every
global batch, and one DataLoader that reads them from the memory-mapped tiles for the whole run.

The data path is sized to feed a GPU (``bench/bench_loader.py`` measures it):

* a worker reads a **whole batch** at once and copies each tile once, from the memory map straight
  into the batch tensor (in shared memory when it runs in a worker process: no further copy to
  hand it to the training process);
* tiles travel in their **storage type** (float16 by default, uint8/uint16 when so stored) and
  become float on the device (:func:`batch_to_device`), so workers, shared memory, pinned memory
  and the host-to-device copy carry half (or a quarter) of float32's bytes;
* workers **persist** across epochs (and serve the validation passes too) instead of being started
  again for every pass;
* their number never exceeds the job's cores minus what compute needs (:func:`loader_workers`).

Which items form a batch never depends on the workers, and the loader draws nothing from the global
random streams, so the weights are the same for any worker count.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from .distributed import DistContext, shard, shard_sizes
from .errors import DataError
from .train_data import TrainingData

# Integer storage types are scaled from their full range to [0, 1] (as image_to_float does).
INTEGER_SCALE = {torch.uint8: 255.0, torch.uint16: 65535.0}
STORAGE_TYPES = ("float16", "float32", "uint8", "uint16")


def epoch_order(n: int, seed: int, stage: int, epoch: int) -> np.ndarray:
    """The shuffle order of an epoch; it depends only on (seed, stage, epoch), so a resumed run
    replays it exactly."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + stage * 10_007 + epoch)
    return torch.randperm(n, generator=generator).numpy()


def global_batches(
    n: int, batch_size: int, drop_last: bool, order: np.ndarray | None = None
) -> list[list[int]]:
    """Positions of each global batch, in order (the DataLoader's batching of ``order``)."""
    order = np.arange(n) if order is None else np.asarray(order)
    stop = n - n % batch_size if drop_last else n
    return [order[i : i + batch_size].tolist() for i in range(0, stop, batch_size)]


def loader_workers(requested: int, *, cores: int, device: torch.device) -> int:
    """DataLoader workers for a process that may use ``cores`` CPU cores: ``requested``
    (train.num_workers), but never more than the cores compute leaves free.  Compute needs one
    core per GPU process (the Python thread that drives it) and, on CPU, all of torch's threads,
    which ``--threads`` sets to the job's cores: there the batches are read in the training
    process, between steps (reading a batch takes milliseconds, a CPU step seconds)."""
    return max(0, min(requested, cores - compute_cores(device)))


def compute_cores(device: torch.device) -> int:
    """Cores the training computation keeps busy: the thread driving a GPU, or torch's CPU threads."""
    return 1 if device.type == "cuda" else torch.get_num_threads()


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask: what a scheduler granted)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- reading batches


class BatchReader(Dataset):
    """Map-style dataset whose index is a whole batch (a list of item numbers): returns the batch's
    tiles in their storage type, standardized targets (float32) and class labels (int64)."""

    def __init__(self, data: TrainingData) -> None:
        self.images = data.images
        self.plate_of = data.plate_of
        self.row_of = data.row_of
        self.targets = data.targets
        self.labels = data.labels
        dtypes = {plate: str(array.dtype) for plate, array in self.images.items()}
        unsupported = {p: d for p, d in dtypes.items() if d not in STORAGE_TYPES}
        if unsupported:
            raise DataError(
                f"image arrays of unsupported dtype {unsupported}; expected one of {STORAGE_TYPES}"
            )
        if len(set(dtypes.values())) > 1:
            # batches are stacked in the storage type: one type for all plates (tiles.dtype)
            raise DataError(
                f"image arrays differ in dtype between plates: {dtypes}; write them with one tiles.dtype"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, items: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        items = np.asarray(items, dtype=np.int64)
        with warnings.catch_warnings():
            # The tiles are read-only memory maps; the views below are only read (stacked), never written.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tiles = [torch.from_numpy(self.images[self.plate_of[k]][self.row_of[k]]) for k in items]
        # default_collate stacks into shared memory inside a worker: the one copy of each tile.
        images = default_collate(tiles)
        return images, torch.from_numpy(self.targets[items]), torch.from_numpy(self.labels[items])


class PassPlan(Sampler):
    """The batches (lists of item numbers) of the next pass; set before the pass starts, because
    the DataLoader reads it when an iteration begins."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(list(self.batches))

    def __len__(self) -> int:
        return len(self.batches)


class TrainingBatches:
    """One DataLoader for every pass of a run (training and validation epochs of both stages)."""

    def __init__(self, data: TrainingData, *, workers: int, device: torch.device, ctx: DistContext) -> None:
        self.ctx = ctx
        self.plan = PassPlan()
        self.loader: DataLoader | None = DataLoader(
            BatchReader(data),
            sampler=self.plan,
            batch_size=None,  # the reader returns whole batches
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=device.type == "cuda",
            # Worker seeds come from a generator of the loader's own, never the global stream.
            generator=torch.Generator().manual_seed(0),
        )

    def start_pass(self, batches: list[list[int]]) -> tuple[Iterator, list[list[int]]]:
        """Iterate over this rank's slices of the global ``batches``; also returns the items per
        rank of each global batch (a rank may have none of a short last batch)."""
        if self.loader is None:
            raise RuntimeError("TrainingBatches used after close()")
        counts = [shard_sizes(len(b), self.ctx.world_size) for b in batches]
        local = [shard(b, self.ctx.rank, self.ctx.world_size) for b in batches]
        self.plan.batches = [b for b in local if b]
        # A fresh DataLoader iterator used to draw its base seed from the global torch stream at
        # every pass (persistent workers draw it once, none at all from the loader's own generator).
        # The draw is kept, so dropout masks equal those of earlier versions for any worker count.
        torch.empty((), dtype=torch.int64).random_()
        return iter(self.loader), counts

    def close(self) -> None:
        """Stop the workers now (dropping the last reference to the loader ends them)."""
        self.loader = None


def batch_to_device(batch, device: torch.device):
    """(images, targets, labels) on the device; images become the default float type (float32) in
    [0, 1] there, equal to :func:`.train_data.image_to_float` of the stored values."""
    images, targets, labels = batch
    images = images.to(device, non_blocking=True)
    scale = INTEGER_SCALE.get(images.dtype)
    images = images.to(torch.get_default_dtype())
    if scale is not None:
        # Divide by a tensor on the device, not a Python number: CUDA multiplies by the
        # reciprocal of a CPU scalar instead, which can be one ulp off numpy's division.
        images = images / torch.tensor(scale, dtype=images.dtype, device=device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=True), labels.to(device, non_blocking=True)
