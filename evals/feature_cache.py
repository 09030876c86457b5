"""Per-image features cached on disk or in a bucket (s3://, gs://), keyed by (sample_id,
everything that changes them).

Extracting features is the expensive part of an evaluation; the statistics are cheap. So
each extractor's features live in their own folder, named clean-fid style by extractor,
resize mode and image size, then a digest of the rest of its description (feature
dimension, image-processor variant, weights): a retrained CLIP, or transformers building a
torchvision image processor instead of the PIL one, gets a new folder instead of stale
features. The folder holds Parquet shards (sample_id, features). Re-evaluating, or comparing
against a new reference, reads them instead of recomputing.

A shard is written in the folder's `_staging/` subfolder and renamed into place (on an
object store: one PUT, whole or invisible), so a glob of `<key>/*.parquet` (or
`<key>/part-*.parquet`) only ever sees whole shards. Older versions staged under a hidden
`.staging-` name beside the shards; those leftovers are never read. A cache shard that cannot be read is skipped (its features are computed again)
and named in `bad`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from evals import files

STAGING_DIR = "_staging"


_READABLE = ("extractor", "resize_mode", "image_size")  # spelled out in the folder name
_WEIGHT_SUFFIXES = (".json", ".safetensors", ".txt")  # what HFCLIPExtractor reads from its directory


def cache_key(describe: dict) -> str:
    """Folder name for an extractor's features, e.g. 'embedded-clip-processor-64-1a2b3c4d5e':
    extractor, resize mode and image size, then a digest of every other field of `describe`
    (dim, image_processor, weights, ...), so that anything that changes the features changes
    the folder."""
    raw = "-".join(str(describe[k]) for k in _READABLE)
    rest = {k: describe[k] for k in sorted(describe) if k not in _READABLE}
    if rest:
        raw += "-" + hashlib.sha256(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw)


def files_digest(paths) -> str:
    """sha256 (first 12 hex digits) of the files' names and contents: the identity of a model's
    weights that survives copying and re-cloning (an mtime would not)."""
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]


def hf_image_processor_backend(model_dir: Path) -> str:
    """The image processor `CLIPProcessor.from_pretrained(model_dir)` builds here: 'torchvision'
    or 'pil'. Their resizes differ, and so do the features. transformers 5 picks torchvision
    whenever it imports; transformers 4 the saved class (a '...Fast' one is torchvision).
    Read without building the processor (that costs seconds; cached features need none)."""
    import transformers
    from transformers.utils import is_torchvision_available

    if int(transformers.__version__.split(".")[0]) >= 5:
        return "torchvision" if is_torchvision_available() else "pil"
    saved = ""
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (model_dir / name).is_file():
            doc = json.loads((model_dir / name).read_text())
            saved = doc.get("image_processor_type") or doc.get("image_processor", {}).get("image_processor_type")
            saved = str(saved or "")
            break
    return "torchvision" if saved.endswith("Fast") and is_torchvision_available() else "pil"


def feature_description(extractor, weights_file: str | Path | None = None) -> dict:
    """`extractor.describe()` plus what else changes its features: `image_processor` (how
    images become model input) and `weights` (a digest of the model files; the Inception
    weights are checked against their published sha256 on load, so they are named by it).
    `weights_file`: the checkpoint of an extractor that does not keep its path (open_clip)."""
    desc = dict(extractor.describe())
    model_dir = getattr(extractor, "path", None)
    if desc["resize_mode"] == "clip-processor" and model_dir is not None:
        model_dir = Path(model_dir)
        desc["image_processor"] = hf_image_processor_backend(model_dir)
        files = [p for p in model_dir.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES]
        desc["weights"] = files_digest(files)
    elif desc["extractor"] == "inception":
        from evals.inception import WEIGHTS_SHA256_PREFIX

        desc["image_processor"] = "pil"  # clean-fid's clean resize: PIL bicubic per channel
        desc["weights"] = f"pt_inception sha256 {WEIGHTS_SHA256_PREFIX}"
    else:  # open_clip: its preprocess transform on PIL images
        desc["image_processor"] = "open_clip"
        weights_file = getattr(extractor, "weights_file", None) or weights_file  # a model directory's checkpoint
        if weights_file is not None:
            desc["weights"] = files_digest([weights_file])
    return desc


class FeatureCache:
    """One extractor's features under `root`/`key`; `root` is a local directory or an
    object-store URI (evals.files)."""

    def __init__(self, root: str | Path, key: str):
        self.dir = files.join(root, key)
        self.fs, self._fs_dir = files.resolve(self.dir)
        self.bad: dict[str, str] = {}  # path -> why, shards skipped because they cannot be read
        self._tables: dict[str, pa.Table] = {}

    def _files(self) -> list[str]:
        return [i.path for i in files.list_files(self.dir)
                if i.base_name.startswith("part-") and i.base_name.endswith(".parquet")]

    def _read(self) -> list[pa.Table]:
        """Every readable shard (read once per FeatureCache; shards are never rewritten)."""
        tables = []
        for path in self._files():
            if files.as_uri(self.dir, path) in self.bad:
                continue
            if path not in self._tables:
                try:
                    table = pq.read_table(path, columns=["sample_id", "features"], filesystem=self.fs)
                    if not pa.types.is_fixed_size_list(table.schema.field("features").type):
                        raise ValueError("column 'features' is not a fixed-size list")
                except (OSError, pa.ArrowException, KeyError, ValueError) as e:
                    self.bad[files.as_uri(self.dir, path)] = " ".join(str(e).split())[:120]
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
        """Commit one shard atomically (on a local disk written in _staging/, then renamed
        into place; on an object store one PUT, which no reader sees half done)."""
        if len(sample_ids) == 0:
            return
        features = np.asarray(features, dtype=np.float32)
        flat = pa.array(features.reshape(-1))
        table = pa.table({
            "sample_id": pa.array(sample_ids, pa.string()),
            "features": pa.FixedSizeListArray.from_arrays(flat, features.shape[1]),
        })
        name = f"part-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
        final = f"{self._fs_dir}/{name}"
        if not isinstance(self.fs, pafs.LocalFileSystem):
            pq.write_table(table, final, filesystem=self.fs)
            return
        staging_dir = Path(self._fs_dir) / STAGING_DIR
        staging_dir.mkdir(parents=True, exist_ok=True)
        staging = staging_dir / name
        pq.write_table(table, staging)
        staging.rename(final)
