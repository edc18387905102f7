"""One prepared check for a GPU machine: embedding and training speed at the paper's sizes.

    .venv/bin/python bench/gpu_check.py                 # on a GPU node (exits 0 with a message without CUDA)
    .venv/bin/python bench/gpu_check.py --smoke         # tiny sizes on CPU: checks the script itself
    .venv/bin/python bench/gpu_check.py --sites 3072 --embed-batch 128 --workers 12

What it runs, all through the product's own code on a synthetic plate written once as a
memory-mapped ``tiles/P1.npy`` (float16, 5 × 448², as ``phenoprofiler tiles`` writes it):
  * embed: :func:`phenoprofiler_core.embed.embed_images` (what ``phenoprofiler embed`` runs) on
    the memory-mapped tiles, fp32 and bf16, eager and compiled; sites/s from the job's own timing,
    compile time, and the break-even site count for ``embed.compile_min_sites.cuda``;
  * a training step with AMP (``train.precision: auto``) at the paper's batch of 200: the stage-2
    losses through training's own loader and epoch loop (``TrainingBatches``,
    ``run_epoch``) on the paper's model (ResNet50, 448²);
  * DDP on all visible GPUs (when there are more than one): the same loop launched by torchrun,
    global batch 200 split over the processes (nccl), as ``train.distributed.processes`` runs it.
Prints one table.  ``--smoke`` runs every part on the CPU at tiny sizes (a small timm model, 32²
tiles, DDP with 2 gloo processes, no compiling) so the script can be tested without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from phenoprofiler_core import io
from phenoprofiler_core.distributed import (
    DistContext,
    convert_sync_batchnorm,
    distributed_options,
    init_distributed,
)
from phenoprofiler_core.embed import EmbedConfig, embed_images
from phenoprofiler_core.model import LossWeights, create_model, paper_model_config
from phenoprofiler_core.train import (
    TrainConfig,
    load_training_data,
    pick_precision,
    read_targets,
    seed_everything,
)
from phenoprofiler_core.train_loader import TrainingBatches, epoch_order, global_batches
from phenoprofiler_core.train_loop import EpochSetup, Outputs, run_epoch

PLATE = "P1"
TARGET_DIM = 672
DDP_MARKER = "GPU_CHECK_DDP "

FULL = {
    "backbone": "resnet50",
    "ffn": 4096,
    "size": 448,
    "sites": 1600,
    "embed_batch": 64,
    "train_batch": 200,
    "steps": 5,
    "workers": 8,
}
SMOKE = {
    "backbone": "test_resnet",
    "ffn": 64,
    "size": 32,
    "sites": 24,
    "embed_batch": 8,
    "train_batch": 8,
    "steps": 2,
    "workers": 0,
}


# ----------------------------------------------------------------------------- the synthetic plate


def write_plate(root: Path, *, sites: int, size: int, channels: int = 5, treatments: int = 8) -> None:
    """tiles/P1.npy (+ .sites.parquet) streamed to disk like ``phenoprofiler tiles`` writes them,
    and targets/P1.parquet with a 672-d regression target per site."""
    rng = np.random.default_rng(0)
    with io.NpyStreamWriter(
        root / "tiles" / f"{PLATE}.npy", (sites, channels, size, size), np.float16
    ) as out:
        for start in range(0, sites, 64):
            n = min(64, sites - start)
            out.write(rng.random((n, channels, size, size), dtype=np.float32).astype(np.float16))
    index = pd.DataFrame(
        {
            "Metadata_Plate": PLATE,
            "Metadata_Well": [f"W{i // 4:04d}" for i in range(sites)],
            "Metadata_Site": [i % 4 + 1 for i in range(sites)],
            "Metadata_TreatmentId": [f"trt{(i // 4) % treatments}" for i in range(sites)],
            "Metadata_pert_type": "trt",
        }
    )
    io.write_parquet(index, root / "tiles" / f"{PLATE}.sites.parquet")
    targets = pd.DataFrame(rng.normal(size=(sites, TARGET_DIM)).astype(np.float32))
    targets.columns = [f"target_{i:03d}" for i in range(TARGET_DIM)]
    io.write_parquet(
        pd.concat([index[["Metadata_Plate", "Metadata_Well", "Metadata_Site"]], targets], axis=1),
        root / "targets" / f"{PLATE}.parquet",
    )


def model_config(args):
    cfg = paper_model_config()  # ResNet50, one transformer block, 672-d profiles
    cfg.backbone, cfg.transformer_ffn, cfg.input_size = args.backbone, args.ffn, args.size
    return cfg


# ----------------------------------------------------------------------------- embed


def check_embed(args, root: Path, device: torch.device) -> list[tuple[str, str, str]]:
    tiles = np.load(root / "tiles" / f"{PLATE}.npy", mmap_mode="r")
    seed_everything(0)
    model = create_model(model_config(args), in_channels=tiles.shape[1]).eval()
    setting = f"{args.backbone}, {args.size}², batch {args.embed_batch}, {len(tiles)} mmap tiles"
    base = dict(batch_size=args.embed_batch, num_workers=args.workers, device=device.type)
    # warm-up: CUDA context, cuDNN heuristics, page cache
    embed_images(model, tiles[: args.embed_batch * 2], EmbedConfig(**base, compile="false"))
    rows, per_site = [], {}
    compiles = ("false",) if args.no_compile else ("false", "true")
    for compile in compiles:
        for precision in ("fp32", "bf16"):
            _, stats = embed_images(model, tiles, EmbedConfig(**base, precision=precision, compile=compile))
            label = f"embed {precision} {'compiled' if compile == 'true' else 'eager'}"
            result = f"{stats.images / stats.embed_s:9.1f} sites/s"
            if compile == "true":
                result += f", compile {stats.compile_s:.1f} s" + (
                    f" (FAILED: {stats.compile_fallback})" if stats.compile_fallback else ""
                )
                if not stats.compile:
                    label += " (fell back to eager)"
            per_site[(precision, compile)] = (stats.embed_s / stats.images, stats.compile_s, stats.compile)
            rows.append((label, setting, result))
    for precision in ("fp32", "bf16"):
        if (precision, "true") not in per_site:
            continue
        eager_s, _, _ = per_site[(precision, "false")]
        compiled_s, compile_s, ok = per_site[(precision, "true")]
        saving = eager_s - compiled_s
        if not ok:
            verdict = "compiling failed: keep auto off"
        elif saving <= 0:
            verdict = f"compiled is not faster ({compiled_s * 1e3:.2f} vs {eager_s * 1e3:.2f} ms/site): never compile"
        else:
            verdict = f"pays from {compile_s / saving:,.0f} sites → embed.compile_min_sites.{device.type}"
        rows.append((f"compile break-even {precision}", "compile s / (eager − compiled) s per site", verdict))
    return rows


# ----------------------------------------------------------------------------- training


def _training_data(args, root: Path):
    cfg = TrainConfig.from_dict({"level": "site", "val_fraction": 0, "batch_size": args.train_batch})
    targets = read_targets([PLATE], targets_dir=str(root / "targets"))
    return load_training_data(root / "tiles", [PLATE], targets, cfg, seed=0)


def _model_and_optimizer(args, data, device: torch.device):
    seed_everything(0)
    model = create_model(
        model_config(args), in_channels=data.in_channels, num_classes=len(data.classes), target_dim=TARGET_DIM
    ).to(device)
    if device.type == "cuda":  # as train does
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-3)
    return model, optimizer


def timed_steps(args, data, net, optimizer, amp_dtype, device, ctx: DistContext) -> float:
    """Seconds per training step: one warm-up step, then ``args.steps`` timed steps (data loading
    included, as in training)."""
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    n = len(data.labels)
    batches = global_batches(n, args.train_batch, True, epoch_order(n, seed=0, stage=2, epoch=0))
    if len(batches) < args.steps + 1:
        raise SystemExit(
            f"gpu_check: {len(data.labels)} sites give {len(batches)} batches; need {args.steps + 1}"
        )
    loader = TrainingBatches(data, workers=args.workers, device=device, ctx=ctx)
    setup = EpochSetup(net=net, weights=LossWeights(), device=device, amp_dtype=amp_dtype, ctx=ctx)

    def run(chosen: list[list[int]]) -> float:
        batch_iter, counts = loader.start_pass(chosen)
        ctx.barrier()
        start = time.perf_counter()
        run_epoch(setup, batch_iter, counts, optimizer, scaler)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ctx.barrier()
        return time.perf_counter() - start

    try:
        run(batches[:1])
        return run(batches[1 : args.steps + 1]) / args.steps
    finally:
        loader.close()


def check_train(args, root: Path, device: torch.device) -> tuple[list[tuple[str, str, str]], float]:
    data = _training_data(args, root)
    model, optimizer = _model_and_optimizer(args, data, device)
    amp_dtype = pick_precision("auto", device)
    step_s = timed_steps(args, data, model, optimizer, amp_dtype, device, DistContext())
    setting = f"{args.backbone}, {args.size}², batch {args.train_batch}, stage-2 losses, AdamW"
    precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[amp_dtype]
    result = f"{step_s:.3f} s/step, {args.train_batch / step_s:.1f} images/s ({precision})"
    if device.type == "cuda":
        result += f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    return [("train step (AMP)", setting, result)], step_s


def ddp_worker(args) -> None:
    """One torchrun process: the training loop under DDP, as ``phenoprofiler train`` runs it."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    world = int(os.environ["WORLD_SIZE"])
    ctx, device = init_distributed(distributed_options({"processes": world}), device)
    try:
        root = Path(args.workdir)
        data = _training_data(args, root)
        model, optimizer = _model_and_optimizer(args, data, device)
        convert_sync_batchnorm(model)
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(
            Outputs(model), device_ids=[device.index] if device.type == "cuda" else None
        )
        step_s = timed_steps(args, data, net, optimizer, pick_precision("auto", device), device, ctx)
        if ctx.is_main:
            backend = torch.distributed.get_backend()
            print(DDP_MARKER + json.dumps({"step_s": step_s, "world": world, "backend": backend}), flush=True)
    finally:
        ctx.close()


