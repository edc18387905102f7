import re

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


def _images(layout="phenix", **images):
    return {
        "dataset": "t",
        "channels": ["DNA", "ER"],
        "images": {"root": "x", "layout": layout, **images},
    }


@pytest.mark.parametrize(
    "keys",
    [(1, 2), ("1", "2"), ("ch1", "ch2"), ("w1", "w2"), ("01", "CH02"), ("c1", "W2")],
    ids=str,
)
def test_channel_map_keys_normalize_to_the_channel_number(keys):
    config = validate_config(_images(channel_map={keys[0]: "DNA", keys[1]: "ER"}))
    assert config["images"]["channel_map"] == {"1": "DNA", "2": "ER"}


@pytest.mark.parametrize(
    "layout,key",
    [
        ("phenix", "DNA"),
        ("phenix", "ch 1"),
        ("phenix", "5.0"),
        ("imagexpress", "w1x"),
        ("loaddata", "Orig DNA"),
    ],
)
def test_channel_map_key_no_layout_token_matches_fails_naming_forms(layout, key):
    extra = {"loaddata": "ld.csv"} if layout == "loaddata" else {}
    config = _images(layout, channel_map={key: "DNA", "2": "ER"}, **extra)
    with pytest.raises(
        ConfigError, match=rf"images\.channel_map': key '{re.escape(key)}' .*layout '{layout}'; write"
    ):
        validate_config(config)


def test_channel_map_names_and_loaddata_suffixes_are_kept():
    pattern = r"(?P<well>[A-P]\d\d)_s(?P<site>\d)_(?P<channel>\w+)\.tif"
    config = validate_config(_images("pattern", pattern=pattern, channel_map={"Hoechst": "DNA", "ch2": "ER"}))
    assert config["images"]["channel_map"] == {"Hoechst": "DNA", "2": "ER"}
    config = validate_config(
        _images("loaddata", loaddata="ld.csv", channel_map={"OrigDNA": "DNA", "OrigER": "ER"})
    )
    assert config["images"]["channel_map"] == {"OrigDNA": "DNA", "OrigER": "ER"}


def test_channel_map_clashes_fail():
    with pytest.raises(ConfigError, match=r"keys 1 and 'ch1' both mean channel 1"):
        validate_config(_images(channel_map={1: "DNA", "ch1": "ER"}))
    with pytest.raises(ConfigError, match=r"channels '1' and '2' both map to 'DNA'"):
        validate_config(_images(channel_map={"1": "DNA", "2": "DNA", "3": "ER"}))


def test_pattern_is_checked_at_validation():
    with pytest.raises(ConfigError, match=r"images\.pattern' is not a valid regex"):
        validate_config(_images("pattern", pattern="(?P<well>[A-P", channel_map={"1": "DNA", "2": "ER"}))
    with pytest.raises(ConfigError, match=r"lacks the named group\(s\) \['site'\]"):
        validate_config(
            _images("pattern", pattern=r"(?P<well>\w+)_(?P<channel>\d)", channel_map={"1": "DNA", "2": "ER"})
        )
    with pytest.raises(ConfigError, match=r"images\.plate' and a plate group"):
        validate_config(
            _images(
                "pattern",
                pattern=r"(?P<plate>\w+)/(?P<well>\w+)_s(?P<site>\d)_(?P<channel>\d)",
                plate="P1",
                channel_map={"1": "DNA", "2": "ER"},
            )
        )


def test_new_keys_have_their_defaults(demo):
    config = validate_config(demo)
    assert config["metadata"]["plate_column"] == "plate"
    assert config["metadata"]["missing_wells"] == "warn"
    assert config["images"]["header_check_max"] == 20000
    assert (config["illumination"]["min_sites"], config["illumination"]["max_ratio"]) == (50, 3.0)
    assert config["cells"]["save_masks"] is False
    demo["metadata"]["missing_wells"] = "ignore"
    with pytest.raises(ConfigError, match=r"metadata\.missing_wells"):
        validate_config(demo)
