"""``phenoprofiler train`` and ``phenoprofiler embed`` on small synthetic plates (tiny backbone)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from phenoprofiler_core import cli
from phenoprofiler_core.embed import EmbedConfig, build_model, embed_array
from phenoprofiler_core.errors import ConfigError, DataError
from phenoprofiler_core.train import (
    TrainConfig,
    TrainingInterrupted,
    load_training_data,
    read_targets,
    train_model,
    weights_digest,
)

MODEL = {"backbone": "test_resnet", "transformer_ffn": 64}
TRAIN = {
    "level": "site",
    "epochs_stage1": 2,
    "epochs_stage2": 2,
    "batch_size": 4,
    "lr_step": 1,
    "lr_gamma": 0.5,
}
KEYS = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]


def make_plates(
    root: Path, plates=("P1", "P2"), wells=4, sites=2, size=32, channels=5, dim=8, seed=0, cells_per_site=0
) -> Path:
    """tiles/<plate>.npy + .sites.parquet, classic/<plate>.parquet (targets), optional cells/."""
    rng = np.random.default_rng(seed)
    for sub in ("tiles", "classic", "cells"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for plate in plates:
        rows, tiles, cell_rows, crops = [], [], [], []
        for w in range(wells):
            for s in range(1, sites + 1):
                rows.append(
                    {
                        "Metadata_Plate": plate,
                        "Metadata_Well": f"A{w + 1:02d}",
                        "Metadata_Site": s,
                        "Metadata_Treatment": f"trt{w}",
                        "Metadata_TreatmentId": f"id{w}",
                        "Metadata_pert_type": "negcon" if w == 0 else "trt",
                        "Metadata_moa": "",
                    }
                )
                # Treatments differ in brightness and blockiness, so there is something to learn.
                base = rng.random((channels, 4, 4)) * (0.3 + 0.15 * w)
                tile = np.kron(base, np.ones((size // 4, size // 4))) + 0.05 * rng.random(
                    (channels, size, size)
                )
                tiles.append(tile.astype(np.float16))
                for c in range(cells_per_site):
                    cell_rows.append(
                        {**rows[-1], "Metadata_ObjectNumber": c + 1, "Metadata_X": 5.0, "Metadata_Y": 5.0}
                    )
                    crops.append(rng.random((channels, 16, 16)).astype(np.float16))
        site_table = pd.DataFrame(rows)
        np.save(root / "tiles" / f"{plate}.npy", np.stack(tiles))
        site_table.to_parquet(root / "tiles" / f"{plate}.sites.parquet")
        feats = rng.normal(size=(len(site_table), dim)).astype(np.float32)
        feats[:, 0] = [t.astype(np.float32).mean() for t in tiles]
        table = pd.concat(
            [site_table[KEYS], pd.DataFrame(feats, columns=[f"feat_{i}" for i in range(dim)])], axis=1
        )
        table.to_parquet(root / "classic" / f"{plate}.parquet")
        if cells_per_site:
            np.save(root / "cells" / f"{plate}.npy", np.stack(crops))
            pd.DataFrame(cell_rows).to_parquet(root / "cells" / f"{plate}.cells.parquet")
    return root


@pytest.fixture()
def plates(tmp_path) -> Path:
    return make_plates(tmp_path / "data")


def _train(plates: Path, out: Path, **kw):
    return train_model(
        plates / "tiles",
        ["P1", "P2"],
        out,
        model_options=MODEL,
        train_options={**TRAIN, **kw.pop("train", {})},
        targets_dir=plates / "classic",
        seed=0,
        **kw,
    )


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- training


def test_cli_train_writes_checkpoints_and_history(plates, tmp_path):
    out = tmp_path / "model" / "demo"
    config = json.dumps({"model": MODEL, "train": TRAIN, "seed": 3})
    rc = cli.main(
        [
            "train",
            "--tiles-dir",
            str(plates / "tiles"),
            "--plates",
            "P1",
            "P2",
            "--targets-dir",
            str(plates / "classic"),
            "--config-json",
            config,
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    history = pd.read_csv(out / "history.csv")
    assert list(history.columns) == ["stage", "epoch", "split", "loss", "mse", "ce", "contrastive"]
    assert len(history) == 2 * 2 * 2  # stages × epochs × {train, validation}
    stage1 = history[history.stage == 1]
    assert np.allclose(stage1["loss"], stage1["mse"])  # stage 1 = regression only
    stage2 = history[history.stage == 2]
    w = {"contrastive": 1.0, "mse": 100.0, "ce": 0.1}
    assert np.allclose(stage2["loss"], sum(w[k] * stage2[k] for k in w), rtol=1e-4)
    ckpt = torch.load(out / "stage2.pt", weights_only=False)
    assert ckpt["split"]["split"] == "plate" and len(ckpt["split"]["validation"]) == 1
    assert ckpt["target_dim"] == 8 and ckpt["seed"] == 3 and ckpt["classes"] == ["id0", "id1", "id2", "id3"]
    # The best epoch is the one with the lowest validation loss.
    val2 = stage2[stage2.split == "validation"]
    assert ckpt["best_epoch"] == int(val2.loc[val2.loss.idxmin(), "epoch"])


def test_stage2_starts_from_stage1_weights(plates, tmp_path):
    paths = _train(plates, tmp_path / "a")
    stage1 = torch.load(paths["stage1"], weights_only=False)
    stage2 = torch.load(paths["stage2"], weights_only=False)
    assert stage2["init_digest"] == weights_digest(stage1["model_state"])
    assert not _states_equal(stage1["model_state"], stage2["model_state"])  # and then it trained
    # With no stage-2 epochs the stage-2 model *is* the stage-1 model.
    paths0 = _train(plates, tmp_path / "b", train={"epochs_stage2": 0})
    assert _states_equal(
        torch.load(paths0["stage1"], weights_only=False)["model_state"],
        torch.load(paths0["stage2"], weights_only=False)["model_state"],
    )


def test_interrupted_and_resumed_run_reproduces_weights(plates, tmp_path):
    reference = _train(plates, tmp_path / "full")
    out = tmp_path / "killed"
    with pytest.raises(TrainingInterrupted):
        _train(plates, out, stop_after_epochs=1)  # killed in stage 1
    assert not (out / "stage1.pt").exists()
    with pytest.raises(TrainingInterrupted):
        _train(plates, out, stop_after_epochs=2)  # resumes stage 1, killed after stage 2 epoch 1
    assert (out / "stage1.pt").exists() and not (out / "stage2.pt").exists()
    resumed = _train(plates, out)
    for stage in ("stage1", "stage2"):
        a = torch.load(reference[stage], weights_only=False)
        b = torch.load(resumed[stage], weights_only=False)
        assert _states_equal(a["model_state"], b["model_state"]), stage
    assert pd.read_csv(reference["history"]).equals(pd.read_csv(resumed["history"]))


def test_different_settings_do_not_resume_stale_state(plates, tmp_path):
    out = tmp_path / "m"
    with pytest.raises(TrainingInterrupted):
        _train(plates, out, stop_after_epochs=1)
    fresh = _train(plates, out, train={"lr": 5e-4})
    reference = _train(plates, tmp_path / "ref", train={"lr": 5e-4})
    assert _states_equal(
        torch.load(fresh["stage2"], weights_only=False)["model_state"],
        torch.load(reference["stage2"], weights_only=False)["model_state"],
    )


# ----------------------------------------------------------------------------- data, splits, targets


def _items(plates, **train):
    cfg = TrainConfig.from_dict({**TRAIN, **train})
    targets = read_targets(["P1", "P2"], targets_dir=plates / "classic")
    return load_training_data(plates / "tiles", ["P1", "P2"], targets, cfg, seed=0), targets


def test_plate_split_and_targets_standardized_on_training_split(plates):
    data, targets = _items(plates)
    val_plates = set(data.plate_of[data.is_val])
    assert len(val_plates) == 1 and val_plates.isdisjoint(data.plate_of[~data.is_val])
    train_plate = (set(data.plate_of) - val_plates).pop()
    raw = targets[targets.Metadata_Plate == train_plate].drop(columns=KEYS).to_numpy()
    assert np.allclose(data.target_mean, raw.mean(0), atol=1e-5)
    assert np.allclose(data.targets[~data.is_val].mean(0), 0, atol=1e-5)


def test_treatment_split_keeps_treatments_whole_and_controls_in_training(plates):
    data, _ = _items(plates, split="treatment", val_fraction=0.34)
    val_labels = set(data.labels[data.is_val])
    assert val_labels and val_labels.isdisjoint(data.labels[~data.is_val])
    assert data.classes.index("id0") not in val_labels  # id0 = the negative control


def test_bad_inputs_name_the_problem(plates, tmp_path):
    with pytest.raises(ConfigError, match="at least 2 plates"):
        train_model(
            plates / "tiles",
            ["P1"],
            tmp_path / "x",
            model_options=MODEL,
            train_options=TRAIN,
            targets_dir=plates / "classic",
        )
    table = pd.read_parquet(plates / "classic" / "P2.parquet")
    table.iloc[1:].to_parquet(plates / "classic" / "P2.parquet")
    with pytest.raises(DataError, match=r"no regression target.*'P2', 'A01', 1"):
        _items(plates)
    with pytest.raises(ConfigError, match="split"):
        TrainConfig.from_dict({"split": "site"})


def test_nan_targets_become_zero(plates):
    table = pd.read_parquet(plates / "classic" / "P1.parquet")
    table.loc[0, "feat_2"] = np.nan
    table.to_parquet(plates / "classic" / "P1.parquet")
    data, _ = _items(plates, split="treatment", val_fraction=0.34)
    assert np.isfinite(data.targets).all()


# ----------------------------------------------------------------------------- embedding


def test_embed_trained_and_untrained(plates, tmp_path):
    paths = _train(plates, tmp_path / "m", train={"epochs_stage1": 1, "epochs_stage2": 1})
    out = tmp_path / "features" / "demo" / "P1.parquet"
    assert (
        cli.main(
            [
                "embed",
                "--plate",
                "P1",
                "--tiles-dir",
                str(plates / "tiles"),
                "--checkpoint",
                str(paths["stage2"]),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    table = pd.read_parquet(out)
    sites = pd.read_parquet(plates / "tiles" / "P1.sites.parquet")
    emb = [c for c in table.columns if c.startswith("emb_")]
    assert emb[0] == "emb_000" and emb[-1] == "emb_671" and len(emb) == 672
    assert (table[emb].dtypes == np.float32).all()
    pd.testing.assert_frame_equal(table[list(sites.columns)], sites)
    # Embeddings equal the trained model's plain eval-mode output.
    model, _ = build_model("trained", checkpoint=str(paths["stage2"]))
    tiles = torch.from_numpy(np.load(plates / "tiles" / "P1.npy").astype(np.float32))
    with torch.inference_mode():
        expected = model(tiles).numpy()
    assert np.abs(table[emb].to_numpy() - expected).max() < 1e-4

    untrained = []
    for seed in (0, 0, 1):
        path = tmp_path / f"untrained_{len(untrained)}.parquet"
        assert (
            cli.main(
                [
                    "embed",
                    "--plate",
                    "P1",
                    "--tiles-dir",
                    str(plates / "tiles"),
                    "--untrained",
                    "--seed",
                    str(seed),
                    "--config-json",
                    json.dumps({"model": MODEL}),
                    "--out",
                    str(path),
                ]
            )
            == 0
        )
        untrained.append(pd.read_parquet(path)[emb].to_numpy())
    assert np.array_equal(untrained[0], untrained[1])  # seeded
    assert not np.allclose(untrained[0], untrained[2])
    assert not np.allclose(untrained[0], table[emb].to_numpy())


def test_cell_level_embedding_is_the_site_median(tmp_path):
    root = make_plates(tmp_path / "cells", plates=("P1",), cells_per_site=3)
    model, _ = build_model("untrained", model_options=MODEL, in_channels=5, seed=0)
    out = tmp_path / "cell.parquet"
    assert (
        cli.main(
            [
                "embed",
                "--plate",
                "P1",
                "--tiles-dir",
                str(root / "tiles"),
                "--cells-dir",
                str(root / "cells"),
                "--untrained",
                "--config-json",
                json.dumps({"model": MODEL, "embed": {"level": "cell"}}),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    table = pd.read_parquet(out)
    assert len(table) == 8 and "Metadata_Treatment" in table.columns
    crops = np.load(root / "cells" / "P1.npy")
    per_cell = embed_array(model, crops, EmbedConfig(compile="false"))
    first_site = np.median(per_cell[:3], axis=0)
    emb = [c for c in table.columns if c.startswith("emb_")]
    assert np.abs(table.loc[0, emb].to_numpy(dtype=np.float32) - first_site).max() < 1e-4


@pytest.mark.slow
def test_compiled_embedding_matches_eager(plates):
    model, _ = build_model(
        "untrained", model_options={"backbone": "resnet10t", "transformer_ffn": 64}, in_channels=5, seed=0
    )
    tiles = np.load(plates / "tiles" / "P1.npy")
    eager = embed_array(model, tiles, EmbedConfig(compile="false", batch_size=3))
    compiled = embed_array(model, tiles, EmbedConfig(compile="true", batch_size=3))  # 8 = 3 + 3 + padded 2
    assert np.abs(eager - compiled).max() < 1e-4


def test_killed_cli_job_resumes_to_the_same_weights(plates, tmp_path):
    """A real SIGKILL of `phenoprofiler train` mid-run, then a rerun: same weights as one clean run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    train = {**TRAIN, "epochs_stage1": 3, "epochs_stage2": 3}
    out = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "phenoprofiler_core.cli",
        "train",
        "--tiles-dir",
        str(plates / "tiles"),
        "--plates",
        "P1",
        "P2",
        "--targets-dir",
        str(plates / "classic"),
        "--config-json",
        json.dumps({"model": MODEL, "train": train}),
        "--out",
        str(out),
    ]
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "state" / "stage1_last.pt"
    deadline = time.monotonic() + 120
    while not state.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    assert state.exists(), "the job never saved its first epoch"
    assert not (out / "stage2.pt").exists(), "the job finished before it could be killed"
    assert subprocess.run(command, capture_output=True).returncode == 0
    reference = _train(plates, tmp_path / "clean", train=train)
    for stage in ("stage1", "stage2"):
        assert _states_equal(
            torch.load(reference[stage], weights_only=False)["model_state"],
            torch.load(out / f"{stage}.pt", weights_only=False)["model_state"],
        ), stage


