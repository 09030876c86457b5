"""The benchmark's Ray Data timed path: the whole generation job on a running Ray.

jobs/generate.py's main() runs on a manifest of the benchmark's rows, timed from submit
to the last row committed, as a user runs it. Ray is started (or joined) before the clock
starts, the same way the jobs connect (session.init_ray). The suite
(pipelines/benchmarking/suite.py) gets this path from jobs/benchmark.py: pipelines never
import ray.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from jobs.raydata.session import init_ray
from pipelines.benchmarking.memory import PeakMemory

# The ModelSpec fields a models YAML names for a random-weight build.
SPEC_FIELDS = ("source", "pipeline", "scheduler", "steps", "guidance", "height", "width", "family", "gpu_dtype",
               "size_factor")


class RayJobPath:
    """`start()` once before any clock runs; `time(...)` per model, batch size and batching."""

    def start(self) -> None:
        """Ray up before the clock starts: timing is from job submit, on a running cluster.
        Connected as jobs/generate.py connects (RAY_ADDRESS's cluster with the submitter's
        runtime environment, else a Ray on this machine that can import this checkout)."""
        init_ray()

    def time(self, spec, rows: pd.DataFrame, batch: int, device: str, dtype: str, work: Path, models_file,
             batching: str = "config", speed_flags: tuple = ()) -> dict:
        """Run the job on `rows` in `work`; its seconds, start-up and steady seconds, pixels by
        sample_id, error messages, peak device memory and actor busy fraction."""
        from PIL import Image

        from jobs import generate as gen_job

        work.mkdir(parents=True, exist_ok=True)
        manifest, results = work / "manifest.parquet", work / "results"
        rows.to_parquet(manifest, index=False)
        argv = [str(manifest), "--out", str(results), "--batch-size", str(batch), "--dtype", dtype,
                "--batching", batching, *speed_flags, "--overwrite", "--no-progress"]
        models_file = _models_file(spec, models_file, work)
        if models_file:
            argv += ["--models", str(models_file)]
        with PeakMemory(device, in_process=False) as mem:
            submitted = time.time()
            t0 = time.perf_counter()
            rc = gen_job.main(argv)
            seconds = time.perf_counter() - t0
            finished = time.time()
        if rc != 0:
            raise RuntimeError(f"jobs/generate.py {' '.join(argv)} exited {rc}")
        df = pd.read_parquet(results)
        first_start = df.created_at.min().timestamp()  # when the actor began its first batch (model loaded)
        steady = max(1e-9, finished - first_start)
        pixels = {sid: (None if png is None else np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
                  for sid, png in zip(df.sample_id, df.image)}
        return dict(seconds=seconds, startup_s=max(0.0, first_start - submitted), steady_seconds=steady,
                    pixels=pixels, errors=df.error[df.status != "ok"].tolist(), peak=mem.peak,
                    actor_busy=actor_busy(df, pool_size(results, df), steady))


def _models_file(spec, models_file, work: Path):
    """The --models file the job needs: the user's, or for a random-weight build (a spec the
    registry does not hold) one that says where it is, as a user would write it."""
    import yaml

    from pipelines.registry.models import ModelRegistry

    if spec == ModelRegistry.with_user_file(models_file).specs.get(spec.name):
        return models_file
    path = work / "models.yaml"
    path.write_text(yaml.safe_dump({"models": {spec.name: {k: getattr(spec, k) for k in SPEC_FIELDS}}}))
    return path


def actor_busy(results: pd.DataFrame, actors: int, steady_seconds: float) -> float:
    """Fraction of the generation actors' time spent inside generate calls: the rows'
    gen_seconds (each row's share of the diffusers/UNet calls it was part of, so they add
    up to those calls' wall time) over actors x the steady wall time (first batch start to
    the last row committed). The rest is time the actors waited for rows or spent outside
    generate (Ray hand-offs, the last commit) once started; gaps inside a call are not seen."""
    return float(np.nansum(results.gen_seconds)) / (actors * steady_seconds)


def pool_size(results: Path, df: pd.DataFrame) -> int:
    """The job's actor pool size, from its _run.json; else the workers seen in the rows."""
    try:
        return int(json.loads((results / "_run.json").read_text())["runs"][-1]["pool_size"])
    except (OSError, KeyError, IndexError, TypeError, ValueError):
        return max(1, df.worker.nunique())
