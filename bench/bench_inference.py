"""Inference throughput of the paper's PhenoProfiler architecture: plain vs optimized path.

    .venv/bin/python bench/bench_inference.py                 # batch 16, 5×448×448, ResNet-50
    .venv/bin/python bench/bench_inference.py --rounds 5 --no-compile

Variants, all on the same randomly initialised weights (BatchNorm statistics randomised so that
folding is not trivially exact) and the same input:
  plain      fp32 eval-mode ``model(x)`` under ``torch.no_grad`` (what the published scripts do)
  folded     our inference form (central differences + BatchNorm folded into convs, channels-last)
             under ``torch.inference_mode``
  compiled   ``folded`` compiled by TorchInductor with frozen weights (what ``phenoprofiler embed``
             uses for more than a few batches)
  bf16       ``folded`` under bf16 autocast (CUDA: fp16 where bf16 is unsupported)
Rounds are interleaved (plain, folded, compiled, bf16, plain, …) so load from other processes hits all
variants alike; the median per variant is reported.  Uses CUDA when present, else CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from phenoprofiler_core.model import create_model, inference_model, paper_model_config


def _randomize_batchnorm(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--channels", type=int, default=5)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant (interleaved)")
    parser.add_argument("--no-compile", action="store_true", help="skip the TorchInductor variant")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    half = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    torch.manual_seed(0)
    cfg = paper_model_config()
    cfg.backbone = args.backbone
    model = create_model(cfg, in_channels=args.channels).eval()
    _randomize_batchnorm(model)
    model.to(device)
    x = torch.rand(args.batch, args.channels, args.size, args.size, device=device)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def plain():
        with torch.no_grad():
            return model(x)

    fast = inference_model(model).to(device)

    def folded():
        with torch.inference_mode():
            return fast(x_cl)

    def bf16():
        with torch.inference_mode(), torch.autocast(device.type, dtype=half):
            return fast(x_cl).float()

    variants = {"plain": plain, "folded": folded}
    compile_s = None
    if not args.no_compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        compiled_model = torch.compile(fast, dynamic=False)

        def compiled():
            with torch.inference_mode():
                return compiled_model(x_cl)

        start = time.perf_counter()
        compiled()
        sync()
        compile_s = time.perf_counter() - start
        variants["compiled"] = compiled
    variants["bf16"] = bf16

    outputs, times = {}, {k: [] for k in variants}
    for name, fn in variants.items():  # warm-up (and reference outputs)
        outputs[name] = fn().float()
        sync()
    for _ in range(args.rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)

    print(
        f"device: {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}, "
        f"{args.backbone}, batch {args.batch} × {args.channels}×{args.size}×{args.size}, "
        f"median of {args.rounds} interleaved rounds"
    )
    if compile_s is not None:
        print(f"compile + first batch: {compile_s:.1f} s (paid once per embed job)")
    base = args.batch / statistics.median(times["plain"])
    for name in variants:
        ips = args.batch / statistics.median(times[name])
        diff = (outputs[name] - outputs["plain"]).abs().max().item()
        spread = f"[{args.batch / max(times[name]):.1f}–{args.batch / min(times[name]):.1f}]"
        print(
            f"{name:9s} {ips:8.2f} images/s {spread:>13s}  ×{ips / base:5.2f} vs plain   max|Δ| = {diff:.2e}"
            f"{'  (within 1e-4)' if diff <= 1e-4 else ''}"
        )


if __name__ == "__main__":
    main()
