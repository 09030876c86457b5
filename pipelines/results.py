"""The results directory: committed Parquet shards plus `_run.json`.

Exactly-once output rests on two rules. A shard becomes visible only whole: it is
written under a hidden staging name and renamed (an object store's PUT is already
all-or-nothing, so there it is written in place). And a run starts by reading the
sample_ids of every committed shard and skips them. Files starting with "." or "_"
are ignored by pyarrow/pandas readers, so `pandas.read_parquet(out)` sees only results.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.errors import InputError
from pipelines.manifest import filesystem_and_path

RUN_FILE = "_run.json"
SHARD_PREFIX = "part-"


@dataclass
class ResultStore:
    uri: str

    def __post_init__(self):
        self.fs, self.root = filesystem_and_path(self.uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def exists(self) -> bool:
        return self.fs.get_file_info(self.root).type != pafs.FileType.NotFound

    def shard_paths(self) -> list[str]:
        if not self.exists():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False))
        return sorted(
            i.path for i in infos
            if i.type == pafs.FileType.File and i.base_name.startswith(SHARD_PREFIX) and i.base_name.endswith(".parquet")
        )

    def done_ids(self) -> set[str]:
        """sample_ids already committed (status ok or error)."""
        ids: set[str] = set()
        for path in self.shard_paths():
            ids.update(pq.read_table(path, columns=["sample_id"], filesystem=self.fs).column(0).to_pylist())
        return ids

    def drop_errors(self) -> int:
        """Remove status="error" rows from committed shards (each shard rewritten atomically),
        so the next run generates them again. Returns how many were removed."""
        removed = 0
        for path in self.shard_paths():
            status = pq.read_table(path, columns=["status"], filesystem=self.fs).column(0)
            n_err = sum(1 for s in status.to_pylist() if s != "ok")
            if not n_err:
                continue
            table = pq.read_table(path, filesystem=self.fs)
            kept = table.filter(pa.array([s == "ok" for s in table.column("status").to_pylist()]))
            if kept.num_rows:
                name = path.rsplit("/", 1)[-1]
                staging = self._path(f".staging-{name}") if self.local else path
                pq.write_table(kept, staging, filesystem=self.fs)
                if staging != path:
                    self.fs.move(staging, path)
            else:
                self.fs.delete_file(path)
            removed += n_err
        return removed

    def read_run(self) -> dict | None:
        path = self._path(RUN_FILE)
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())

    def write_run(self, record: dict) -> None:
        self._write_bytes(RUN_FILE, json.dumps(record, indent=2, default=str).encode())

    def prepare(self, manifest_digest: str, overwrite: bool) -> dict | None:
        """Make the directory ready; refuse to mix in results of another manifest.

        Returns the previous run record when resuming, else None.
        """
        self.fs.create_dir(self.root, recursive=True)
        self.remove_staging()
        previous = self.read_run()
        shards = self.shard_paths()
        if overwrite:
            for p in shards:
                self.fs.delete_file(p)
            if previous is not None:
                self.fs.delete_file(self._path(RUN_FILE))
            return None
        if previous is None and shards:
            raise InputError(
                f"--out {self.uri}: holds {len(shards)} result shard(s) but no {RUN_FILE}, so they cannot be "
                "matched to this manifest; use another --out or pass --overwrite"
            )
        if previous is not None and previous.get("manifest_digest") != manifest_digest:
            raise InputError(
                f"--out {self.uri}: holds results of a different manifest (digest {previous.get('manifest_digest')}, "
                f"this one {manifest_digest}); use another --out, or --overwrite to discard them"
            )
        return previous

    def remove_staging(self) -> None:
        """Delete half-written shards left by a run that died mid-write."""
        if not self.exists():
            return
        for i in self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False)):
            if i.base_name.startswith(".staging-"):
                self.fs.delete_file(i.path)

    def commit_shard(self, table: pa.Table, run_id: str, seq: int) -> str:
        """Write one shard atomically; returns its path."""
        name = f"{SHARD_PREFIX}{run_id}-{seq:05d}.parquet"
        final = self._path(name)
        if self.local:
            staging = self._path(f".staging-{name}")
            pq.write_table(table, staging, filesystem=self.fs)
            self.fs.move(staging, final)
        else:
            pq.write_table(table, final, filesystem=self.fs)
        return final

    def _write_bytes(self, name: str, data: bytes) -> None:
        path = self._path(name)
        staging = self._path(f".staging-{name}") if self.local else path
        with self.fs.open_output_stream(staging) as f:
            f.write(data)
        if staging != path:
            self.fs.move(staging, path)


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
