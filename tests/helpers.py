"""Small generators of realistic-looking test images and dataset folders (no external data)."""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image


def cell_image(
    shape=(96, 96), n_cells=12, seed=0, dtype=np.uint16, background=200.0, peak=3000.0
) -> np.ndarray:
    """Gaussian blobs ('nuclei') on a noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = np.full(shape, background, np.float64)
    for _ in range(n_cells):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        r = rng.uniform(3, 7)
        image += peak * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    image += rng.normal(0, background * 0.05, shape)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "ui" else None
    if info is not None:
        if info.max == 255:
            image = image / image.max() * 250
        return np.clip(image, 0, info.max).astype(dtype)
    return image.astype(dtype)


def save(image: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in {".tif", ".tiff"}:
        tifffile.imwrite(path, image)
    else:
        Image.fromarray(image).save(path)
    return path


def write_phenix_plate(
    root: Path,
    plate: str,
    wells=("A01", "B02"),
    sites=(1, 2),
    channels=5,
    suffix=".png",
    dtype=np.uint8,
    shape=(64, 64),
    seed=0,
):
    """Opera Phenix names: <plate>/r01c01f01p01-ch1sk1fk1fl1.png"""
    k = seed
    for well in wells:
        row, col = ord(well[0]) - ord("A") + 1, int(well[1:])
        for site in sites:
            for ch in range(1, channels + 1):
                k += 1
                save(
                    cell_image(shape, seed=k, dtype=dtype),
                    root / plate / f"r{row:02d}c{col:02d}f{site:02d}p01-ch{ch}sk1fk1fl1{suffix}",
                )


def write_imagexpress_plate(
    root: Path,
    plate: str,
    wells=("A01", "B02"),
    sites=(1, 2),
    channels=5,
    suffix=".tif",
    dtype=np.uint16,
    shape=(64, 64),
    seed=0,
):
    """ImageXpress names: <plate>/<prefix>_A01_s2_w1<UUID>.tif"""
    k = seed
    for well in wells:
        for site in sites:
            for ch in range(1, channels + 1):
                k += 1
                name = f"{plate}_{well}_s{site}_w{ch}{str(uuid.UUID(int=k)).upper()}{suffix}"
                save(cell_image(shape, seed=k, dtype=dtype), root / plate / name)


def write_platemap(folder: Path, plate: str, wells: dict[str, str], map_name="MAP-1") -> dict:
    """barcode_platemap.csv + <map>.txt; returns the `metadata` config section."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "barcode_platemap.csv").write_text(f"Assay_Plate_Barcode,Plate_Map_Name\n{plate},{map_name}\n")
    lines = ["plate_map_name\twell_position\tbroad_sample"] + [
        f"{map_name}\t{w}\t{t}" for w, t in wells.items()
    ]
    (folder / f"{map_name}.txt").write_text("\n".join(lines) + "\n")
    return {
        "barcode_platemap": str(folder / "barcode_platemap.csv"),
        "platemap_dir": str(folder),
        "well_column": "well_position",
        "treatment_column": "broad_sample",
        "negcon": ["DMSO"],
    }


@contextlib.contextmanager
def loopback_s3(bucket: str = "cellpainting-gallery"):
    """A moto S3 server on 127.0.0.1 (a free port) with one public-read bucket, like the Gallery:
    yields (endpoint URL, boto3 client allowed to upload).  Nothing leaves the machine."""
    import logging
    import os

    import boto3
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")  # moto wants some credentials for uploads
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log lines in test output
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        client.create_bucket(Bucket=bucket, ACL="public-read")  # anonymous reads, as on the Gallery
        yield endpoint, client
    finally:
        server.stop()


def upload_tree(client, folder: Path, prefix: str, bucket: str = "cellpainting-gallery") -> list[str]:
    """Upload every file below ``folder`` under ``prefix`` (public-read); returns the keys."""
    keys = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = prefix + path.relative_to(folder).as_posix()
        client.upload_file(str(path), bucket, key, ExtraArgs={"ACL": "public-read"})
        keys.append(key)
    return keys