def test_cell_level_training_pairs_crops_with_their_site_target(tmp_path):
    root = make_plates(tmp_path / "cells", cells_per_site=2)
    out = tmp_path / "model"
    # level auto: crops exist for every plate, so the model trains on cells
    config = json.dumps(
        {"model": MODEL, "train": {**TRAIN, "level": "auto", "epochs_stage1": 1, "epochs_stage2": 1}}
    )
    assert (
        cli.main(
            [
                "train",
                "--tiles-dir",
                str(root / "tiles"),
                "--cells-dir",
                str(root / "cells"),
                "--plates",
                "P1",
                "P2",
                "--targets-dir",
                str(root / "classic"),
                "--config-json",
                config,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    ckpt = torch.load(out / "stage2.pt", weights_only=False)
    assert ckpt["level"] == "cell" and ckpt["split"]["n_train"] == 16  # 8 sites × 2 cells on one plate
    # embed at the level the model was trained on (auto): cell crops, median per site
    features = tmp_path / "features.parquet"
    assert (
        cli.main(
            [
                "embed",
                "--plate",
                "P1",
                "--tiles-dir",
                str(root / "tiles"),
                "--cells-dir",
                str(root / "cells"),
                "--checkpoint",
                str(out / "stage2.pt"),
                "--out",
                str(features),
            ]
        )
        == 0
    )
    assert len(pd.read_parquet(features)) == 8


def test_paper_learning_rate_milestones():
    """train.lr_milestones gives the paper's piecewise schedule, epoch by epoch, through the scheduler."""
    import torch

    from phenoprofiler_core.train import TrainConfig, make_scheduler

    cfg = TrainConfig.from_dict({"lr": 1e-3, "lr_milestones": [[20, 5e-4], [50, 1e-4], [100, 5e-5]]})
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = make_scheduler(optimizer, cfg)
    seen = []
    for _ in range(120):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[0] == seen[19] == pytest.approx(1e-3)
    assert seen[20] == seen[49] == pytest.approx(5e-4)
    assert seen[50] == pytest.approx(1e-4) and seen[100] == seen[119] == pytest.approx(5e-5)
    plain = make_scheduler(
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3),
        TrainConfig.from_dict({"lr_step": 5}),
    )
    assert isinstance(plain, torch.optim.lr_scheduler.StepLR)


def test_sites_without_a_teacher_target_are_skipped_and_counted_when_asked(plates):
    """The targets stage skips sites with no cells; train.missing_targets: skip leaves exactly those out."""
    table = pd.read_parquet(plates / "classic" / "P2.parquet")
    table.iloc[2:].to_parquet(plates / "classic" / "P2.parquet")  # P2's first two sites: no target
    data, _ = _items(plates, missing_targets="skip")
    assert data.split_info["n_without_target"] == 2
    assert len(data.plate_of) == 2 * 4 * 2 - 2  # 2 plates x 4 wells x 2 sites, minus the two
    kept = set(zip(data.plate_of, data.row_of))
    assert ("P2", 0) not in kept and ("P2", 1) not in kept and ("P2", 2) in kept


def test_raw_targets_are_regressed_as_given_when_not_standardized(plates):
    targets = pd.concat(pd.read_parquet(plates / "classic" / f"{p}.parquet") for p in ("P1", "P2"))
    data, _ = _items(plates, standardize_targets=False)
    first = targets.set_index(KEYS).loc[("P1", "A01", 1)].to_numpy(dtype=np.float32)
    # the items come plate by plate, site rows in tile order: item 0 is P1 A01 site 1
    assert data.plate_of[0] == "P1" and data.row_of[0] == 0
    np.testing.assert_array_equal(data.targets[0], first)
    assert np.all(data.target_mean == 0) and np.all(data.target_std == 1)
