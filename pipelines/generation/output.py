"""The output stage: actor results -> staged shards (written by CPU workers) -> committed
shards (by the driver), so that image bytes never pass through the driver.

At 6 images/s per GPU and ~0.4 MB per 512x512 PNG, 64 GPUs make ~150 MB/s; one Python
driver that receives, concatenates and writes every image caps a job at a few tens of GPUs
(docs/performance.md, "Output stage ceiling"). So the work is split:

- `stage_shard` runs where the pixels are (Ray Data CPU tasks, one call per shard's worth
  of actor results): it PNG-encodes, joins each result to its manifest row and writes the
  shard under the results directory's `_staging/` with a unique name, then hands back one
  small row: the staged path, the sample_ids and the counts the driver reports.
- `ShardCommitter` runs on the driver and sees only those rows: it commits a staged shard
  under its final name (a rename on local disk, a server-side copy on an object store,
  ResultStore.commit_staged) unless its sample_ids are already committed, so a block that
  Ray ran twice is committed once. Readers see committed `part-*.parquet` shards only.

Nothing here imports ray.
"""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.contract import RESULT_SCHEMA
from pipelines.generation.blocks import CallSizes
from pipelines.generation.worker import LOAD_COLUMNS, encode_pngs
from pipelines.storage.results import ResultStore

# What a staged shard tells the driver: everything the run's summary, _run.json and the
# progress bar need, and nothing per image but its sample_id and call size.
STAGED_COLUMNS = ("staged", "sample_ids", "batch_sizes", "ok", "error", "truncated", "loads", "nbytes")


def stage_shard(batch: pd.DataFrame, *, out: str, todo: pa.Table) -> pd.DataFrame:
    """Actor results (raw pixels) -> one staged shard in `out`/_staging/; returns its one-row
    description (STAGED_COLUMNS). `todo` is the run's manifest rows (all their columns, the
    user's extra ones included), which each result row is joined to."""
    batch = encode_pngs(batch)
    ids = batch["sample_id"].tolist()
    positions = pc.index_in(pa.array(ids, pa.string()), value_set=todo.column("sample_id")).to_pylist()
    position = dict(zip(ids, positions))  # this shard's rows only: the lookup runs in Arrow, not over todo in Python
    table = result_table(todo, batch, positions)
    store = ResultStore(out)
    staged = store.stage_table(table)
    loads = []
    if "load_seconds" in batch:  # error rows have none
        for r in batch[batch["load_seconds"].notna()].itertuples():
            i = position[r.sample_id]
            loads.append({"worker": r.worker, "model": todo.column("model")[i].as_py(),
                          "quant": todo.column("quant")[i].as_py(), **{c: _number(getattr(r, c)) for c in LOAD_COLUMNS}})
    status = batch["status"]
    return pd.DataFrame([{
        "staged": staged, "sample_ids": ids, "batch_sizes": [int(b) if b == b else 0 for b in batch["batch_size"]],
        "ok": int((status == "ok").sum()), "error": int((status != "ok").sum()),
        "truncated": int(batch["prompt_truncated"].sum()), "loads": json.dumps(loads),
        "nbytes": int(sum(len(b) for b in batch["image"] if b is not None)),
    }])


def result_table(todo: pa.Table, batch: pd.DataFrame, positions: list[int]) -> pa.Table:
    """Result rows of `batch` joined to their manifest rows (todo rows at `positions`, the
    user's extra columns included): a results shard's rows."""
    rows = todo.take(pa.array(positions, type=pa.int64()))
    results = pa.Table.from_pandas(batch[[f.name for f in RESULT_SCHEMA]], schema=RESULT_SCHEMA, preserve_index=False)
    for field in RESULT_SCHEMA:
        rows = rows.append_column(field, results.column(field.name))
    return rows.replace_schema_metadata(None)


def _number(v) -> float | None:
    return None if v is None or v != v else float(v)


class ShardCommitter:
    """Staged-shard rows -> committed shards, each sample_id once, counted on the progress bar.
    Lives on the driver; what it is handed is a few hundred bytes per shard."""

    def __init__(self, store: ResultStore, lease, run_id: str, todo: pa.Table, progress: bool):
        self.store, self.lease, self.run_id, self.todo = store, lease, run_id, todo
        self.counts = {"ok": 0, "error": 0, "truncated": 0}
        self.calls = CallSizes()  # images per diffusers call, from the rows' batch_size
        self.written: set[str] = set()  # a row is committed once, even if Ray hands its shard over twice
        self.seq = 0
        self.received_bytes = 0  # what reached the driver from the workers (pandas' deep memory size)
        self.image_bytes = 0  # PNG bytes committed (they stayed on the workers)
        self.loads: dict = {}  # (worker, model, quant) -> load_seconds, peak_mem_bytes, weights_bytes
        from tqdm import tqdm

        self.progress = tqdm(total=todo.num_rows, unit="img", desc="generate", disable=not progress,
                             dynamic_ncols=True)

    def add(self, staged: pd.DataFrame) -> None:
        """Commit every staged shard described in `staged` (rows of STAGED_COLUMNS)."""
        self.received_bytes += int(staged.memory_usage(deep=True).sum())
        for r in staged.itertuples():
            self._commit(r)

    def _commit(self, r) -> None:
        ids = list(r.sample_ids)
        new = [sid for sid in ids if sid not in self.written]
        if not new:  # Ray ran this block again after its rows were committed
            self.store.discard_staged(r.staged)
            return
        self.lease.check()  # never commit after another run took the directory over
        if len(new) < len(ids):  # partly committed already: rewrite the rest (rare: only after a retry)
            table = pq.read_table(r.staged, filesystem=self.store.fs)
            table = table.filter(pc.invert(pc.is_in(table.column("sample_id"), pa.array(list(self.written)))))
            self.store.commit_shard(table, self.run_id, self.seq)
            self.store.discard_staged(r.staged)
            ok = int(pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0)
            counts = {"ok": ok, "error": table.num_rows - ok,
                      "truncated": int(pc.sum(table.column("prompt_truncated")).as_py() or 0)}
        else:
            self.store.commit_staged(r.staged, self.run_id, self.seq)
            counts = {"ok": r.ok, "error": r.error, "truncated": r.truncated}
        self.seq += 1
        self.written.update(new)
        for k, v in counts.items():
            self.counts[k] += int(v)
        self.image_bytes += int(r.nbytes)
        self.calls.add(list(r.batch_sizes))
        for load in json.loads(r.loads):
            self.loads.setdefault((load.pop("worker"), load.pop("model"), load.pop("quant")), load)
        self.progress.update(len(new))
        self.progress.set_postfix(errors=self.counts["error"], refresh=False)

    def rest(self) -> pa.Table:
        """The run's rows that have not been committed yet."""
        done = pa.array(list(self.written), pa.string())
        return self.todo.filter(pc.invert(pc.is_in(self.todo.column("sample_id"), done)))

    def load_records(self) -> list[dict]:
        """Per worker and (model, quant): load time (s), the process's peak memory during load and
        warm-up (bytes; resident set on CPU, allocated on a GPU) and the pipeline's weight bytes."""
        return [{"worker": w, "model": m, "quant": q, **stats} for (w, m, q), stats in sorted(self.loads.items())]
