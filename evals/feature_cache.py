"""Per-image features cached on disk, keyed by (sample_id, extractor).

Extracting features is the expensive part of an evaluation; the statistics are cheap. So
each extractor's features live in their own folder, named clean-fid style by extractor,
resize mode and image size, as Parquet shards (sample_id, features). Re-evaluating, or
comparing against a new reference, reads them instead of recomputing.

A shard is written in the folder's `_staging/` subfolder and renamed into place, so a glob
of `<key>/*.parquet` (or `<key>/part-*.parquet`) only ever sees whole shards. Older
versions staged under a hidden `.staging-` name beside the shards; those leftovers are
never read. A cache shard that cannot be read is skipped (its features are computed again)
and named in `bad`.
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

STAGING_DIR = "_staging"


def cache_key(describe: dict) -> str:
    """Folder name for an extractor's features, e.g. 'embedded-clip_pil-64'."""
    raw = f"{describe['extractor']}-{describe['resize_mode']}-{describe['image_size']}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw)


class FeatureCache:
    def __init__(self, root: str | Path, key: str):
        self.dir = Path(root) / key
        self.bad: dict[str, str] = {}  # path -> why, shards skipped because they cannot be read
        self._tables: dict[Path, pa.Table] = {}

    def _files(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.parquet"))

    def _read(self) -> list[pa.Table]:
        """Every readable shard (read once per FeatureCache; shards are never rewritten)."""
        tables = []
        for path in self._files():
            if str(path) in self.bad:
                continue
            if path not in self._tables:
                try:
                    table = pq.read_table(path, columns=["sample_id", "features"])
                    if not pa.types.is_fixed_size_list(table.schema.field("features").type):
                        raise ValueError("column 'features' is not a fixed-size list")
                except (OSError, pa.ArrowException, KeyError, ValueError) as e:
                    self.bad[str(path)] = " ".join(str(e).split())[:120]
                    continue
                self._tables[path] = table
            tables.append(self._tables[path])
        return tables

    def ids(self) -> set[str]:
        return {s for t in self._read() for s in t.column("sample_id").to_pylist()}

    def load(self, sample_ids: list[str]) -> np.ndarray:
        """Features in the order of `sample_ids` (all must be cached), as float64 [n, dim]."""
        if not sample_ids:
            return np.zeros((0, 0))
        tables = self._read()
        if not tables:
            raise KeyError(f"no cached features in {self.dir}")
        position, blocks = {}, []
        offset = 0
        for t in tables:
            col = t.column("features").combine_chunks()
            blocks.append(col.values.to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size))
            for i, sid in enumerate(t.column("sample_id").to_pylist()):
                position[sid] = offset + i
            offset += t.num_rows
        missing = [s for s in sample_ids if s not in position]
        if missing:
            raise KeyError(f"{len(missing)} sample_ids have no cached features in {self.dir} (e.g. {missing[0]})")
        dims = {b.shape[1] for b in blocks}
        if len(dims) > 1:
            raise KeyError(f"cached features in {self.dir} have different dimensions {sorted(dims)}")
        return np.concatenate(blocks)[[position[s] for s in sample_ids]].astype(np.float64)

    def add(self, sample_ids: list[str], features: np.ndarray) -> None:
        """Commit one shard atomically (written in _staging/, then renamed into place)."""
        if len(sample_ids) == 0:
            return
        features = np.asarray(features, dtype=np.float32)
        staging_dir = self.dir / STAGING_DIR
        staging_dir.mkdir(parents=True, exist_ok=True)
        flat = pa.array(features.reshape(-1))
        table = pa.table({
            "sample_id": pa.array(sample_ids, pa.string()),
            "features": pa.FixedSizeListArray.from_arrays(flat, features.shape[1]),
        })
        name = f"part-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
        staging = staging_dir / name
        pq.write_table(table, staging)
        staging.rename(self.dir / name)
