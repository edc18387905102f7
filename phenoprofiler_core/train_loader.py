"""Batches for the training loop: the global batch order of each epoch, this rank's slice of every
global batch, and the DataLoader that reads them from the memory-mapped tiles."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .distributed import DistContext, shard, shard_sizes
from .train_data import TrainingData, image_to_float


class ItemDataset(Dataset):
    def __init__(self, data: TrainingData, indices: np.ndarray) -> None:
        self.data = data
        self.indices = np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        k = int(self.indices[i])
        d = self.data
        image = image_to_float(np.asarray(d.images[d.plate_of[k]][d.row_of[k]]))
        return torch.from_numpy(image), torch.from_numpy(d.targets[k]), torch.tensor(d.labels[k])


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


def rank_loader(dataset: Dataset, batches: list[list[int]], ctx: DistContext, loader_kw: Mapping[str, Any]):
    """This rank's DataLoader over its slice of every global batch + the per-rank item counts."""
    counts = [shard_sizes(len(b), ctx.world_size) for b in batches]
    local = [shard(b, ctx.rank, ctx.world_size) for b in batches]
    loader = DataLoader(dataset, batch_sampler=[b for b in local if b], **loader_kw)
    return loader, counts