def check_ddp(args, root: Path, processes: int, single_step_s: float) -> list[tuple[str, str, str]]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command += [str(Path(__file__).resolve()), "--ddp-worker", "--workdir", str(root)]
    command += _size_args(args) + (["--smoke"] if args.smoke else [])
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1" if args.smoke else "4"))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in result.stdout.splitlines() if line.startswith(DDP_MARKER)]
    setting = f"{processes} processes (torchrun), global batch {args.train_batch}, synced BatchNorm"
    if result.returncode != 0 or not lines:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        return [(f"train DDP ×{processes}", setting, "FAILED: " + " | ".join(tail))]
    record = json.loads(lines[-1][len(DDP_MARKER) :])
    step_s = record["step_s"]
    result_text = (
        f"{step_s:.3f} s/step, {args.train_batch / step_s:.1f} images/s ({record['backend']}), "
        f"×{single_step_s / step_s:.2f} vs 1 process"
    )
    return [(f"train DDP ×{processes}", setting, result_text)]


# ----------------------------------------------------------------------------- driver


def _size_args(args) -> list[str]:
    return [
        f"--backbone={args.backbone}",
        f"--ffn={args.ffn}",
        f"--size={args.size}",
        f"--sites={args.sites}",
        f"--embed-batch={args.embed_batch}",
        f"--train-batch={args.train_batch}",
        f"--steps={args.steps}",
        f"--workers={args.workers}",
    ]


