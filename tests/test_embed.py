"""``phenoprofiler embed``: the compile decision, the eager fallback when compiling fails, the
shared compile cache, the per-job timing record and fp32 for the untrained set.

Small synthetic plates (``make_plates`` from test_train) and timm's tiny ``test_resnet`` keep each
job to seconds; the compiler tests run the real CLI in a subprocess with a broken toolchain.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from phenoprofiler_core import cli
from phenoprofiler_core.config import validate_config
from phenoprofiler_core.embed import (
    DEFAULT_COMPILE_MIN_SITES,
    EmbedConfig,
    build_model,
    default_stats_path,
    embed_array,
    job_precision,
    should_compile,
)
from phenoprofiler_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
MODEL = {"backbone": "test_resnet", "transformer_ffn": 64}
CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def plate(tmp_path_factory) -> Path:
    """tiles/P1.npy + P1.sites.parquet: 4 wells × 3 sites = 12 tiles of 5 × 32 × 32 (float16)."""
    tiles = tmp_path_factory.mktemp("embed_plate")
    rng = np.random.default_rng(0)
    rows = [
        {
            "Metadata_Plate": "P1",
            "Metadata_Well": f"A{w + 1:02d}",
            "Metadata_Site": s,
            "Metadata_pert_type": "trt",
        }
        for w in range(4)
        for s in (1, 2, 3)
    ]
    # blocky images whose brightness differs by well, so sites have different embeddings
    base = rng.random((len(rows), 5, 4, 4)) * np.repeat(0.3 + 0.15 * np.arange(4), 3)[:, None, None, None]
    images = np.kron(base, np.ones((8, 8))) + 0.05 * rng.random((len(rows), 5, 32, 32))
    np.save(tiles / "P1.npy", images.astype(np.float16))
    pd.DataFrame(rows).to_parquet(tiles / "P1.sites.parquet")
    return tiles


def _embed_args(tiles: Path, out: Path, embed: dict, *extra: str) -> list[str]:
    config = json.dumps({"model": MODEL, "embed": {"batch_size": 5, **embed}})
    return [
        "embed",
        "--plate",
        "P1",
        "--tiles-dir",
        str(tiles),
        "--untrained",
        "--config-json",
        config,
        "--threads",
        "2",
        "--out",
        str(out),
        *extra,
    ]


def _features(path: Path) -> np.ndarray:
    return pd.read_parquet(path).filter(like="emb_").to_numpy()


def _run_cli(args: list[str], *, env: dict[str, str], sleep_s: float = 0.0) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process (its own Inductor state), optionally idle for a while first."""
    code = (
        f"import sys, time; time.sleep({sleep_s}); from phenoprofiler_core.cli import main; sys.exit(main())"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=900
    )


# ----------------------------------------------------------------------------- the compile rule


def test_auto_compiles_from_the_device_threshold_on():
    limits = {"cpu": 2000, "cuda": 50}
    assert should_compile("auto", n_images=1999, device=CPU, min_sites=limits)[0] is False
    assert should_compile("auto", n_images=2000, device=CPU, min_sites=limits)[0] is True
    assert should_compile("auto", n_images=49, device=CUDA, min_sites=limits)[0] is False
    assert should_compile("auto", n_images=50, device=CUDA, min_sites=limits)[0] is True
    # explicit choices ignore the threshold
    assert should_compile("true", n_images=1, device=CPU, min_sites=limits)[0] is True
    assert should_compile("false", n_images=10**6, device=CPU, min_sites=limits)[0] is False
    reason = should_compile("auto", n_images=12, device=CPU, min_sites=limits)[1]
    assert "12" in reason and "2000" in reason and "cpu" in reason


def test_schema_defaults_equal_the_code_defaults(repo_root):
    config = validate_config(yaml.safe_load((repo_root / "config" / "demo.yaml").read_text()), source="demo")
    assert config["embed"] == dataclasses.asdict(EmbedConfig())
    assert config["embed"]["compile_min_sites"] == DEFAULT_COMPILE_MIN_SITES


