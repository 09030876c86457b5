"""Per-image features cached on disk, keyed by (sample_id, extractor).

Extracting features is the expensive part of an evaluation; the statistics are cheap. So
each extractor's features live in their own folder, named clean-fid style by extractor,
resize mode and image size, as Parquet shards (sample_id, features). Re-evaluating, or
comparing against a new reference, reads them instead of recomputing.
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def cache_key(describe: dict) -> str:
    """Folder name for an extractor's features, e.g. 'embedded-clip_pil-64'."""
    raw = f"{describe['extractor']}-{describe['resize_mode']}-{describe['image_size']}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw)


class FeatureCache:
    def __init__(self, root: str | Path, key: str):
        self.dir = Path(root) / key

    def ids(self) -> set[str]:
        files = self._files()
        return set(pq.read_table(files, columns=["sample_id"]).column(0).to_pylist()) if files else set()

    def _files(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.parquet"))

    def load(self, sample_ids: list[str]) -> np.ndarray:
        """Features in the order of `sample_ids` (all must be cached), as float64 [n, dim]."""
        if not sample_ids:
            return np.zeros((0, 0))
        files = self._files()
        if not files:
            raise KeyError(f"no cached features in {self.dir}")
        table = pq.read_table(files)
        position = {sid: i for i, sid in enumerate(table.column("sample_id").to_pylist())}
        missing = [s for s in sample_ids if s not in position]
        if missing:
            raise KeyError(f"{len(missing)} sample_ids have no cached features in {self.dir} (e.g. {missing[0]})")
        col = table.column("features").combine_chunks()
        dim = col.type.list_size
        flat = col.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
        return flat[[position[s] for s in sample_ids]].astype(np.float64)

    def add(self, sample_ids: list[str], features: np.ndarray) -> None:
        """Commit one shard atomically (staging name, then rename)."""
        if len(sample_ids) == 0:
            return
        features = np.asarray(features, dtype=np.float32)
        self.dir.mkdir(parents=True, exist_ok=True)
        flat = pa.array(features.reshape(-1))
        table = pa.table({
            "sample_id": pa.array(sample_ids, pa.string()),
            "features": pa.FixedSizeListArray.from_arrays(flat, features.shape[1]),
        })
        name = f"part-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
        staging = self.dir / f".staging-{name}"
        pq.write_table(table, staging)
        staging.rename(self.dir / name)
