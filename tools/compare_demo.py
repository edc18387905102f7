"""Compare two demo results folders file by file: tiles, site features of every set, cell index.

    python tools/compare_demo.py OLD/results/demo NEW/results/demo

For "same outputs as before" checks after a refactor: run the demo with both versions of the code (an
older checkout in a git worktree) and compare.  Prints one row per file (identical, max |diff|).
"""

import sys
from pathlib import Path

import numpy as np
import pandas as pd

old, new = Path(sys.argv[1]), Path(sys.argv[2])
plates = sorted(p.stem for p in (old / "tiles").glob("*.npy"))
rows = []
for plate in plates:
    a, b = np.load(old / "tiles" / f"{plate}.npy"), np.load(new / "tiles" / f"{plate}.npy")
    rows.append(
        (
            "tiles",
            plate,
            a.shape == b.shape and np.array_equal(a, b),
            float(np.abs(a.astype(np.float64) - b).max()) if a.shape == b.shape else np.nan,
            "",
        )
    )
    for kind in ("classic", "untrained", "phenoprofiler_demo"):
        fa, fb = (
            pd.read_parquet(old / "features" / kind / f"{plate}.parquet"),
            pd.read_parquet(new / "features" / kind / f"{plate}.parquet"),
        )
        keys = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
        fa, fb = fa.sort_values(keys).reset_index(drop=True), fb.sort_values(keys).reset_index(drop=True)
        feats_a = [c for c in fa.columns if not c.startswith("Metadata_")]
        feats_b = [c for c in fb.columns if not c.startswith("Metadata_")]
        same_cols = feats_a == feats_b
        common = [c for c in feats_a if c in feats_b]
        x, y = fa[common].to_numpy(np.float64), fb[common].to_numpy(np.float64)
        equal = same_cols and x.shape == y.shape and np.array_equal(x, y, equal_nan=True)
        diff = float(np.nanmax(np.abs(x - y))) if x.shape == y.shape else np.nan
        meta = sorted(set(fa.columns) ^ set(fb.columns))
        rows.append((f"features/{kind}", plate, equal, diff, f"columns differing: {meta}" if meta else ""))
    ca, cb = old / "cells" / f"{plate}.cells.parquet", new / "cells" / f"{plate}.cells.parquet"
    if ca.exists() and cb.exists():
        a, b = pd.read_parquet(ca), pd.read_parquet(cb)
        common = [c for c in a.columns if c in b.columns]
        rows.append(
            ("cells index", plate, a[common].equals(b[common]), np.nan, f"{len(a)} vs {len(b)} cells")
        )
table = pd.DataFrame(rows, columns=["file", "plate", "identical", "max_abs_diff", "note"])
print(table.to_string(index=False))
print(table.groupby("file").identical.agg(["sum", "count"]).to_string())
