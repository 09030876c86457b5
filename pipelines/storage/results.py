"""The results directory: committed Parquet shards plus `_run.json`.

Exactly-once output rests on three rules.

- A shard becomes visible only whole: it is written in `_staging/` and renamed into place
  (an object store's PUT is already all-or-nothing, so there it is written in place). Readers
  of the directory (`pandas.read_parquet(out)`, a polars/duckdb glob of `out/*.parquet`) see
  committed `part-*.parquet` shards only: everything else this project keeps there lives under
  a name starting with "_" (`_run.json`, `_lease.json`, `_staging/`, `_quarantine/`,
  `_features/`), which pyarrow/pandas skip and a `*.parquet` glob does not match.
- A run starts by reading the sample_ids of every committed shard and skips them.
- One run at a time writes a directory: it holds a lease (`_lease.json`, see lease.py) and
  checks it before each commit.

A shard that cannot be read (truncated, corrupt, another program's Parquet under our name)
is never deleted: it is moved to `_quarantine/` and named in the run's output.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.errors import InputError, one_line
from pipelines.storage.lease import LEASE_FILE
from pipelines.storage.manifest import filesystem_and_path

RUN_FILE = "_run.json"
SHARD_PREFIX = "part-"
STAGING_DIR = "_staging"
QUARANTINE_DIR = "_quarantine"
# Shard names this project writes: part-<run id>-<seq>.parquet, run id as new_run_id() makes it.
OWN_SHARD = re.compile(r"part-\d{8}T\d{6}-[0-9a-f]{6}-\d{5}\.parquet")
# Columns every results shard has; a part-*.parquet without them is another program's file.
REQUIRED_COLUMNS = {"sample_id": pa.string(), "status": pa.string(), "image": pa.binary()}


@dataclass
class ShardScan:
    """What a results directory holds, by what a reader can do with it."""

    good: list[str] = field(default_factory=list)  # committed shards with the results columns
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, why) part-* files no reader can use
    foreign: list[str] = field(default_factory=list)  # other *.parquet files at the top level
    columns: dict[str, list[str]] = field(default_factory=dict)  # good shard -> its column names (from the footer)


@dataclass
class ResultStore:
    uri: str

    def __post_init__(self):
        self.fs, self.root = filesystem_and_path(self.uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def address(self) -> str:
        """Where another process (a Ray worker writing staged shards) finds this directory: the
        absolute path on local disk, else the URI."""
        return self.root if self.local else self.uri

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def exists(self) -> bool:
        return self.fs.get_file_info(self.root).type != pafs.FileType.NotFound

    def create(self) -> bool:
        """Create the directory (InputError naming --out if that is impossible). Returns
        whether it was created now."""
        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.Directory:
            return False
        if info.type != pafs.FileType.NotFound:
            raise InputError(f"--out {self.uri}: exists and is not a directory; expected a results directory")
        try:
            self.fs.create_dir(self.root, recursive=True)
            if self.local:  # a directory we cannot write into (read-only mount, /proc, ...)
                probe = self._path(f".diffsweep-probe-{uuid.uuid4().hex[:8]}")
                with open(probe, "wb"):
                    pass
                os.unlink(probe)
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"--out {self.uri}: cannot create a results directory there ({one_line(e)})") from None
        return True

    def remove_if_empty(self) -> None:
        """Undo create() when a run stops before writing anything (nothing but its lease)."""
        if not self.local or not os.path.isdir(self.root):
            return
        left = [n for n in os.listdir(self.root) if n not in (LEASE_FILE, STAGING_DIR)]
        if not left:
            import shutil

            shutil.rmtree(self.root, ignore_errors=True)

    def _top_files(self) -> list:
        if not self.exists():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False))
        return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)

    def shard_paths(self) -> list[str]:
        """Committed shards by name (part-*.parquet at the top level), readable or not."""
        return [i.path for i in self._top_files()
                if i.base_name.startswith(SHARD_PREFIX) and i.base_name.endswith(".parquet")]

    def scan(self) -> ShardScan:
        """Sort the directory's Parquet files into readable shards, unreadable ones and foreign
        files, from each file's footer (cheap: no data pages are read)."""
        out = ShardScan()
        for info in self._top_files():
            name = info.base_name
            if not name.endswith(".parquet"):
                continue
            if not name.startswith(SHARD_PREFIX):
                out.foreign.append(info.path)
                continue
            try:
                schema = pq.read_schema(info.path, filesystem=self.fs)
            except (OSError, pa.ArrowException) as e:
                out.bad.append((info.path, f"unreadable ({one_line(e, 120)})"))
                continue
            why = _not_results(schema)
            if why:
                out.bad.append((info.path, why))
            else:
                out.good.append(info.path)
                out.columns[info.path] = schema.names
        return out

    def quarantine(self, paths: list[str]) -> list[str]:
        """Move files aside into _quarantine/ (never delete them). Returns their new paths."""
        moved = []
        if paths:
            self.fs.create_dir(self._path(QUARANTINE_DIR), recursive=True)
        for path in paths:
            name = path.rsplit("/", 1)[-1]
            target = self._path(f"{QUARANTINE_DIR}/{name}")
            if self.fs.get_file_info(target).type != pafs.FileType.NotFound:
                target = self._path(f"{QUARANTINE_DIR}/{uuid.uuid4().hex[:8]}-{name}")
            self.fs.move(path, target)
            moved.append(target)
        return moved

    def done_ids(self, paths: list[str] | None = None) -> set[str]:
        """sample_ids already committed (status ok or error) in `paths` (default: every shard).
        Raises OSError/ArrowException naming the shard if one cannot be read."""
        ids: set[str] = set()
        for path in self.shard_paths() if paths is None else paths:
            ids.update(pq.read_table(path, columns=["sample_id"], filesystem=self.fs).column(0).to_pylist())
        return ids

    def read_committed(self, scan: ShardScan | None = None) -> tuple[set[str], list[tuple[str, str]]]:
        """The committed sample_ids, and the shards that could not be read for them
        (path, why); those are left where they are for the caller to set aside. `scan`:
        a scan() the caller already made of the directory as it is now."""
        scan = scan or self.scan()
        ids: set[str] = set()
        bad = list(scan.bad)
        for path in scan.good:
            try:
                ids.update(self.done_ids([path]))
            except (OSError, pa.ArrowException) as e:
                bad.append((path, f"unreadable ({one_line(e, 120)})"))
        return ids, bad

    def drop_errors(self) -> int:
        """Remove status="error" rows from committed shards (each shard rewritten atomically),
        so the next run generates them again. Returns how many were removed."""
        removed = 0
        for path in self.scan().good:
            status = pq.read_table(path, columns=["status"], filesystem=self.fs).column(0)
            n_err = sum(1 for s in status.to_pylist() if s != "ok")
            if not n_err:
                continue
            table = pq.read_table(path, filesystem=self.fs)
            kept = table.filter(pa.array([s == "ok" for s in table.column("status").to_pylist()]))
            if kept.num_rows:
                self._write_table(kept, path.rsplit("/", 1)[-1])
            else:
                self.fs.delete_file(path)
            removed += n_err
        return removed

    def read_run(self) -> dict | None:
        path = self._path(RUN_FILE)
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(path) as f:
            data = f.read()
        try:
            record = json.loads(data.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"--out {self.uri}: {RUN_FILE} is not valid JSON ({e}); move it aside to start over") from None
        if not isinstance(record, dict):
            raise InputError(f"--out {self.uri}: {RUN_FILE} is not a diffsweep run record (a JSON object)")
        return record

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
            if previous is None and shards:
                raise InputError(
                    f"--out {self.uri}: --overwrite refused: it holds {len(shards)} part-*.parquet file(s) but no "
                    f"{RUN_FILE}, so diffsweep did not write them (e.g. {shards[0].rsplit('/', 1)[-1]}); "
                    "use another --out or remove them yourself"
                )
            for p in shards:
                if OWN_SHARD.fullmatch(p.rsplit("/", 1)[-1]):
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
        """Delete half-written shards left by a run that died mid-write (only this project's
        staging folder, and the hidden staging names older versions used)."""
        if not self.exists():
            return
        staging = self._path(STAGING_DIR)
        if self.fs.get_file_info(staging).type == pafs.FileType.Directory:
            self.fs.delete_dir_contents(staging)
        for i in self._top_files():
            if i.base_name.startswith(".staging-"):
                self.fs.delete_file(i.path)

    def commit_shard(self, table: pa.Table, run_id: str, seq: int) -> str:
        """Write one shard atomically; returns its path."""
        return self._write_table(table, shard_name(run_id, seq))

    def stage_table(self, table: pa.Table) -> str:
        """Write a shard under _staging/ with a name of its own (a worker does this; readers
        never look there); returns its path for commit_staged or discard_staged."""
        path = self._staging_path("staged.parquet")
        pq.write_table(table, path, filesystem=self.fs)
        return path

    def commit_staged(self, staged: str, run_id: str, seq: int) -> str:
        """Make a staged shard visible under its final name, whole or not at all: a rename on
        local disk; on an object store (no rename) a server-side copy, then the staged copy is
        deleted (a run that dies between the two leaves only staging, which the next run's
        prepare() clears). Returns the committed path."""
        final = self._path(shard_name(run_id, seq))
        if self.local:
            if not os.path.exists(staged):
                raise InputError(
                    f"--out {self.uri}: a worker's staged shard {staged} is not there for the driver: on a cluster "
                    "of several nodes a local --out must be storage every node shares (NFS), or use s3://")
            self.fs.move(staged, final)
        else:
            self.fs.copy_file(staged, final)
            self.fs.delete_file(staged)
        return final

    def discard_staged(self, staged: str) -> None:
        """Drop a staged shard whose rows are all committed already (Ray ran its block twice)."""
        self.fs.delete_file(staged)

    def drop_staging_dir(self) -> None:
        """Remove _staging/ itself after a finished run (an object store keeps an empty
        "directory" marker there once its last staged shard is deleted)."""
        staging = self._path(STAGING_DIR)
        if self.fs.get_file_info(staging).type == pafs.FileType.Directory:
            self.fs.delete_dir(staging)

    def _staging_path(self, name: str) -> str:
        if self.local:  # an object store has no directories to make
            self.fs.create_dir(self._path(STAGING_DIR), recursive=True)
        return self._path(f"{STAGING_DIR}/{uuid.uuid4().hex[:8]}-{name}")

    def _write_table(self, table: pa.Table, name: str) -> str:
        final = self._path(name)
        if self.local:
            staging = self._staging_path(name)
            pq.write_table(table, staging, filesystem=self.fs)
            self.fs.move(staging, final)
        else:
            pq.write_table(table, final, filesystem=self.fs)
        return final

    def _write_bytes(self, name: str, data: bytes) -> None:
        path = self._path(name)
        staging = self._staging_path(name) if self.local else path
        with self.fs.open_output_stream(staging) as f:
            f.write(data)
        if staging != path:
            self.fs.move(staging, path)


