"""What evaluation reads from a results directory: the rows of its committed shards (every
column but the image), and the images of chosen rows.

Only top-level part-*.parquet shards that `ResultStore.scan` finds whole count; a file that
is unreadable, of another schema or foreign is skipped and named, and nothing in RESULTS is
moved or deleted. The frames and paths returned are plain data for `evals`. RESULTS may be
an object-store URI (s3://bucket/results/): the shards are then named by URI, and read through
pyarrow's filesystem for it.
"""

from __future__ import annotations

import os

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from evals import files
from evals.messages import listing, reason
from pipelines.errors import InputError
from pipelines.storage.results import ResultStore

# Columns evaluation reads from every shard (besides the image): a part-*.parquet without
# them cannot be evaluated even if it has the columns every results shard has.
EVAL_COLUMNS = ("sample_id", "status", "prompt", "seed", "model", "gen_seconds")


def _is_dir(store: ResultStore) -> bool:
    return store.fs.get_file_info(store.root).type == pafs.FileType.Directory


def committed_shards(directory: str) -> list[str]:
    """The committed shards of a results directory (paths, or URIs when `directory` is one);
    [] for anything else (a directory of image files, a file, a path that does not exist)."""
    if not (files.is_uri(directory) or os.path.isdir(directory)):
        return []
    try:
        store = ResultStore(directory)
        return [files.as_uri(directory, p) for p in store.scan().good] if _is_dir(store) else []
    except (OSError, ValueError, pa.ArrowException):  # an unreachable bucket: the caller names it
        return []


def read_results(results: str) -> tuple[pd.DataFrame, list[str], list[tuple[str, str]]]:
    """Every column but the image from the committed shards (ResultStore.scan().good), the
    shards read, and the files skipped (path, why): unreadable, another schema, foreign."""
    store = ResultStore(results if files.is_uri(results) else os.path.normpath(results))
    if not _is_dir(store):
        raise InputError(f"RESULTS {results}: not a results directory (no such directory)")
    scan = store.scan()
    shown = lambda path: files.join(results, files.basename(path))  # noqa: E731
    skipped = [(shown(path), why) for path, why in scan.bad]
    skipped += [(shown(path), "not a results shard (not named part-*.parquet)") for path in scan.foreign]
    frames, good = [], []
    for path in scan.good:
        lacking = [c for c in EVAL_COLUMNS if c not in scan.columns[path]]  # from the footer scan() read
        if lacking:
            skipped.append((shown(path), f"not a results shard (no {', '.join(lacking)} column)"))
            continue
        try:
            frames.append(pq.read_table(path, columns=[c for c in scan.columns[path] if c != "image"],
                                        filesystem=store.fs).to_pandas())
        except (OSError, pa.ArrowException) as e:
            skipped.append((shown(path), f"unreadable ({reason(e)})"))
            continue
        good.append(files.as_uri(results, path))
    if not good:
        why = f"; skipped: {listing([f'{p} ({w})' for p, w in skipped])}" if skipped else ""
        raise InputError(f"RESULTS {results}: not a results directory (no readable part-*.parquet shards "
                         f"from jobs/generate.py{why})")
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    return df, good, skipped


def read_images(shards: list[str], sample_ids: list[str]) -> dict[str, bytes]:
    """sample_id -> PNG bytes for the given rows, read from the committed shards one by one;
    a shard that went bad since it was scanned leaves a gap, not an error."""
    images = {}
    for path in shards if sample_ids else []:
        try:
            fs, where = files.resolve(path)
            table = pq.read_table(where, columns=["sample_id", "image"], filters=[("sample_id", "in", sample_ids)],
                                  filesystem=fs)
        except (OSError, pa.ArrowException):
            continue
        images.update(zip(table.column("sample_id").to_pylist(), table.column("image").to_pylist()))
    return images
