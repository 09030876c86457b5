"""A generation run's plan: everything that can fail on bad input, done before Ray starts.

The manifest is validated, every model it names is checked, the results directory is
leased to this run and scanned: what is already there is skipped, what readers could not
read is set aside. Only then does the run start workers (jobs/raydata/generation.py).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import pyarrow as pa

from pipelines.errors import InputError
from pipelines.registry.loras import adapters, check_available as check_lora_available
from pipelines.registry.models import ModelRegistry
from pipelines.registry.loading import check_available
from pipelines.validation import manifest_digest, order_by_run_key, validate_manifest
from pipelines.storage.lease import Lease
from pipelines.storage.manifest import read_manifest
from pipelines.storage.results import ResultStore, check_out_location, new_run_id

@dataclass
class Plan:
    """A validated manifest, and the results directory it will go to (leased to this run)."""

    manifest: pa.Table
    registry: ModelRegistry
    store: ResultStore
    lease: Lease
    run_id: str
    previous: dict | None
    n_done: int
    digest: str
    todo: pa.Table
    set_aside: list[str]
    created: bool  # --out did not exist before this run

    def abandon(self) -> None:
        """Give --out back as it was found (see `abandon`)."""
        abandon(self.lease, self.store, self.created)


def plan(manifest_path: str, out: str, *, model: str | None = None, models_file: str | None = None,
         lease_seconds: float, overwrite: bool = False, retry_errors: bool = False, limit: int | None = None) -> Plan:
    """Validate, lease and scan; raises InputError (nothing written, --out as it was) on bad input."""
    registry = ModelRegistry.with_user_file(models_file)
    if model is not None and model not in registry:
        raise InputError(f"--model {model!r}: not a registered model; registered: {', '.join(registry.names())}")
    manifest = validate_manifest(read_manifest(manifest_path), registry, model, source=f"manifest {manifest_path}")
    for spec in registry.with_refiners(sorted(set(manifest.column("model").to_pylist()))).values():
        check_available(spec)
    for name in sorted({a for v in set(manifest.column("lora").to_pylist()) for a, _ in adapters(v, 1.0)}):
        check_lora_available(registry.loras[name])  # a registered adapter whose file is missing: named now
    digest = manifest_digest(manifest)
    store = ResultStore(out)
    check_out_location(store, manifest_path)
    created = store.create()
    run_id = new_run_id()
    lease = Lease(store.fs, store.root, run_id, ttl_s=lease_seconds, local=store.local)
    taken_over = lease.acquire(out)
    try:
        if taken_over is not None:
            print(f"warning: --out {out}: took over the lease of {taken_over.describe(time.time())} "
                  "(that run is gone)", file=sys.stderr)
        previous = store.prepare(digest, overwrite)
        done, moved = _done_and_set_aside(store, out, previous, retry_errors)
    except BaseException:
        abandon(lease, store, created)
        raise
    ids = manifest.column("sample_id").to_pylist()
    todo = order_by_run_key(manifest.filter(pa.array([sid not in done for sid in ids])))
    if limit is not None:
        todo = todo.slice(0, limit)
    n_done = sum(1 for sid in ids if sid in done)
    return Plan(manifest, registry, store, lease, run_id, previous, n_done, digest, todo, moved, created)


def _done_and_set_aside(store: ResultStore, out: str, previous: dict | None, retry_errors: bool):
    """The sample_ids already committed, and the files set aside in _quarantine/ (named on stderr)."""
    scan = store.scan()
    if previous is not None:
        done, bad = store.read_committed(scan)
    else:  # a fresh start (--overwrite kept what diffsweep did not write): nothing there is this manifest's
        done, bad = set(), scan.bad + [(path, "left by --overwrite: not written by diffsweep") for path in scan.good]
    moved = store.quarantine([p for p, _ in bad] + scan.foreign)
    why = dict(bad)
    for src, dst in zip([p for p, _ in bad] + scan.foreign, moved):
        print(f"warning: --out {out}: set aside {src.rsplit('/', 1)[-1]} "
              f"({why.get(src, 'not a results shard: readers of the directory would fail on it')}) -> {dst}",
              file=sys.stderr)
    if previous is not None and retry_errors:
        store.drop_errors()
        done, _ = store.read_committed()
    return done, moved


def abandon(lease: Lease, store: ResultStore, created: bool) -> None:
    """Give --out back as it was found: the lease released and, if this run created the
    directory, the directory removed (it holds nothing but what the lease left)."""
    lease.release()
    if created:
        store.remove_if_empty()