def shard_name(run_id: str, seq: int) -> str:
    """A committed shard's file name (OWN_SHARD matches it)."""
    return f"{SHARD_PREFIX}{run_id}-{seq:05d}.parquet"


def _not_results(schema: pa.Schema) -> str | None:
    """Why a Parquet file of this schema is not a results shard, or None if it is one."""
    for col, typ in REQUIRED_COLUMNS.items():
        if col not in schema.names:
            return f"not a results shard (no {col!r} column)"
        got = schema.field(col).type
        if not got.equals(typ) and not (typ == pa.string() and got == pa.large_string()):
            return f"not a results shard (column {col!r} is {got}, expected {typ})"
    return None


def check_out_location(store: ResultStore, manifest_uri: str) -> None:
    """Refuse an --out that would mix results with the manifest: the directory holding the
    manifest (its Parquet would sit among the shards, and the next run would read the shards
    as manifest files), or a directory inside a manifest directory."""
    if not store.local or "://" in manifest_uri:
        out, man = store.uri.rstrip("/"), manifest_uri.rstrip("/")
    else:
        out, man = os.path.realpath(store.root), os.path.realpath(manifest_uri)
    man_is_dir = os.path.isdir(man) if "://" not in man else not man.endswith(".parquet")
    inside = man == out or man.startswith(out.rstrip("/") + "/")
    if inside or (man_is_dir and out.startswith(man.rstrip("/") + "/")):
        raise InputError(
            f"--out {store.uri}: {'contains' if inside else 'is inside'} the manifest {manifest_uri}; "
            "results go to a directory of their own (e.g. --out results/), so that re-running the same command "
            "resumes and readers of the results see only results")


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
