"""Inference throughput of PhenoProfiler's embedding paths against the plain fp32 model, and the
site count from which compiling pays off (``embed.compile_min_sites``).

    .venv/bin/python bench/bench_inference.py                          # paper: ResNet50, 5×448² tiles
    .venv/bin/python bench/bench_inference.py --preset demo            # demo: ResNet18, 448² tiles → 224²
    .venv/bin/python bench/bench_inference.py --break-even             # + cold/warm compile time, break-even
    .venv/bin/python bench/bench_inference.py --rounds 9 --threads 2 --no-compile

Variants, all on the same randomly initialised weights (BatchNorm statistics randomised so that
folding is not trivially exact), the same input batch and the same number of threads:
  plain          fp32 eval-mode ``model(x)`` under ``torch.no_grad`` (what the published scripts do):
                 the baseline every ratio is against
  eager fp32     what ``phenoprofiler embed`` runs when it does not compile: the folded inference
                 model (:func:`.model.inference_model`) through :class:`.embed.InferenceRunner`
  compiled fp32  what ``embed`` runs when it compiles (TorchInductor, frozen weights, same runner)
  eager bf16     ``embed.precision: bf16`` without compiling (bf16 autocast around the runner)
  compiled bf16  ``embed.precision: bf16`` when it compiles
Rounds are interleaved, and the order rotates every round, so load from other processes and
allocator state hit all variants alike; each variant is warmed up twice first; the median over
rounds is reported with the range.  Besides wall-clock time the process's CPU time per site is
printed (CPU only): on a machine shared with other jobs it is far steadier than wall time.
Uses CUDA when present, else CPU.

``--break-even`` also measures compile time in fresh processes, cold (empty TorchInductor cache)
and warm (the cache a previous job filled, as jobs of one run share it), and prints
break-even = compile time / (eager − compiled seconds per site): the plate size from which
``embed.compile: auto`` should compile on this device.  It is given from wall-clock times and
from CPU times; the probes compile in one thread (TORCHINDUCTOR_COMPILE_THREADS=1) so that the C++
builds are waited-for child processes whose CPU time is counted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext

import torch

from phenoprofiler_core.embed import InferenceRunner
from phenoprofiler_core.model import create_model, inference_model, paper_model_config

PRESETS = {
    # the paper's model: ResNet50 on 448² tiles (the gradient encoder halves them to 224²)
    "paper": {"backbone": "resnet50", "input_size": 448, "ffn": 4096, "size": 448},
    # config/demo.yaml: ResNet18, tiles stored at 448² and resized to 224² by the model
    "demo": {"backbone": "resnet18", "input_size": 224, "ffn": 1024, "size": 448},
}


def _randomize_batchnorm(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)


def build(args, device: torch.device) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    cfg = paper_model_config()
    cfg.backbone, cfg.input_size, cfg.transformer_ffn = args.backbone, args.input_size, args.ffn
    model = create_model(cfg, in_channels=args.channels).eval()
    _randomize_batchnorm(model)
    x = torch.rand(
        args.batch, args.channels, args.size, args.size, generator=torch.Generator().manual_seed(2)
    )
    return model.to(device), x.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def embed_call(runner: InferenceRunner, x_cl: torch.Tensor, device: torch.device, amp_dtype):
    """One batch the way ``embed_images`` runs it: inference mode, optional autocast, the runner."""
    with torch.inference_mode():
        autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
        with autocast:
            return runner(x_cl).float()


def cpu_time() -> float:
    """CPU seconds of this process (all threads) and of its finished child processes (C++ builds)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def compile_probe(args) -> None:
    """Child process: compile time of ``embed``'s compiled fp32 path = first call − second call."""
    device = torch.device(args.device)
    model, x = build(args, device)
    runner = InferenceRunner(inference_model(model).to(device), compile=True, batch_size=args.batch)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    wall, cpu = [], []
    for _ in range(2):
        start, start_cpu = time.perf_counter(), cpu_time()
        embed_call(runner, x_cl, device, None)
        _sync(device)
        wall.append(time.perf_counter() - start)
        cpu.append(cpu_time() - start_cpu)
    record = {
        "compile_s": wall[0] - wall[1],
        "compile_cpu_s": cpu[0] - cpu[1],
        "compiled": runner.is_compiled,
        "cache_counts": runner.cache_counts,
        "fallback": runner.fallback,
    }
    print(json.dumps(record))


