"""Multi-process (DDP) training within one node: process group, batch sharding, synchronised
BatchNorm and autograd-aware gathering, arranged so that N processes compute what one process
computes on the same global batch.

Launch: ``torchrun --standalone --nproc_per_node N -m phenoprofiler_core.cli train ...`` (the
workflow does this when ``train.distributed.processes`` > 1).  torchrun sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; without them training runs in one process as before.

How the N-process step equals the 1-process step on the global batch of ``train.batch_size`` items:

* **Sharding** — the global batch order is computed identically on every rank; rank r takes the
  r-th contiguous slice of each global batch (``batch_size / N`` items), so concatenating the
  ranks' slices in rank order gives the global batch back.
* **BatchNorm** — every BatchNorm layer is switched (in place, same parameters and state-dict keys)
  to :class:`SyncBatchNormMixin`: in training mode the mean and variance are reduced over all
  ranks (two passes, like single-process BN), with autograd-aware all-reduces, and the running
  statistics are updated with the global count.  Works on CPU (gloo) and CUDA (nccl), unlike
  ``torch.nn.SyncBatchNorm`` which is GPU-only.  Eval mode uses the running statistics (no
  communication).
* **Losses** — each rank gathers the predictions/logits (autograd-aware ``all_gather``) and the
  targets/labels of the whole global batch and computes the global losses (contrastive over the
  global similarity matrix, MSE and CE as global means).  Every rank's backward then yields N × its
  share of the global gradient (the gather's backward sums over ranks), and DDP's gradient
  averaging divides by N: the result is the global-batch gradient.
* **Dropout** draws different random numbers than one process would (rank 0 keeps the 1-process
  stream, rank r > 0 a stream of its own): equal in distribution, not bit-equal.  Set
  ``model.dropout: 0`` for bit-level comparisons.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

log = logging.getLogger(__name__)

DISTRIBUTED_DEFAULTS: dict[str, Any] = {"processes": 1, "backend": "auto", "sync_batchnorm": True}
BACKENDS = ("auto", "nccl", "gloo")


def distributed_options(options: Any) -> dict[str, Any]:
    """``train.distributed`` with defaults filled and checked."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ConfigError(f"train.distributed must be a mapping, got {options!r}")
    unknown = sorted(set(options) - set(DISTRIBUTED_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"unknown key(s) in config section 'train.distributed': {unknown}; "
            f"known: {sorted(DISTRIBUTED_DEFAULTS)}"
        )
    out = {**DISTRIBUTED_DEFAULTS, **options}
    if not isinstance(out["processes"], int) or isinstance(out["processes"], bool) or out["processes"] < 1:
        raise ConfigError(f"train.distributed.processes must be an integer >= 1, got {out['processes']!r}")
    if out["backend"] not in BACKENDS:
        raise ConfigError(
            f"train.distributed.backend must be one of {list(BACKENDS)}, got {out['backend']!r}"
        )
    if not isinstance(out["sync_batchnorm"], bool):
        raise ConfigError(
            f"train.distributed.sync_batchnorm must be true or false, got {out['sync_batchnorm']!r}"
        )
    return out


def check_batch_size(batch_size: int, world_size: int, *, source: str = "train.distributed.processes") -> int:
    """Per-process batch size; the global batch must split evenly over the processes."""
    if batch_size % world_size:
        raise ConfigError(
            f"train.batch_size ({batch_size}) must be divisible by the number of training processes "
            f"({world_size}, {source}): it is the global batch, split evenly over the processes"
        )
    return batch_size // world_size


# ----------------------------------------------------------------------------- process group


@dataclass
class DistContext:
    """Where this process stands: rank, world size, and whether it created the process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    owns_group: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.owns_group = False


def launched_world() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) from torchrun's environment (1 process if unset)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)) or 0)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)) or world)
    return rank, world, local_rank, local_world


def init_distributed(options: dict[str, Any], device: torch.device) -> tuple[DistContext, torch.device]:
    """Join (or create) the process group when launched by torchrun; return the context and this
    rank's device (``cuda:<LOCAL_RANK>`` on GPUs)."""
    _rank, world, local_rank, local_world = launched_world()
    if world <= 1:
        if options["processes"] > 1:
            log.warning(
                "train.distributed.processes is %d but this process was not launched by torchrun "
                "(no WORLD_SIZE): training in one process on the same global batches",
                options["processes"],
            )
        return DistContext(), device
    if world != options["processes"]:
        log.warning(
            "launched with %d processes but train.distributed.processes is %d; using %d",
            world,
            options["processes"],
            world,
        )
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"train.distributed.processes: local rank {local_rank} has no GPU "
                f"(only {torch.cuda.device_count()} visible)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = options["backend"]
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("train.distributed.backend: nccl needs CUDA devices; use gloo (or auto) on CPU")
    owns = False
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)
        owns = True
    if torch.distributed.get_world_size() != world:
        raise RuntimeError(
            f"process group has {torch.distributed.get_world_size()} ranks, WORLD_SIZE says {world}"
        )
    ctx = DistContext(
        rank=torch.distributed.get_rank(),
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        owns_group=owns,
    )
    log.info("distributed training: rank %d of %d (%s, backend %s)", ctx.rank, world, device, backend)
    return ctx, device


