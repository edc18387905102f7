"""Loading the published PhenoProfiler checkpoint layout into our model.

The released weights cannot be downloaded here, so a state dict with the published key list and
shapes (``../shared/reference/phenoprofiler_checkpoint_keys.tsv``, copied to
``tests/data/phenoprofiler_checkpoint_keys.tsv`` when absent) is filled with random tensors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from phenoprofiler_core.checkpoint import load_published, published_model, unwrap_state_dict
from phenoprofiler_core.errors import DataError
from phenoprofiler_core.model import create_model, paper_model_config

REPO = Path(__file__).resolve().parents[1]
KEY_FILES = [
    REPO / "tests" / "data" / "phenoprofiler_checkpoint_keys.tsv",
    REPO.parent / "shared" / "reference" / "phenoprofiler_checkpoint_keys.tsv",
]


@pytest.fixture(scope="module")
def key_table() -> list[tuple[str, tuple[int, ...], str]]:
    path = next((p for p in KEY_FILES if p.is_file()), None)
    if path is None:
        pytest.skip(f"published key list not found in {[str(p) for p in KEY_FILES]}")
    rows = []
    for line in path.read_text().splitlines()[1:]:
        key, shape, dtype = line.split("\t")
        rows.append((key, () if shape == "scalar" else tuple(int(s) for s in shape.split("x")), dtype))
    assert len(rows) == 357
    return rows


@pytest.fixture(scope="module")
def published_state(key_table) -> dict[str, torch.Tensor]:
    """Random tensors of the published names/shapes (valid BN variances, so outputs are finite)."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape, dtype in key_table:
        if dtype == "int64":
            state[key] = torch.tensor(7, dtype=torch.int64)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.02
    return state


@pytest.fixture(scope="module")
def paper_model():
    return create_model(paper_model_config(), in_channels=5, num_classes=2913)


def test_paper_architecture_has_exactly_the_published_keys(key_table, paper_model):
    ours = [
        (k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in paper_model.state_dict().items()
    ]
    assert ours == key_table


def test_full_key_list_loads_and_gives_the_same_output(published_state, paper_model):
    loaded = load_published(paper_model, published_state)
    reference = create_model(paper_model_config(), in_channels=5, num_classes=2913)
    reference.load_state_dict(published_state, strict=True)  # torch's own strict loader as the oracle
    reference.eval()
    x = torch.rand(2, 5, 64, 64)
    with torch.inference_mode():
        assert torch.equal(loaded(x), reference(x))
    assert not loaded.training


def test_module_prefix_and_wrapper_are_accepted(published_state):
    prefixed = {f"module.{k}": v for k, v in published_state.items()}
    assert unwrap_state_dict(prefixed).keys() == published_state.keys()
    assert unwrap_state_dict({"state_dict": prefixed, "epoch": 3}).keys() == published_state.keys()
    with pytest.raises(DataError, match="expected a state dict"):
        unwrap_state_dict({"epoch": 3})


def test_mismatched_checkpoint_is_rejected_naming_the_keys(published_state, paper_model):
    bad = dict(published_state)
    del bad["image_encoder.conv.branch2.1.running_mean"]
    bad["image_encoder.extra.weight"] = torch.zeros(3)
    bad["image_projection.fc.weight"] = torch.zeros(672, 671)
    with pytest.raises(DataError) as info:
        load_published(paper_model, bad)
    message = str(info.value)
    assert "image_encoder.conv.branch2.1.running_mean" in message
    assert "image_encoder.extra.weight" in message
    assert "image_projection.fc.weight" in message and "(672, 671)" in message


def test_published_model_from_file_sizes_the_classifier(published_state, tmp_path):
    small = dict(published_state)
    small["classifier.weight"] = torch.randn(10, 672)
    small["classifier.bias"] = torch.randn(10)
    path = tmp_path / "PhenoProfiler.pt"
    torch.save({"model": small}, path)
    model = published_model(path)
    assert model.classifier.out_features == 10
    assert torch.equal(model.image_projection.fc.weight, small["image_projection.fc.weight"])
    # A 3-channel model cannot take 5-channel weights: named mis-shaped key.
    with pytest.raises(DataError, match=r"branch1\.0\.conv\.weight"):
        published_model(path, in_channels=3)