def test_compile_min_sites_is_checked():
    cfg = EmbedConfig.from_dict({"compile_min_sites": {"cpu": 5}})
    assert cfg.compile_min_sites == {**DEFAULT_COMPILE_MIN_SITES, "cpu": 5}
    with pytest.raises(ConfigError, match=r"compile_min_sites.*'tpu'"):
        EmbedConfig.from_dict({"compile_min_sites": {"tpu": 5}})
    with pytest.raises(ConfigError, match=r"compile_min_sites\.cpu must be an integer >= 0, got -1"):
        EmbedConfig.from_dict({"compile_min_sites": {"cpu": -1}})


def test_small_plate_runs_eager_under_auto_and_reports_its_timing(plate, tmp_path):
    out = tmp_path / "features" / "untrained" / "P1.parquet"
    assert cli.main(_embed_args(plate, out, {})) == 0  # 12 sites: far below the CPU threshold
    record = json.loads(default_stats_path(out).read_text())
    assert default_stats_path(out) == out.parent / "P1.embed.json"
    assert record["sites"] == 12 and record["images"] == 12 and record["batches"] == 3  # 5 + 5 + 2
    assert record["compile"] is False and record["compile_s"] == 0
    assert (
        record["compile_reason"]
        == f"auto: 12 images < compile_min_sites.cpu = {DEFAULT_COMPILE_MIN_SITES['cpu']}"
    )
    assert record["precision"] == "fp32" and record["kind"] == "untrained" and record["threads"] == 2
    assert record["startup_s"] > 0 and record["embed_s"] > 0
    assert record["sites_per_s"] == pytest.approx(12 / record["embed_s"], rel=1e-2)
    assert record["total_s"] >= record["startup_s"] + record["embed_s"] - 0.01


# ----------------------------------------------------------------------------- fp32 for untrained


def test_untrained_set_always_runs_fp32(plate, tmp_path):
    fp32 = tmp_path / "fp32.parquet"
    bf16 = tmp_path / "bf16.parquet"
    assert cli.main(_embed_args(plate, fp32, {"precision": "fp32"})) == 0
    assert cli.main(_embed_args(plate, bf16, {"precision": "bf16"})) == 0
    assert np.array_equal(_features(fp32), _features(bf16))
    assert json.loads(default_stats_path(bf16).read_text())["precision"] == "fp32"
    assert job_precision("untrained", "auto") == "fp32"
    assert job_precision("trained", "bf16") == "bf16" and job_precision("published", "auto") == "auto"
    # ... and bf16 really changes this model's embeddings, so the equality above is not vacuous
    model, _ = build_model("untrained", model_options=MODEL, in_channels=5, seed=0)
    tiles = np.load(plate / "P1.npy")
    eager = embed_array(model, tiles, EmbedConfig(compile="false", batch_size=5))
    reduced = embed_array(model, tiles, EmbedConfig(compile="false", batch_size=5, precision="bf16"))
    assert np.abs(eager - _features(fp32)).max() == 0
    assert np.abs(eager - reduced).max() > 1e-3


# ----------------------------------------------------------------------------- compile failures


