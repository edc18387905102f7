import pytest
import yaml

from phenoprofiler_core.config import load_config, validate_config
from phenoprofiler_core.errors import ConfigError


@pytest.fixture()
def demo(repo_root):
    with open(repo_root / "config" / "demo.yaml") as handle:
        return yaml.safe_load(handle)


def test_demo_config_validates_and_gets_defaults(demo):
    config = validate_config(demo)
    assert config["tiles"]["size"] == 448
    assert config["illumination"]["downsample"] == 0.2
    assert config["results"] == "results"


def test_every_config_file_validates(repo_root):
    for path in sorted((repo_root / "config").glob("*.yaml")):
        load_config(path)  # raises on any problem


def test_typo_fails_naming_the_key(demo):
    demo["tiles"] = {"sise": 448}
    with pytest.raises(ConfigError, match=r"tiles\.sise"):
        validate_config(demo)


def test_wrong_type_and_range_fail_naming_the_key(demo):
    demo["tiles"] = {"size": "big"}
    with pytest.raises(ConfigError, match=r"tiles\.size"):
        validate_config(demo)
    demo["tiles"] = {"size": 448}
    demo["illumination"] = {"downsample": 3}
    with pytest.raises(ConfigError, match=r"illumination\.downsample"):
        validate_config(demo)


def test_unknown_channel_fails(demo):
    demo["channels"] = ["DNA", "ER", "RNA", "AGP", "Mitochondria"]
    with pytest.raises(ConfigError, match="Mitochondria"):
        validate_config(demo)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
