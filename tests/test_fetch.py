"""phenoprofiler fetch against a local S3-compatible server (moto, on 127.0.0.1, a free port).

The bucket holds a tiny copy of the demo layout (2 plates x 1 well x 1 site x 5 channels of
resources/demo, plus its plate maps) under the same kind of prefix the Gallery uses.  No test touches
the internet: every client is pointed at the loopback endpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import loopback_s3

from phenoprofiler_core import cli
from phenoprofiler_core.config import validate_config
from phenoprofiler_core.errors import DataError
from phenoprofiler_core.fetch import expand_globs, fetch, fetch_dataset
from phenoprofiler_core.manifest import build_manifest

pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

BUCKET = "cellpainting-gallery"
PREFIX = "cpg0004-lincs/broad/images/2016_04_01_a549_48hr_batch1/images/"
META_PREFIX = "cpg0004-lincs/broad/workspace/metadata/platemaps/2016_04_01_a549_48hr_batch1/"
PLATES = ["SQ00015198", "SQ00015230"]
PUBLIC = {"ACL": "public-read"}
SITE_FILES = [f"r01c01f01p01-ch{c}sk1fk1fl1.png" for c in range(1, 6)]  # well A01 (DMSO), site 1


@pytest.fixture(scope="module")
def s3(repo_root):
    """A moto S3 server on loopback holding the tiny demo copy; yields its endpoint URL."""
    with loopback_s3(BUCKET) as (endpoint, client):
        yield from _fill_bucket(repo_root, endpoint, client)


def _fill_bucket(repo_root, endpoint, client):
    demo = repo_root / "resources" / "demo"
    for plate in PLATES:
        for name in SITE_FILES:
            client.upload_file(
                str(demo / "images" / plate / name), BUCKET, f"{PREFIX}{plate}/{name}", ExtraArgs=PUBLIC
            )
    client.put_object(
        Bucket=BUCKET,
        Key=f"{PREFIX}SQ00099999/r01c01f01p01-ch1sk1fk1fl1.png",
        Body=b"not wanted",
        ACL="public-read",
    )
    client.put_object(
        Bucket=BUCKET, Key=f"{PREFIX}{PLATES[0]}/thumbs/small.png", Body=b"thumbnail", ACL="public-read"
    )
    for name in ("barcode_platemap_rows.csv", "C-7161-01-LM6-014.txt"):
        client.upload_file(str(demo / "metadata" / name), BUCKET, f"{META_PREFIX}{name}", ExtraArgs=PUBLIC)
    yield endpoint


def _config(repo_root: Path, tmp: Path, endpoint: str, **fetch_extra) -> dict:
    raw = yaml.safe_load((repo_root / "config" / "demo.yaml").read_text())
    raw["results"] = str(tmp / "results")
    raw["images"]["root"] = str(tmp / "data" / "images")
    raw["images"]["plates"] = PLATES
    raw["metadata"]["barcode_platemap"] = str(tmp / "data" / "metadata" / "barcode_platemap_rows.csv")
    raw["metadata"]["platemap_dir"] = str(tmp / "data" / "metadata")
    raw["metadata"]["treatments"] = str(repo_root / raw["metadata"]["treatments"])
    raw["fetch"] = {
        "activate": True,
        "source": f"s3://{BUCKET}/{PREFIX}",
        "include": ["{plate}/*.png"],
        "exclude": ["*/thumbs/*"],
        "metadata": [{"source": f"s3://{BUCKET}/{META_PREFIX}", "dest": str(tmp / "data" / "metadata")}],
        "endpoint_url": endpoint,
        "workers": 4,
        **fetch_extra,
    }
    return validate_config(raw, source="test")


def test_expand_globs():
    assert expand_globs(["{plate}/*.png", "x"], ["P1", "P2"]) == ["P1/*.png", "P2/*.png", "x"]
    assert expand_globs(["{plate}/*"], []) == ["*/*"]


def test_fetch_mirrors_selected_objects_byte_for_byte(repo_root, tmp_path, s3):
    listing = fetch(
        f"s3://{BUCKET}/{PREFIX}",
        tmp_path / "images",
        include=["{plate}/*.png"],
        exclude=["*/thumbs/*"],
        plates=PLATES,
        endpoint_url=s3,
        workers=4,
    )
    assert len(listing) == 10 and set(listing.action) == {"downloaded"}
    for plate in PLATES:
        for name in SITE_FILES:
            assert (tmp_path / "images" / plate / name).read_bytes() == (
                repo_root / "resources/demo/images" / plate / name
            ).read_bytes()
    assert not (tmp_path / "images" / "SQ00099999").exists()  # plate not asked for
    assert not list((tmp_path / "images").rglob("thumbs"))  # excluded
    assert not list((tmp_path / "images").rglob(".*tmp*"))  # no temporary leftovers


def test_fetch_resumes_skipping_complete_files(tmp_path, s3):
    dest = tmp_path / "images"
    kwargs = dict(
        include=["{plate}/*.png"], exclude=["*/thumbs/*"], plates=PLATES[:1], endpoint_url=s3, workers=2
    )
    fetch(f"s3://{BUCKET}/{PREFIX}", dest, **kwargs)
    # an interrupted download: a truncated file, and a stray temp file from a killed run
    broken = dest / PLATES[0] / SITE_FILES[2]
    good = broken.read_bytes()
    broken.write_bytes(good[:100])
    (dest / PLATES[0] / f".{SITE_FILES[0]}.abc.tmp.png").write_bytes(b"partial")
    untouched = dest / PLATES[0] / SITE_FILES[0]
    mtime = untouched.stat().st_mtime_ns
    listing = fetch(f"s3://{BUCKET}/{PREFIX}", dest, **kwargs).set_index("key")
    assert listing.loc[f"{PLATES[0]}/{SITE_FILES[2]}", "action"] == "downloaded"
    assert (listing.action == "skipped").sum() == 4
    assert broken.read_bytes() == good
    assert untouched.stat().st_mtime_ns == mtime  # complete files are not rewritten


def test_fetch_from_local_root_needs_no_network(repo_root, tmp_path):
    # a local mirror of the bucket: <local_root>/<key>
    mirror = tmp_path / "mirror"
    for plate in PLATES:
        for name in SITE_FILES:
            target = mirror / PREFIX / plate / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((repo_root / "resources/demo/images" / plate / name).read_bytes())
    dest = tmp_path / "images"
    listing = fetch(
        f"s3://{BUCKET}/{PREFIX}",
        dest,
        plates=PLATES,
        local_root=str(mirror),
        endpoint_url="http://127.0.0.1:9",
    )  # would fail if any request were made
    assert len(listing) == 10 and set(listing.action) == {"linked"}
    assert (dest / PLATES[0] / SITE_FILES[0]).is_symlink()
    again = fetch(f"s3://{BUCKET}/{PREFIX}", dest, plates=PLATES, local_root=str(mirror))
    assert set(again.action) == {"skipped"}
    copied = fetch(str(mirror / PREFIX), tmp_path / "copy", plates=PLATES[:1], link="copy")
    assert (
        set(copied.action) == {"copied"} and not (tmp_path / "copy" / PLATES[0] / SITE_FILES[0]).is_symlink()
    )


def test_empty_selection_names_source_and_globs(tmp_path, s3):
    with pytest.raises(DataError, match=r"nothing under s3://cellpainting-gallery/.*NOPLATE"):
        fetch(f"s3://{BUCKET}/{PREFIX}", tmp_path, plates=["NOPLATE"], include=["{plate}/*"], endpoint_url=s3)


def test_fetch_dataset_then_manifest(repo_root, tmp_path, s3):
    """Images + plate maps fetched per the config's fetch section give a valid manifest."""
    config = _config(repo_root, tmp_path, s3)
    listing = fetch_dataset(config)
    assert (listing.set == "metadata").sum() == 2 and (listing.set == "images").sum() == 10
    manifest = build_manifest(config)
    assert len(manifest) == 2 and set(manifest.Metadata_Plate) == set(PLATES)
    assert set(manifest.Metadata_pert_type) == {"negcon"}  # A01 is a DMSO well
    assert all(Path(p).is_file() for p in manifest.Path_DNA)