def print_table(title: str, rows: list[tuple[str, str, str]]) -> None:
    widths = [max(len(r[i]) for r in [("check", "setting", "result"), *rows]) for i in range(3)]
    print(title)
    for row in [("check", "setting", "result"), tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        return (
            f"{torch.cuda.device_count()} × {', '.join(names)}, CUDA {torch.version.cuda}, "
            f"torch {torch.__version__}, {os.cpu_count()} CPU cores"
        )
    return f"CPU only ({torch.get_num_threads()} threads), torch {torch.__version__} — smoke sizes, not a measurement"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (tests the script)")
    parser.add_argument("--backbone")
    parser.add_argument("--ffn", type=int)
    parser.add_argument("--size", type=int, help="tile edge (the paper's 448)")
    parser.add_argument("--sites", type=int, help="sites in the synthetic plate")
    parser.add_argument("--embed-batch", type=int, help="embed.batch_size")
    parser.add_argument("--train-batch", type=int, help="global training batch (paper: 200)")
    parser.add_argument("--steps", type=int, help="timed training steps")
    parser.add_argument("--workers", type=int, help="DataLoader workers (embed and train)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled embedding variants")
    parser.add_argument("--ddp-processes", type=int, help="DDP processes (default: the GPUs; smoke: 2)")
    parser.add_argument("--workdir", help="folder for the synthetic plate (default: a temporary one)")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = SMOKE if args.smoke else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    warnings.filterwarnings("ignore")
    if args.ddp_worker:
        ddp_worker(args)
        return 0
    if args.smoke:
        args.no_compile = True  # compiling takes minutes on a CPU; the GPU run measures it
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device is visible (torch.cuda.is_available() is False), so there is "
            "nothing to measure here; run it on a GPU node, or with --smoke for a CPU dry run."
        )
        return 0
    else:
        device = torch.device("cuda")
    processes = args.ddp_processes or (2 if args.smoke else torch.cuda.device_count())

    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        root = Path(args.workdir or scratch)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor-cache"))  # cold compile
        start = time.perf_counter()
        write_plate(root, sites=args.sites, size=args.size)
        rows = [
            (
                "write tiles",
                f"{args.sites} × 5 × {args.size}² float16",
                f"{time.perf_counter() - start:.1f} s",
            )
        ]
        rows += check_embed(args, root, device)
        train_rows, step_s = check_train(args, root, device)
        rows += train_rows
        if processes > 1:
            rows += check_ddp(args, root, processes, step_s)
        else:
            rows.append(("train DDP", "needs > 1 GPU", f"skipped ({processes} visible)"))
    print_table(f"gpu_check — {describe_machine(device)}", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
