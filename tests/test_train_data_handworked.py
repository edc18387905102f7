"""Training data against values worked out on paper: splits by plate or treatment (no leakage),
target z-scores from the training sites only, pairing of tiles with their site's target.

Every expected number is written out in the comments (tiny tables, means and population standard
deviations one can check by hand); nothing is taken from the code under test.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from phenoprofiler_core.errors import ConfigError, DataError
from phenoprofiler_core.train_config import TrainConfig
from phenoprofiler_core.train_data import (
    SITE_KEYS,
    _attach_targets,
    _plate_split,
    _standardize_targets,
    _treatment_split,
    choose_validation,
    image_to_float,
    load_training_data,
    normalise_keys,
    plate_file,
    read_targets,
)

# ----------------------------------------------------------------------------- storage types


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.array([0, 51, 255], np.uint8), [0.0, 0.2, 1.0]),  # / 255
        (np.array([0, 13107, 65535], np.uint16), [0.0, 0.2, 1.0]),  # / 65535
        (np.array([-0.5, 0.25, 2.0], np.float16), [-0.5, 0.25, 2.0]),  # floats pass as they are
        (np.array([0.1, 3.0], np.float64), [0.1, 3.0]),
    ],
)
def test_image_to_float_by_hand(array, expected):
    got = image_to_float(array)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np.array(expected, np.float32), rtol=1e-7)


def test_image_to_float_rejects_other_types():
    with pytest.raises(DataError, match=r"unsupported dtype int32; expected float16/32, uint8 or uint16"):
        image_to_float(np.zeros(3, np.int32))


# ----------------------------------------------------------------------------- files and keys


def test_plate_file_finds_the_one_folder_that_has_it(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (b / "P1.npy").write_bytes(b"")
    assert plate_file([a, b], "P1", ".npy") == b / "P1.npy"
    assert plate_file(str(b), "P1", ".npy") == b / "P1.npy"
    assert plate_file([a, b], "P9", ".npy") == a / "P9.npy"  # nowhere: the first folder's path
    (a / "P1.npy").write_bytes(b"")
    with pytest.raises(DataError, match=r"plate P1 is in more than one folder.*a/P1\.npy.*b/P1\.npy"):
        plate_file([a, b], "P1", ".npy")


def test_normalise_keys_makes_one_type_per_key():
    df = pd.DataFrame({"Metadata_Plate": [1, 2], "Metadata_Well": [101, 202], "Metadata_Site": ["3", "10"]})
    out = normalise_keys(df)
    assert out["Metadata_Plate"].tolist() == ["1", "2"]
    assert out["Metadata_Well"].tolist() == ["101", "202"]  # numbered wells become strings too
    assert out["Metadata_Site"].tolist() == [3, 10] and out["Metadata_Site"].dtype == np.int64
    assert df["Metadata_Site"].tolist() == ["3", "10"]  # the caller's table is left alone


def target_table(**features) -> pd.DataFrame:
    keys = pd.DataFrame([("P1", "A01", 1), ("P1", "A01", 2), ("P2", "A01", 1)], columns=SITE_KEYS)
    return keys.assign(**features)


def test_read_targets_keeps_numeric_non_metadata_columns(tmp_path):
    table = target_table(Metadata_Count=[4, 5, 6], f1=[1.0, 2.0, 3.0], label=["a", "b", "c"], f2=[7, 8, 9])
    csv = tmp_path / "t.tsv"
    table.to_csv(csv, sep="\t", index=False)  # the separator is sniffed
    out = read_targets(["P1", "P2"], targets=str(csv))
    assert list(out.columns) == SITE_KEYS + ["f1", "f2"]
    assert out["f2"].tolist() == [7, 8, 9] and out["Metadata_Site"].tolist() == [1, 2, 1]
    parquet = tmp_path / "t.parquet"
    table.to_parquet(parquet)
    assert read_targets(["P1"], targets=str(parquet)).equals(out)
    per_plate = tmp_path / "per_plate"
    per_plate.mkdir()
    for plate, part in table.groupby("Metadata_Plate"):
        part.to_parquet(per_plate / f"{plate}.parquet")
    from_dir = read_targets(["P2", "P1"], targets_dir=per_plate)
    assert from_dir["Metadata_Plate"].tolist() == ["P2", "P1", "P1"]  # plate by plate, in the order asked
    assert from_dir["f1"].tolist() == [3.0, 1.0, 2.0]


def test_read_targets_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.targets: file not found"):
        read_targets(["P1"], targets=str(tmp_path / "absent.csv"))
    with pytest.raises(DataError, match=r"regression targets for plate P1 not found: .*P1\.parquet"):
        read_targets(["P1"], targets_dir=tmp_path)
    with pytest.raises(ConfigError, match="no regression targets"):
        read_targets(["P1"])
    path = tmp_path / "t.parquet"
    target_table(f1=[1.0, 2.0, 3.0]).drop(columns="Metadata_Site").to_parquet(path)
    with pytest.raises(DataError, match=r"missing key column\(s\) \['Metadata_Site'\]"):
        read_targets(["P1"], targets=str(path))
    target_table(name=["a", "b", "c"], Metadata_x=[1, 2, 3]).to_parquet(path)
    with pytest.raises(DataError, match="no numeric feature columns"):
        read_targets(["P1"], targets=str(path))
    dup = target_table(f1=[1.0, 2.0, 3.0])
    dup.loc[2, ["Metadata_Plate", "Metadata_Site"]] = ["P1", 2]
    dup.to_parquet(path)
    # plain numbers in the message (a list of numpy 2 scalars would print np.int64(2))
    with pytest.raises(DataError, match=r"duplicate site plate P1, well A01, site 2$"):
        read_targets(["P1"], targets=str(path))


# ----------------------------------------------------------------------------- validation split


def items(plates, labels=None, pert_types=None) -> pd.DataFrame:
    df = pd.DataFrame({"Metadata_Plate": plates})
    df["_label"] = labels if labels is not None else ["t"] * len(plates)
    if pert_types is not None:
        df["Metadata_pert_type"] = pert_types
    return df


def cfg(**options) -> TrainConfig:
    return TrainConfig.from_dict(options)


@pytest.mark.parametrize(
    "n_plates, fraction, n_val",
    [
        (5, 0.2, 1),  # round(1.0)
        (10, 0.35, 4),  # round(3.5) = 4
        (10, 0.25, 2),  # round(2.5) = 2 (Python rounds half to even)
        (3, 0.1, 1),  # round(0.3) = 0 -> at least one
        (2, 0.9, 1),  # round(1.8) = 2 -> never all: 2 - 1
        (4, 0.5, 2),
        (10, 0.9, 9),  # 9 of 10 drawn with replacement would repeat a plate almost surely (p = .9964)
    ],
)
def test_plate_split_sizes(n_plates, fraction, n_val):
    plates = [f"P{k}" for k in range(n_plates)]
    table = items(plates * 2)  # two items per plate
    val = _plate_split(table, cfg(val_fraction=fraction), np.random.default_rng(0))
    assert len(val) == n_val and len(set(val)) == n_val and set(val) <= set(plates)
    assert val == sorted(val)


def test_plate_split_is_seeded():
    table = items([f"P{k}" for k in range(10)])
    draws = [tuple(_plate_split(table, cfg(val_fraction=0.3), np.random.default_rng(s))) for s in range(6)]
    assert draws[0] == tuple(_plate_split(table, cfg(val_fraction=0.3), np.random.default_rng(0)))
    assert len(set(draws)) > 1  # the seed chooses which plates (C(10, 3) = 120 choices)


def test_named_validation_plates():
    table = items(["P2", "P1", "P3", "P1"])
    assert _plate_split(table, cfg(val_plates=["P3", "P1"]), np.random.default_rng(0)) == ["P1", "P3"]
    with pytest.raises(
        ConfigError, match=r"plate\(s\) \['P9'\] are not among the training plates \['P1', 'P2', 'P3'\]"
    ):
        _plate_split(table, cfg(val_plates=["P1", "P9"]), np.random.default_rng(0))
    with pytest.raises(ConfigError, match="leaves no plate for training"):
        _plate_split(table, cfg(val_plates=["P1", "P2", "P3"]), np.random.default_rng(0))
    with pytest.raises(ConfigError, match=r"at least 2 plates, got \['P1'\]"):
        _plate_split(items(["P1", "P1"]), cfg(val_fraction=0.5), np.random.default_rng(0))


def test_treatment_split_never_takes_controls():
    # 4 treatments besides the control: round(0.5 * 4) = 2 validation treatments
    labels = ["dmso", "a", "b", "c", "d", "dmso", "a"]
    pert = ["negcon", "trt", "trt", "trt", "trt", "negcon", "trt"]
    table = items(["P1"] * 7, labels, pert)
    for seed in range(8):
        val = _treatment_split(table, cfg(split="treatment", val_fraction=0.5), np.random.default_rng(seed))
        assert len(val) == 2 and "dmso" not in val and set(val) <= {"a", "b", "c", "d"} and val == sorted(val)
    # never all: 0.9 * 2 = 1.8 -> 2 -> 2 - 1 = 1; at least one: 0.1 * 2 = 0.2 -> 0 -> 1
    two = items(["P1"] * 3, ["dmso", "a", "b"], ["negcon", "trt", "trt"])
    for fraction in (0.9, 0.1):
        assert (
            len(
                _treatment_split(two, cfg(split="treatment", val_fraction=fraction), np.random.default_rng(0))
            )
            == 1
        )
    many = items(["P1"] * 11, ["dmso"] + [f"t{k}" for k in range(10)], ["negcon"] + ["trt"] * 10)
    val = _treatment_split(many, cfg(split="treatment", val_fraction=0.9), np.random.default_rng(0))
    assert len(set(val)) == 9  # drawn without replacement
    one = items(["P1"] * 3, ["dmso", "a", "a"], ["negcon", "trt", "trt"])
    with pytest.raises(ConfigError, match=r"at least 2 non-control treatments, got \['a'\]"):
        _treatment_split(one, cfg(split="treatment"), np.random.default_rng(0))
    # without a pert_type column every label is a candidate
    plain = items(["P1"] * 2, ["dmso", "a"])
    assert (
        len(_treatment_split(plain, cfg(split="treatment", val_fraction=0.5), np.random.default_rng(0))) == 1
    )


def test_choose_validation_marks_whole_plates_or_whole_treatments():
    table = items(["P1", "P2", "P1", "P3", "P2"], ["a", "b", "c", "a", "b"], ["trt"] * 5)
    is_val, info = choose_validation(table, cfg(val_plates=["P2"], val_fraction=0.0), seed=0)
    assert is_val.tolist() == [False, True, False, False, True]
    assert info == {"split": "plate", "validation": ["P2"]}
    is_val, info = choose_validation(table, cfg(val_fraction=0.0), seed=0)
    assert is_val.dtype == bool and not is_val.any() and info == {"split": "none"}
    is_val, info = choose_validation(table, cfg(split="treatment", val_fraction=0.34), seed=0)
    # round(0.34 * 3) = 1 treatment; all of its items and nothing else
    assert info["split"] == "treatment" and len(info["validation"]) == 1
    assert is_val.tolist() == [label in info["validation"] for label in table["_label"]]
    is_val, info = choose_validation(table, cfg(val_fraction=0.34), seed=0)
    assert info["split"] == "plate" and len(info["validation"]) == 1  # round(0.34 * 3) = 1 plate
    assert is_val.tolist() == [p in info["validation"] for p in table["Metadata_Plate"]]


# ----------------------------------------------------------------------------- targets


def merged_table() -> pd.DataFrame:
    """Items of 4 sites; site (P1, A01, 1) holds two cells (two items, one site)."""
    rows = [
        ("P1", "A01", 1, 1.0, 10.0, 5.0, np.nan),
        ("P1", "A01", 1, 1.0, 10.0, 5.0, np.nan),
        ("P1", "A01", 2, 3.0, np.nan, 5.0, np.nan),
        ("P1", "A02", 1, 8.0, 30.0, 5.0, np.nan),
        ("P2", "A01", 1, 5.0, 50.0, 9.0, np.nan),
    ]
    table = pd.DataFrame(rows, columns=SITE_KEYS + ["f", "g", "const", "empty"])
    return table.assign(_row=[0, 1, 2, 3, 4])  # the two cells of a site are different items


def test_standardize_targets_by_hand():
    merged = merged_table()
    is_val = np.array([False, False, False, False, True])
    z, mean, std = _standardize_targets(merged, ["f", "g", "const", "empty"], is_val)
    # training sites (each once): f = 1, 3, 8 -> mean 4, population std sqrt((9 + 1 + 16)/3) = sqrt(26/3)
    # g = 10, NaN, 30 -> nanmean 20, nanstd 10;  const = 5, 5, 5 -> std 0;  empty: all NaN
    s = np.sqrt(26 / 3)
    np.testing.assert_allclose(mean, [4.0, 20.0, 5.0, 0.0])
    np.testing.assert_allclose(std[:2], [s, 10.0])
    assert np.isinf(std[2]) and np.isinf(std[3])  # scaled to 0 below
    expected = np.array(
        [
            [-3 / s, -1.0, 0.0, 0.0],
            [-3 / s, -1.0, 0.0, 0.0],
            [-1 / s, 0.0, 0.0, 0.0],  # NaN target -> 0
            [4 / s, 1.0, 0.0, 0.0],
            [1 / s, 3.0, 0.0, 0.0],  # validation: (5 - 4)/s, (50 - 20)/10; const 9 is still 0
        ]
    )
    assert z.dtype == np.float32
    np.testing.assert_allclose(z, expected, rtol=1e-6)


def test_infinite_targets_of_validation_sites_become_zero():
    merged = pd.DataFrame(
        [("P1", "A01", 1, 0.0), ("P1", "A02", 1, 2.0), ("P2", "A01", 1, np.inf), ("P2", "A02", 1, -np.inf)],
        columns=SITE_KEYS + ["f"],
    )
    z, mean, std = _standardize_targets(merged, ["f"], np.array([False, False, True, True]))
    np.testing.assert_array_equal(mean, [1.0]) and np.testing.assert_array_equal(std, [1.0])
    # training 0, 2: mean 1, std 1 -> -1, 1; +-inf (validation) -> 0 rather than +-inf or a huge number
    np.testing.assert_array_equal(z[:, 0], [-1.0, 1.0, 0.0, 0.0])


def test_raw_targets_when_not_standardized():
    merged = merged_table()
    z, mean, std = _standardize_targets(merged, ["f", "g"], np.zeros(5, bool), standardize=False)
    np.testing.assert_array_equal(z, np.array([[1, 10], [1, 10], [3, 0], [8, 30], [5, 50]], np.float32))
    assert z.dtype == np.float32
    np.testing.assert_array_equal(mean, [0.0, 0.0])
    np.testing.assert_array_equal(std, [1.0, 1.0])


def test_attach_targets_names_or_counts_sites_without_a_row():
    site_items = pd.DataFrame(
        [("P1", "A01", 1, 0), ("P1", "A01", 2, 1), ("P1", "A01", 2, 2), ("P1", "B01", 1, 3)],
        columns=SITE_KEYS + ["_row"],
    )
    table = pd.DataFrame([("P1", "A01", 1, 0.5), ("P1", "B01", 1, 1.5)], columns=SITE_KEYS + ["f"])
    with pytest.raises(
        DataError, match=r"2 cell\(s\) have no regression target row, e.g. .*\['P1', 'A01', 2\]\]"
    ):
        _attach_targets(site_items, table, "cell")
    kept, n_left_out = _attach_targets(site_items, table, "cell", missing="skip")
    assert n_left_out == 2
    assert kept["_row"].tolist() == [0, 3] and kept["f"].tolist() == [0.5, 1.5]
    complete, n_left_out = _attach_targets(site_items.iloc[[0, 3]], table, "site")
    assert n_left_out == 0 and complete["f"].tolist() == [0.5, 1.5]
    with pytest.raises(DataError, match=r"no site has a regression target row"):
        _attach_targets(site_items.iloc[[1, 2]], table, "site", missing="skip")


# ----------------------------------------------------------------------------- everything together


def write_plate(folder, plate, sites, treatments, channels=2, size=4):
    """Tiles whose first pixel is the row number (to check the pairing), and their index table."""
    folder.mkdir(exist_ok=True)
    tiles = np.zeros((len(sites), channels, size, size), np.float16)
    tiles[:, 0, 0, 0] = np.arange(len(sites))
    np.save(folder / f"{plate}.npy", tiles)
    table = pd.DataFrame(sites, columns=["Metadata_Well", "Metadata_Site"]).assign(
        Metadata_Plate=plate, Metadata_Treatment=treatments
    )
    table.to_parquet(folder / f"{plate}.sites.parquet", index=False)


def test_load_training_data_by_hand(tmp_path):
    tiles = tmp_path / "tiles"
    write_plate(tiles, "P1", [("A01", 1), ("A02", 1)], ["drug", "DMSO"])
    write_plate(tiles, "P2", [("A01", 1), ("B01", 1)], ["other", "drug"])
    targets = pd.DataFrame(
        [("P2", "B01", 1, 7.0), ("P1", "A01", 1, 1.0), ("P1", "A02", 1, 3.0), ("P2", "A01", 1, 9.0)],
        columns=SITE_KEYS + ["f"],
    )
    data = load_training_data(tiles, ["P1", "P2"], targets, cfg(level="site", val_plates=["P2"]), seed=0)
    assert data.plate_of.tolist() == ["P1", "P1", "P2", "P2"] and data.row_of.tolist() == [0, 1, 0, 1]
    assert data.is_val.tolist() == [False, False, True, True]  # all of P2, nothing of P1
    # training sites f = 1, 3: mean 2, population std 1 -> z = -1, 1 | validation (9 - 2), (7 - 2)
    np.testing.assert_allclose(data.targets[:, 0], [-1.0, 1.0, 7.0, 5.0])
    np.testing.assert_allclose(data.target_mean, [2.0]) and np.testing.assert_allclose(data.target_std, [1.0])
    assert data.classes == ["DMSO", "drug", "other"]  # sorted names
    assert data.labels.tolist() == [1, 0, 2, 1] and data.labels.dtype == np.int64
    assert data.target_columns == ["f"]
    assert (data.in_channels, data.image_size) == (2, 4)
    assert data.split_info == {
        "split": "plate",
        "validation": ["P2"],
        "n_train": 2,
        "n_validation": 2,
        "label_column": "Metadata_Treatment",
        "n_without_target": 0,
    }
    for i in range(4):  # each item is its plate's tile at its row
        assert data.images[data.plate_of[i]][data.row_of[i], 0, 0, 0] == data.row_of[i]


def test_a_constant_target_gets_std_zero_and_too_few_training_items_are_an_error(tmp_path):
    tiles = tmp_path / "tiles"
    write_plate(tiles, "P1", [("A01", 1), ("A02", 1)], ["drug", "DMSO"])
    write_plate(tiles, "P2", [("A01", 1)], ["drug"])
    targets = pd.DataFrame(
        [("P1", "A01", 1, 4.0), ("P1", "A02", 1, 4.0), ("P2", "A01", 1, 6.0)], columns=SITE_KEYS + ["f"]
    )
    data = load_training_data(tiles, ["P1", "P2"], targets, cfg(level="site", val_plates=["P2"]), seed=0)
    np.testing.assert_array_equal(data.target_std, [0.0])  # inf (constant on training) is stored as 0
    np.testing.assert_array_equal(data.targets[:, 0], [0.0, 0.0, 0.0])
    assert (data.split_info["n_train"], data.split_info["n_validation"]) == (2, 1)
    raw = load_training_data(
        tiles, ["P1", "P2"], targets, cfg(level="site", val_plates=["P2"], standardize_targets=False), seed=0
    )
    np.testing.assert_array_equal(raw.targets[:, 0], [4.0, 4.0, 6.0])
    # a site without a target row: an error by default, left out and counted with missing_targets: skip
    with pytest.raises(DataError, match=r"1 site\(s\) have no regression target row"):
        load_training_data(
            tiles, ["P1", "P2"], targets.iloc[:2], cfg(level="site", val_plates=["P1"]), seed=0
        )
    skipped = load_training_data(
        tiles,
        ["P1", "P2"],
        targets.iloc[1:],
        cfg(level="site", val_fraction=0.0, missing_targets="skip"),
        seed=0,
    )
    assert skipped.split_info["n_without_target"] == 1 and skipped.plate_of.tolist() == ["P1", "P2"]
    with pytest.raises(DataError, match=r"only 1 training item\(s\) after the plate split; need at least 2"):
        load_training_data(tiles, ["P1", "P2"], targets, cfg(level="site", val_plates=["P1"]), seed=0)


def test_the_seed_chooses_the_validation_plates(tmp_path):
    tiles = tmp_path / "tiles"
    plates = [f"P{k}" for k in range(6)]
    for plate in plates:
        write_plate(tiles, plate, [("A01", 1)], ["drug"])
    targets = pd.DataFrame([(p, "A01", 1, float(k)) for k, p in enumerate(plates)], columns=SITE_KEYS + ["f"])
    options = cfg(level="site", val_fraction=0.5)  # 3 of 6 plates: C(6, 3) = 20 possible splits
    first = load_training_data(tiles, plates, targets, options, seed=7).split_info["validation"]
    again = load_training_data(tiles, plates, targets, options, seed=7).split_info["validation"]
    table = pd.DataFrame({"Metadata_Plate": plates, "_label": ["drug"] * 6})
    assert first == again == choose_validation(table, options, seed=7)[1]["validation"]
