"""Connecting a job to Ray: the cluster it was submitted to, or a local one.

Under `ray job submit` (or with RAY_ADDRESS set) the job's runtime environment is the
submitter's; adding our own would conflict. Only a local Ray started here gets one, so
its workers can import this checkout's packages without installing them.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def init_ray():
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(logging_level="WARNING")
        else:
            env = {"PYTHONPATH": os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p),
                   "TRANSFORMERS_VERBOSITY": os.environ.get("TRANSFORMERS_VERBOSITY", "error")}
            ray.init(runtime_env={"env_vars": env}, logging_level="WARNING")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the jobs draw their own
    ctx.print_on_execution_start = False
    return ray