def _broken_compiler(folder: Path) -> str:
    """A 'g++' that answers --version (so Inductor accepts it) but cannot compile anything."""
    path = folder / "broken-g++"
    path.write_text(
        '#!/bin/sh\nif [ "$1" = "--version" ]; then echo "g++ (broken) 12.0"; exit 0; fi\nexit 1\n'
    )
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize(
    "toolchain",
    [
        "missing",  # no compiler at all: Inductor raises InvalidCxxCompiler at code generation
        pytest.param("broken", marks=pytest.mark.slow),  # found, but every build fails
    ],
)
def test_failed_compile_falls_back_to_eager(plate, tmp_path, toolchain):
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "TORCH_COMPILE"))}
    eager = tmp_path / "eager.parquet"
    assert cli.main(_embed_args(plate, eager, {"compile": "false"})) == 0

    cxx = "/nonexistent/g++" if toolchain == "missing" else _broken_compiler(tmp_path)
    fallback = tmp_path / "fallback.parquet"
    # An empty cache: a cached compiled graph would need no compiler at all.
    cache = tmp_path / "inductor-cache"
    result = _run_cli(
        _embed_args(plate, fallback, {"compile": "true"}, "--compile-cache", str(cache)),
        env={**base_env, "CXX": cxx},
        sleep_s=1.0,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert any("torch.compile failed" in w and "running eagerly" in w for w in warnings), result.stderr[
        -3000:
    ]
    if toolchain == "missing":
        assert any("InvalidCxxCompiler" in w for w in warnings)
    # eager and eager are bit-identical on CPU with the same threads and batches: so is the fallback
    assert np.array_equal(_features(fallback), _features(eager))
    record = json.loads(default_stats_path(fallback).read_text())
    assert record["compile"] is False and record["compile_reason"] == "embed.compile: true"
    assert record["compile_fallback"] and record["compile_s"] > 0  # the failed attempt is start-up time
    assert record["startup_s"] >= 1.0  # counted from process start (the 1 s idle before main)


@pytest.mark.slow
def test_jobs_share_the_compile_cache(plate, tmp_path):
    """Compiled jobs on one --compile-cache: the first fills it, later ones reuse its graph, and a
    model with other weights (another feature set) gets its own weights from the shared graph."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "TORCH_COMPILE"))}
    cache = tmp_path / "results" / ".cache" / "torchinductor"
    records, features = {}, {}
    for job, seed in (("first", "0"), ("second", "0"), ("other weights", "1")):
        out = tmp_path / f"{job.replace(' ', '_')}.parquet"
        args = _embed_args(plate, out, {"compile": "true"}, "--compile-cache", str(cache), "--seed", seed)
        result = _run_cli(args, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        records[job], features[job] = json.loads(default_stats_path(out).read_text()), _features(out)
    for seed in ("0", "1"):
        out = tmp_path / f"eager_{seed}.parquet"
        assert cli.main(_embed_args(plate, out, {"compile": "false"}, "--seed", seed)) == 0
        features[f"eager {seed}"] = _features(out)
    assert all(r["compile"] and r["compile_cache"] == str(cache.resolve()) for r in records.values())
    first, second, other = records["first"], records["second"], records["other weights"]
    assert first["compile_cache_counts"]["miss"] >= 1 and first["compile_cache_counts"]["hit"] == 0
    assert second["compile_cache_counts"]["hit"] >= 1 and second["compile_cache_counts"]["miss"] == 0
    assert other["compile_cache_counts"]["hit"] >= 1  # same graph, other frozen weights
    assert any((cache / "fxgraph").rglob("*"))
    for job, eager in (("first", "eager 0"), ("second", "eager 0"), ("other weights", "eager 1")):
        assert np.abs(features[job] - features[eager]).max() < 1e-4, job
    assert np.abs(features["eager 0"] - features["eager 1"]).max() > 0.1  # the weights do differ


# ----------------------------------------------------------------------------- the rule


def test_embed_rule_shares_the_cache_and_writes_the_timing_record(tmp_path):
    """Dry run of the demo: every embed job gets the run's cache folder and its own .embed.json."""
    bin_dir = str(Path(sys.executable).parent)
    target = f"{tmp_path}/demo/features/untrained/SQ00015198.embed.json"
    result = subprocess.run(
        [
            f"{bin_dir}/snakemake",
            "-n",
            "-p",
            "--cores",
            "1",
            "--configfile",
            "config/demo.yaml",
            "--config",
            f"results={tmp_path}",
            "--",
            target,
        ],
        cwd=REPO,
        env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    commands = [line for line in result.stdout.splitlines() if "phenoprofiler embed " in line]
    assert len(commands) == 1, result.stdout[-3000:]
    command = commands[0]
    assert f"--compile-cache {tmp_path}/demo/.cache/torchinductor" in command
    assert f"--stats {target}" in command
    assert f"--out {tmp_path}/demo/features/untrained/SQ00015198.parquet" in command