def test_cli_fetch_writes_listing_last(repo_root, tmp_path, s3, capsys):
    config = _config(repo_root, tmp_path, s3)
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    out = tmp_path / "files.tsv"
    assert cli.main(["fetch", "--configfile", str(configfile), "--out", str(out)]) == 0
    listing = pd.read_csv(out, sep="\t")
    assert len(listing) == 12 and {"key", "path", "size", "action"} <= set(listing.columns)
    # the same with explicit options, as a user types it (a subprocess: the real console script)
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "phenoprofiler"),
            "fetch",
            "--source",
            f"s3://{BUCKET}/{PREFIX}",
            "--dest",
            str(tmp_path / "again"),
            "--plate",
            PLATES[1],
            "--include",
            "{plate}/*.png",
            "--endpoint-url",
            s3,
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "again" / PLATES[1]).glob("*.png"))) == 5


def test_cli_error_is_one_line(tmp_path, s3, capsys):
    code = cli.main(
        ["fetch", "--source", f"s3://{BUCKET}/nope/", "--dest", str(tmp_path), "--endpoint-url", s3]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "phenoprofiler fetch: error: fetch: nothing under s3://cellpainting-gallery/nope/" in err


def test_workflow_plans_fetch_before_manifest(repo_root, tmp_path, s3):
    """With fetch.activate the plan starts with the fetch job, though no image is on disk yet."""
    config = _config(repo_root, tmp_path, s3)
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    bin_dir = str(Path(sys.executable).parent)
    result = subprocess.run(
        [
            f"{bin_dir}/snakemake",
            str(tmp_path / "results/demo/manifest.parquet"),
            "-n",
            "--cores",
            "1",
            "--configfile",
            str(configfile),
        ],
        cwd=repo_root,
        capture_output=True,
        text=True,
        env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = result.stdout + result.stderr
    assert "rule fetch:" in jobs and "checkpoint manifest:" in jobs  # the manifest finds the plates


def test_list_browses_one_level(s3, capsys):
    assert cli.main(["fetch", "--list", f"s3://{BUCKET}/{PREFIX}", "--endpoint-url", s3]) == 0
    out = capsys.readouterr().out.split()
    assert {"SQ00015198/", "SQ00015230/", "SQ00099999/"} <= set(out)


@pytest.mark.slow
def test_workflow_fetches_then_builds_manifest_and_tiles(repo_root, tmp_path, s3):
    """The real chain: rule fetch (from the loopback S3) -> manifest -> illumination -> tiles."""
    config = _config(repo_root, tmp_path, s3)
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    results = tmp_path / "results" / "demo"
    bin_dir = str(Path(sys.executable).parent)
    targets = [str(results / "manifest.parquet")] + [str(results / "tiles" / f"{p}.npy") for p in PLATES]
    result = subprocess.run(
        [f"{bin_dir}/snakemake", *targets, "--cores", "2", "--configfile", str(configfile)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    listing = pd.read_csv(results / "fetch" / "files.tsv", sep="\t")
    assert len(listing) == 12 and set(listing.action) == {"downloaded"}
    manifest = pd.read_parquet(results / "manifest.parquet")
    assert len(manifest) == 2 and all(
        p.startswith(str(tmp_path / "data" / "images")) for p in manifest.Path_DNA
    )
    import numpy as np

    assert np.load(results / "tiles" / f"{PLATES[0]}.npy").shape == (1, 5, 448, 448)


# ----------------------------------------------------------------------------- hostile keys (issue 12)

HOSTILE_BUCKET = "hostile-bucket"


def _hostile_bucket(endpoint: str, keys: list[str]) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    try:
        client.create_bucket(Bucket=HOSTILE_BUCKET, ACL="public-read")
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    for obj in client.list_objects_v2(Bucket=HOSTILE_BUCKET).get("Contents", []):
        client.delete_object(Bucket=HOSTILE_BUCKET, Key=obj["Key"])
    for key in keys:
        client.put_object(Bucket=HOSTILE_BUCKET, Key=key, Body=b"payload", ACL="public-read")
    listed = {o["Key"] for o in client.list_objects_v2(Bucket=HOSTILE_BUCKET).get("Contents", [])}
    assert listed == set(keys), "the S3 server changed the keys: the test would not test anything"


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("data/P1/../../../escaped.png", "'..' segment"),
        ("data/../escaped.png", "'..' segment"),
        ("data//etc/escaped.png", "absolute"),
        ("data/P1/..", "'..' segment"),
        ("data/P1\\..\\..\\escaped.png", "backslash"),
    ],
)
def test_fetch_refuses_keys_that_leave_the_destination(tmp_path, s3, key, why):
    # a harmless object first: the refusal must come before *any* file is written
    _hostile_bucket(s3, ["data/P1/a.png", key])
    dest = tmp_path / "box" / "images"
    with pytest.raises(DataError, match=why) as error:
        fetch(f"s3://{HOSTILE_BUCKET}/data/", dest, endpoint_url=s3, workers=2)
    assert repr(key[len("data/") :]) in str(error.value)  # names the offending key
    assert not (tmp_path / "box" / "escaped.png").exists() and not (tmp_path / "escaped.png").exists()
    assert not list(tmp_path.rglob("escaped.png"))
    assert not dest.exists() or not any(p.is_file() for p in dest.rglob("*"))


def test_fetch_refuses_a_symlinked_folder_inside_the_destination(tmp_path, s3):
    """A folder in dest that links elsewhere (left by a user or an earlier tool) is not written through."""
    _hostile_bucket(s3, ["data/P1/a.png"])
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "images"
    dest.mkdir()
    (dest / "P1").symlink_to(outside, target_is_directory=True)
    with pytest.raises(DataError, match="resolves outside"):
        fetch(f"s3://{HOSTILE_BUCKET}/data/", dest, endpoint_url=s3, workers=1)
    assert not list(outside.iterdir())


def test_local_mode_refuses_links_pointing_out_of_local_root(tmp_path):
    mirror = tmp_path / "mirror" / "prefix"
    (mirror / "P1").mkdir(parents=True)
    (mirror / "P1" / "good.png").write_bytes(b"ok")
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the dataset")
    (mirror / "P1" / "bad.png").symlink_to(secret)
    dest = tmp_path / "images"
    with pytest.raises(DataError, match="outside the local source folder") as error:
        fetch(str(mirror), dest)
    assert "bad.png" in str(error.value)
    assert not dest.exists() or not list(dest.rglob("*.png"))
    # without the hostile link the same mirror is linked normally
    (mirror / "P1" / "bad.png").unlink()
    listing = fetch(str(mirror), dest)
    assert list(listing.action) == ["linked"]
    assert (dest / "P1" / "good.png").read_bytes() == b"ok"


def test_contained_target_rules(tmp_path):
    from phenoprofiler_core.fetch import contained_target

    assert contained_target("P1/r01c01f01p01-ch1sk1fk1fl1.png", tmp_path, origin="key") == (
        tmp_path / "P1" / "r01c01f01p01-ch1sk1fk1fl1.png"
    )
    assert contained_target("a..b/c..png", tmp_path, origin="key") == tmp_path / "a..b" / "c..png"
    for bad in ["", "/etc/passwd", "C:/x.png", "C:\\x.png", "a/../../b", "..", "a/\x00b"]:
        with pytest.raises(DataError, match="refusing key"):
            contained_target(bad, tmp_path, origin="key")
