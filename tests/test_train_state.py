"""Resume state of ``phenoprofiler train``: only the latest epoch is kept, its size is bounded by the
model and optimizer it holds, and a kill while it is being written leaves the previous epoch usable."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from phenoprofiler_core.model import create_model
from phenoprofiler_core.train import TrainingInterrupted, train_model

sys.path.insert(0, str(Path(__file__).parent))
from test_train import MODEL, TRAIN, make_plates


@pytest.fixture()
def plates(tmp_path) -> Path:
    return make_plates(tmp_path / "data")


def _train(plates: Path, out: Path, train: dict, **kw):
    return train_model(
        plates / "tiles",
        ["P1", "P2"],
        out,
        model_options=MODEL,
        train_options={**TRAIN, **train},
        targets_dir=plates / "classic",
        seed=0,
        **kw,
    )


def _same_weights(a: Path, b: Path) -> bool:
    sa = torch.load(a, weights_only=False)["model_state"]
    sb = torch.load(b, weights_only=False)["model_state"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _model_and_adamw_bytes() -> int:
    """Bytes of the weights (parameters + buffers) and of AdamW's state: two moments (exp_avg,
    exp_avg_sq) of every parameter's shape and dtype (torch.optim.AdamW's documented algorithm)."""
    model = create_model(
        MODEL, in_channels=5, num_classes=4, target_dim=8
    )  # make_plates: 4 treatments, 8 targets
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return params + buffers + 2 * params


def test_only_the_latest_epoch_is_kept_within_twice_model_and_optimizer(plates, tmp_path, caplog):
    train = {"epochs_stage1": 3, "epochs_stage2": 4}
    out = tmp_path / "m"
    with pytest.raises(TrainingInterrupted):
        _train(plates, out, train, stop_after_epochs=2)  # 2 epochs into stage 1
    assert [p.name for p in (out / "state").iterdir()] == ["stage1_last.pt"]
    with pytest.raises(TrainingInterrupted):
        _train(plates, out, train, stop_after_epochs=4)  # stage 1 done, 3 epochs into stage 2
    assert (out / "stage1.pt").is_file()
    assert [p.name for p in (out / "state").iterdir()] == ["stage2_last.pt"]  # stage 1's state is gone

    size = (out / "state" / "stage2_last.pt").stat().st_size
    bound = _model_and_adamw_bytes()
    print(f"resume state {size} bytes; model + AdamW state {bound} bytes")
    assert bound <= size <= 2 * bound  # a whole resume state (weights and optimizer), nothing older
    saved = torch.load(out / "state" / "stage2_last.pt", weights_only=False)
    assert saved["stage"] == 2 and saved["epoch"] == 2  # 0-based: the third stage-2 epoch

    with caplog.at_level(logging.INFO, logger="phenoprofiler_core.train"):
        resumed = _train(plates, out, train)
    assert "resuming stage 2 at epoch 3" in caplog.text
    assert not (out / "state").exists()  # training finished: no resume state left behind
    reference = _train(plates, tmp_path / "reference", train)
    for stage in ("stage1", "stage2"):
        assert _same_weights(reference[stage], resumed[stage]), stage


# Trains like _train, but writes the second epoch's resume state slowly (half of it, then waits to
# be killed), so the test can kill the job in the middle of that write.
SLOW_WRITE = """
import io, sys, time, json
from pathlib import Path
import torch
from phenoprofiler_core import train_state
from phenoprofiler_core.train import train_model

plates, out, marker, config = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), json.loads(sys.argv[4])
real_save = torch.save

def slow_save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("format") == train_state.RESUME_FORMAT and obj["epoch"] == 1:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        with open(f, "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
            marker.write_text(str(f))
            time.sleep(600)
    return real_save(obj, f, *args, **kwargs)

torch.save = slow_save
train_model(plates / "tiles", ["P1", "P2"], out, model_options=config["model"],
            train_options=config["train"], targets_dir=plates / "classic", seed=0)
"""


def test_kill_during_the_state_write_leaves_the_previous_epoch_usable(plates, tmp_path, caplog):
    train = {**TRAIN, "epochs_stage1": 3, "epochs_stage2": 1}
    out, marker = tmp_path / "killed", tmp_path / "writing"
    script = tmp_path / "slow_write.py"
    script.write_text(SLOW_WRITE)
    config = json.dumps({"model": MODEL, "train": train})
    job = subprocess.Popen(
        [sys.executable, str(script), str(plates), str(out), str(marker), config],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not marker.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    assert marker.exists(), "the job never began writing its second epoch's state"
    half_written = Path(marker.read_text())
    assert half_written.exists() and half_written.parent == out / "state"
    assert half_written.name != "stage1_last.pt"  # written beside the state, never over it
    previous = torch.load(out / "state" / "stage1_last.pt", weights_only=False)
    assert previous["epoch"] == 0  # the first epoch's state is whole and readable

    with caplog.at_level(logging.INFO, logger="phenoprofiler_core.train"):
        resumed = _train(plates, out, train)
    assert "resuming stage 1 at epoch 1" in caplog.text
    assert not half_written.exists() and not (out / "state").exists()
    reference = _train(plates, tmp_path / "reference", train)
    for stage in ("stage1", "stage2"):
        assert _same_weights(reference[stage], resumed[stage]), stage