def run_probe(args, cache_dir: str) -> dict:
    command = [sys.executable, __file__, "--compile-probe", "--device", args.device]
    command += ["--backbone", args.backbone, "--input-size", str(args.input_size), "--ffn", str(args.ffn)]
    command += ["--size", str(args.size), "--batch", str(args.batch), "--channels", str(args.channels)]
    command += ["--threads", str(torch.get_num_threads())]
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, TORCHINDUCTOR_COMPILE_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"compile probe failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def load_average() -> str:
    try:
        return "load " + "/".join(f"{v:.1f}" for v in os.getloadavg()) + f" on {os.cpu_count()} CPUs"
    except OSError:
        return "load unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    parser.add_argument("--backbone", help="timm backbone (default: the preset's)")
    parser.add_argument("--input-size", type=int, help="model input edge (default: the preset's)")
    parser.add_argument("--ffn", type=int, help="transformer FFN width (default: the preset's)")
    parser.add_argument("--size", type=int, help="tile edge (default: the preset's, 448)")
    parser.add_argument("--batch", type=int, default=16, help="images per batch (embed.batch_size default)")
    parser.add_argument("--channels", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per variant, interleaved (>= 7)")
    parser.add_argument("--warm-probes", type=int, default=2, help="--break-even: warm-cache compile probes")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 variants")
    parser.add_argument(
        "--break-even", action="store_true", help="measure cold/warm compile time, break-even"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--compile-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key.replace("-", "_")) is None:
            setattr(args, key, value)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.compile_probe:
        compile_probe(args)
        return

    device = torch.device(args.device)
    half = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    model, x = build(args, device)
    x_cl = x.contiguous(memory_format=torch.channels_last)  # embed's batches are channels-last

    def plain():
        with torch.no_grad():
            return model(x)

    fast = inference_model(model).to(device)
    runners = {"eager fp32": (InferenceRunner(fast, compile=False, batch_size=args.batch), None)}
    if not args.no_compile:
        runners["compiled fp32"] = (InferenceRunner(fast, compile=True, batch_size=args.batch), None)
    if not args.no_bf16:
        runners["eager bf16"] = (InferenceRunner(fast, compile=False, batch_size=args.batch), half)
        if not args.no_compile:
            runners["compiled bf16"] = (InferenceRunner(fast, compile=True, batch_size=args.batch), half)
    variants = {"plain": plain}
    for name, (runner, amp) in runners.items():
        variants[name] = lambda runner=runner, amp=amp: embed_call(runner, x_cl, device, amp)

    first_call = {}
    outputs = {}
    for name, fn in variants.items():  # two warm-ups each; the first compiles the compiled ones
        start = time.perf_counter()
        outputs[name] = fn().float()
        _sync(device)
        first_call[name] = time.perf_counter() - start
        fn()
        _sync(device)
    names = list(variants)
    times = {k: [] for k in names}
    cpu_times = {k: [] for k in names}
    load_before = load_average()
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            variants[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - start_cpu)

    print(
        f"device: {device} ({torch.get_num_threads()} threads for every variant), torch {torch.__version__}, "
        f"{args.backbone}, batch {args.batch} × {args.channels}×{args.size}², model input {args.input_size}², "
        f"median of {args.rounds} interleaved rounds (order rotating); {load_before} before, "
        f"{load_average()} after"
    )
    base, base_cpu = statistics.median(times["plain"]), statistics.median(cpu_times["plain"])
    per_site, per_site_cpu = {}, {}
    for name in names:
        median, median_cpu = statistics.median(times[name]), statistics.median(cpu_times[name])
        per_site[name], per_site_cpu[name] = median / args.batch, median_cpu / args.batch
        diff = (outputs[name] - outputs["plain"]).abs().max().item()
        spread = f"[{args.batch / max(times[name]):.2f}–{args.batch / min(times[name]):.2f}]"
        cpu = ""
        if device.type == "cpu":
            cpu = f"   CPU {per_site_cpu[name] * 1e3:6.1f} ms/site ×{base_cpu / median_cpu:5.2f}"
        fallback = runners.get(name, (None,))[0]
        note = ""
        if fallback is not None and fallback.fallback:
            note = f"  (compile failed: {fallback.fallback})"
        print(
            f"{name:14s} {args.batch / median:8.2f} sites/s {spread:>15s}  ×{base / median:5.2f} vs plain fp32"
            f"{cpu}   max|Δ| vs plain = {diff:.1e}{note}"
        )
    for name in ("compiled fp32", "compiled bf16"):
        if name in first_call:
            steady = statistics.median(times[name])
            print(
                f"{name}: first call {first_call[name]:.1f} s (compile ≈ {first_call[name] - steady:.1f} s)"
            )

    if args.break_even and "compiled fp32" in per_site:
        with tempfile.TemporaryDirectory(prefix="inductor-bench-") as cache:
            probes = [("cold", run_probe(args, cache))]
            probes += [(f"warm {i + 1}", run_probe(args, cache)) for i in range(args.warm_probes)]
        clocks = [("wall", per_site, "compile_s")]
        if device.type == "cpu":
            clocks.append(("CPU", per_site_cpu, "compile_cpu_s"))
        for clock, site_s, key in clocks:
            saving = site_s["eager fp32"] - site_s["compiled fp32"]
            print(
                f"break-even (fp32, {clock} time): eager {site_s['eager fp32'] * 1e3:.1f} ms/site, "
                f"compiled {site_s['compiled fp32'] * 1e3:.1f} ms/site, saving {saving * 1e3:.1f} ms/site"
            )
            for label, probe in probes:
                sites = probe[key] / saving if saving > 0 else float("inf")
                print(
                    f"  {label:7s} compile {probe[key]:6.1f} s ({clock}; fresh process, FX-graph cache "
                    f"{probe['cache_counts']}) → compiling pays from {sites:,.0f} sites"
                )


if __name__ == "__main__":
    main()