# ----------------------------------------------------------------------------- sharding


def shard_sizes(n: int, world_size: int) -> list[int]:
    """Items of an n-item global batch taken by each rank (contiguous slices, as even as possible)."""
    return [n // world_size + (1 if r < n % world_size else 0) for r in range(world_size)]


def shard(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous slice of a global batch (rank order = global order)."""
    sizes = shard_sizes(len(batch), world_size)
    start = sum(sizes[:rank])
    return list(batch[start : start + sizes[rank]])


def gather_rows(x: torch.Tensor, counts: Sequence[int], *, grad: bool) -> torch.Tensor:
    """Concatenate every rank's rows (rank order); ``counts`` = rows per rank (may differ).

    ``grad=True`` uses the autograd-aware all_gather: the backward pass sums each rank's gradient
    for this rank's rows (so every rank computing the same global loss gives N × the gradient, which
    DDP's averaging turns back into the global gradient).
    """
    if len(counts) == 1:
        return x
    if x.is_floating_point():  # ranks must agree on the dtype: autocast outputs (bf16/fp16) go as float32
        x = x.to(torch.promote_types(x.dtype, torch.float32))
    longest = max(counts)
    if x.shape[0] < longest:
        x = torch.cat([x, x.new_zeros((longest - x.shape[0],) + tuple(x.shape[1:]))])
    if grad:
        parts = _AllGather.apply(x)
    else:
        parts = [torch.empty_like(x) for _ in counts]
        torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, counts)])


class _AllGather(torch.autograd.Function):
    """all_gather whose backward hands each rank the sum over ranks of the gradients of its rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, x.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        stacked = torch.stack([g.contiguous() for g in grads])
        torch.distributed.all_reduce(stacked)
        return stacked[torch.distributed.get_rank()]


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; backward: the sum over ranks of the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        out = x.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(out)
        return out


# ----------------------------------------------------------------------------- synchronised BatchNorm


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(x)  # autograd-aware (backward: all-reduce of the gradient)


class SyncBatchNormMixin:
    """Placed in front of a BatchNorm class: training-mode statistics over all ranks.

    Two passes (global mean, then global mean squared deviation) in float32 (or float64), as a single process
    would compute them over the global batch; the running statistics use the global count with
    the unbiased variance, exactly as ``nn.BatchNorm``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if not (
            self.training and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        ):
            return super().forward(x)  # type: ignore[misc]
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        dtype = torch.promote_types(x.dtype, torch.float32)  # statistics in float32 at least
        xf = x.to(dtype)
        local_count = torch.tensor([float(x.numel() // x.shape[1])], dtype=dtype, device=x.device)
        sums = _all_reduce_sum(torch.cat([xf.sum(dims), local_count]))
        count = sums[-1].detach()
        if float(count) < 2:
            raise ValueError(
                f"synchronised BatchNorm needs more than 1 value per channel over all ranks, got {count}"
            )
        mean = sums[:-1] / count
        centred = xf - mean.view(shape)
        var = _all_reduce_sum((centred * centred).sum(dims)) / count
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            y = y * self.weight.to(dtype).view(shape) + self.bias.to(dtype).view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(
                    mean.detach().to(self.running_mean.dtype), alpha=factor
                )
                unbiased = var.detach() * (count / (count - 1))
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        y = y.to(x.dtype)
        if _is_norm_act(self):  # timm BatchNormAct2d: BN then dropout then activation
            y = self.act(self.drop(y))
        return y


def _is_norm_act(module: nn.Module) -> bool:
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, BatchNormAct2d)


_SYNC_CLASSES: dict[type, type] = {}


def convert_sync_batchnorm(model: nn.Module) -> int:
    """Switch every BatchNorm layer of ``model`` to synchronised statistics, in place (parameters,
    buffers and state-dict keys unchanged).  Returns the number of layers switched."""
    from torch.nn.modules.batchnorm import _BatchNorm

    converted = 0
    for name, module in model.named_modules():
        cls = type(module)
        if not isinstance(module, _BatchNorm) or isinstance(module, SyncBatchNormMixin):
            continue
        overrides_forward = cls.forward not in (
            nn.BatchNorm1d.forward,
            nn.BatchNorm2d.forward,
            nn.BatchNorm3d.forward,
        )
        if (overrides_forward and not _is_norm_act(module)) or isinstance(module, nn.SyncBatchNorm):
            log.warning("BatchNorm layer %s (%s) is left unsynchronised: unknown forward", name, cls.__name__)
            continue
        if cls not in _SYNC_CLASSES:
            _SYNC_CLASSES[cls] = type(f"Sync{cls.__name__}", (SyncBatchNormMixin, cls), {})
        module.__class__ = _SYNC_CLASSES[cls]
        converted += 1
    return converted


def all_gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (rank order); ``[obj]`` in one process."""
    if not ctx.active:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


__all__ = [
    "DISTRIBUTED_DEFAULTS",
    "DistContext",
    "SyncBatchNormMixin",
    "all_gather_objects",
    "check_batch_size",
    "convert_sync_batchnorm",
    "distributed_options",
    "gather_rows",
    "init_distributed",
    "launched_world",
    "shard",
    "shard_sizes",
]
