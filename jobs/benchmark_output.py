"""The output stage's ceiling: driver CPU seconds per image and images/s when pre-made
512x512 images go through PNG encoding and shard commits as fast as they can (no model).

    python jobs/benchmark_output.py --images 400                 # a temporary results directory
    python jobs/benchmark_output.py --images 400 --out s3://bucket/bench/

One JSON line on stdout; docs/performance.md ("Output stage ceiling") records the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.cli import at_least  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=at_least(1, int), default=400, help="rows pushed through (default 400)")
    p.add_argument("--size", type=at_least(8, int), default=512, help="image side in pixels (default 512)")
    p.add_argument("--block-rows", type=at_least(1, int), default=8, help="rows per actor call (default 8)")
    p.add_argument("--shard-rows", type=at_least(1, int), default=256, help="as jobs/generate.py (default 256)")
    p.add_argument("--out", default=None, help="results directory or URI (default: a temporary directory)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import pandas as pd

    from jobs.raydata.generation import RunOptions
    from jobs.raydata.output_bench import run_output_stage
    from pipelines.benchmarking.output import manifest_rows
    from pipelines.generation.plan import plan

    with tempfile.TemporaryDirectory(prefix="diffsweep-output-") as tmp:
        manifest = os.path.join(tmp, "manifest.parquet")
        pd.DataFrame(manifest_rows(args.images, args.size)).to_parquet(manifest)
        p = plan(manifest, args.out or os.path.join(tmp, "results"), lease_seconds=120, overwrite=True)
        try:
            result = run_output_stage(p, RunOptions(shard_rows=args.shard_rows), args.size, args.block_rows)
        finally:
            p.lease.release()
    print(json.dumps({**result, "block_rows": args.block_rows, "shard_rows": args.shard_rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
