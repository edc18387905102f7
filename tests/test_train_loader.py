"""The training data path: whole batches read from the memory maps in their storage type, converted
on the device, persistent workers sized to the job's cores, and the same weights for any worker
count."""

from __future__ import annotations

import json
import logging
import multiprocessing
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from phenoprofiler_core import cli
from phenoprofiler_core.distributed import DistContext
from phenoprofiler_core.errors import DataError
from phenoprofiler_core.train import (
    TrainConfig,
    load_training_data,
    read_targets,
    train_model,
    weights_digest,
)
from phenoprofiler_core.train_loader import TrainingBatches, batch_to_device, loader_workers

sys.path.insert(0, str(Path(__file__).parent))
from test_train import MODEL, TRAIN, make_plates


@pytest.fixture()
def plates(tmp_path) -> Path:
    return make_plates(tmp_path / "data")


@pytest.fixture()
def torch_threads():
    """Restore torch's thread count after a test that sets it (the CLI's --threads does)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _data(plates: Path):
    cfg = TrainConfig.from_dict(TRAIN)
    targets = read_targets(["P1", "P2"], targets_dir=plates / "classic")
    return load_training_data(plates / "tiles", ["P1", "P2"], targets, cfg, seed=0)


def test_workers_never_exceed_the_cores_compute_leaves(torch_threads):
    torch.set_num_threads(2)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # CPU: torch's 2 threads use both of 2 cores -> batches are read in the training process
    assert loader_workers(8, cores=2, device=cpu) == 0
    assert loader_workers(8, cores=5, device=cpu) == 3  # 5 cores - 2 compute threads
    # GPU: one core drives the GPU, the rest may read
    assert loader_workers(8, cores=2, device=cuda) == 1
    assert loader_workers(8, cores=4, device=cuda) == 3
    assert loader_workers(8, cores=16, device=cuda) == 8  # never more than asked for
    assert loader_workers(0, cores=16, device=cuda) == 0
    assert loader_workers(8, cores=1, device=cuda) == 0


def test_cli_threads_cap_the_configured_workers(plates, tmp_path, caplog, torch_threads):
    config = {"model": MODEL, "train": {**TRAIN, "epochs_stage1": 1, "epochs_stage2": 0, "num_workers": 8}}
    args = ["train", "--tiles-dir", str(plates / "tiles"), "--plates", "P1", "P2"]
    args += ["--targets-dir", str(plates / "classic"), "--config-json", json.dumps(config)]
    with caplog.at_level(logging.INFO, logger="phenoprofiler_core.train"):
        assert cli.main([*args, "--threads", "2", "--out", str(tmp_path / "m")]) == 0
    assert torch.get_num_threads() == 2
    assert (
        "reading batches with 0 DataLoader worker(s) (train.num_workers 8; 2 core(s), compute on cpu uses 2)"
        in (caplog.text)
    )


def test_worker_count_does_not_change_the_weights(plates, tmp_path, caplog):
    digests = {}
    for workers in (0, 2):
        with caplog.at_level(logging.INFO, logger="phenoprofiler_core.train"):
            paths = train_model(
                plates / "tiles",
                ["P1", "P2"],
                tmp_path / f"w{workers}",
                model_options=MODEL,  # dropout on: the random stream must not depend on the workers
                train_options={**TRAIN, "num_workers": workers},
                targets_dir=plates / "classic",
                seed=0,
                cores=torch.get_num_threads() + workers,  # room for the workers beside compute
            )
        assert f"reading batches with {workers} DataLoader worker(s)" in caplog.text
        digests[workers] = [
            weights_digest(torch.load(paths[s], weights_only=False)["model_state"])
            for s in ("stage1", "stage2")
        ] + [paths["history"].read_text()]
    assert digests[0] == digests[2]


def test_workers_persist_across_passes_and_stop_on_close(plates):
    data = _data(plates)
    batches = TrainingBatches(data, workers=2, device=torch.device("cpu"), ctx=DistContext())
    seen = []
    for plan in ([[0, 1], [2, 3]], [[4, 5, 6]], [[7, 8], [9, 10]]):  # e.g. train, validation, train
        items, counts = batches.start_pass(plan)
        got = [batch[0].shape[0] for batch in items]
        assert got == [len(b) for b in plan] and counts == [[len(b)] for b in plan]
        seen.append(sorted(p.pid for p in multiprocessing.active_children()))
    assert len(seen[0]) == 2 and seen[0] == seen[1] == seen[2]  # the same two worker processes
    del items  # the loop's iterator is gone once a pass ends, as in training
    batches.close()
    assert not [p for p in multiprocessing.active_children() if p.pid in seen[0]]


def test_batches_hold_the_stored_tiles_in_order_and_storage_type(plates):
    data = _data(plates)
    batches = TrainingBatches(data, workers=0, device=torch.device("cpu"), ctx=DistContext())
    wanted = [5, 0, 12, 3]
    items, _ = batches.start_pass([wanted])
    images, targets, labels = next(items)
    assert images.dtype == torch.float16 and images.shape == (4, 5, 32, 32)
    for position, k in enumerate(wanted):
        stored = np.load(plates / "tiles" / f"{data.plate_of[k]}.npy")[data.row_of[k]]
        assert np.array_equal(images[position].numpy(), stored)
    assert np.array_equal(targets.numpy(), data.targets[wanted])
    assert np.array_equal(labels.numpy(), data.labels[wanted])


@pytest.mark.parametrize(("dtype", "full_range"), [(torch.uint8, 255), (torch.uint16, 65535)])
def test_integer_tiles_become_floats_on_the_device_as_numpy_divides(dtype, full_range):
    """Every value of the storage type, exhaustively: x / full range in float32 (numpy's float32
    division, what tiles.dtype documents)."""
    values = np.arange(full_range + 1)
    stored = torch.from_numpy(values.astype({torch.uint8: np.uint8, torch.uint16: np.uint16}[dtype]))
    batch = (stored.reshape(1, 1, 1, -1), torch.zeros(1, 2), torch.zeros(1, dtype=torch.int64))
    images, _, _ = batch_to_device(batch, torch.device("cpu"))
    expected = values.astype(np.float32) / np.float32(full_range)
    assert images.dtype == torch.float32
    assert np.array_equal(images.numpy().ravel(), expected)
    assert images.min() == 0 and images.max() == 1


def test_plates_stored_in_different_types_are_named(plates):
    tiles = np.load(plates / "tiles" / "P2.npy")
    np.save(plates / "tiles" / "P2.npy", (tiles.astype(np.float32) * 255).astype(np.uint8))
    with pytest.raises(
        DataError, match=r"differ in dtype between plates: \{'P1': 'float16', 'P2': 'uint8'\}"
    ):
        TrainingBatches(_data(plates), workers=0, device=torch.device("cpu"), ctx=DistContext())
