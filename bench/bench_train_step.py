"""Time of one PhenoProfiler training step (forward, all three losses, backward, AdamW).

    .venv/bin/python bench/bench_train_step.py                                    # paper: resnet50, 448², batch 8
    .venv/bin/python bench/bench_train_step.py --backbone resnet18 --size 224     # demo-sized

Uses CUDA (with bf16 autocast, as ``phenoprofiler train`` does by default) when present, else CPU fp32.
Prints the median step time over a few steps after one warm-up step, and images/s.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from phenoprofiler_core.model import LossWeights, compute_losses, create_model, paper_model_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=5)
    parser.add_argument("--ffn", type=int, default=4096, help="transformer FFN width")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--target-dim", type=int, default=672)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    amp = None
    if device.type == "cuda":
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    torch.manual_seed(0)
    cfg = paper_model_config()
    cfg.backbone, cfg.transformer_ffn, cfg.input_size = args.backbone, args.ffn, None
    model = create_model(cfg, in_channels=args.channels, num_classes=args.classes, target_dim=args.target_dim)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-3)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    images = torch.rand(args.batch, args.channels, args.size, args.size, device=device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)
    targets = torch.randn(args.batch, args.target_dim, device=device)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    weights = LossWeights()

    def step() -> float:
        with torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext():
            loss = compute_losses(model, images, targets, labels, weights)["loss"]
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        return float(loss.detach())

    step()
    sync()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(
        f"device: {device} ({torch.get_num_threads()} CPU threads), autocast {amp}, {args.backbone}, "
        f"batch {args.batch} × {args.channels}×{args.size}×{args.size}, ffn {args.ffn}"
    )
    print(
        f"train step: {median:.3f} s median of {args.steps} ({args.batch / median:.2f} images/s); "
        f"all: {', '.join(f'{t:.3f}' for t in times)}"
    )


if __name__ == "__main__":
    main()
