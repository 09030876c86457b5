"""Connecting a job to Ray: the cluster it was submitted to (RAY_ADDRESS), or a local one of its own.

Under `ray job submit` (or with RAY_ADDRESS set) the job's runtime environment is the
submitter's; adding our own would conflict. Only a local Ray started here gets one, so
its workers can import this checkout's packages without installing them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pipelines.errors import InputError, exception_chain, one_line

ROOT = Path(__file__).resolve().parents[2]


def init_ray(schedule_timeout_s: float | None = None):
    """Connect (or start a local Ray) and set the Data options the jobs rely on.

    `schedule_timeout_s`: an actor pool that cannot start within this long fails with
    GetTimeoutError instead of waiting forever (Ray Data's `wait_for_min_actors_s`).
    """
    import ray

    if not ray.is_initialized():
        _connect(ray)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the jobs draw their own (and Ray need not say it drew none)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    quiet_ray_data_console()
    ctx.print_on_execution_start = False
    ctx.raise_original_map_exception = True  # the user's exception, not Ray's "UDF failed" wrapper
    if schedule_timeout_s:
        ctx.wait_for_min_actors_s = int(max(1, schedule_timeout_s))
    return ray


def _connect(ray) -> None:
    """ray.init: the cluster RAY_ADDRESS names (`ray job submit` sets it; `auto` joins a
    `ray start` cluster on this machine); without it a new local Ray of this job's own, never
    whichever cluster another user or test left running here (a bare ray.init() would join
    it). A cluster that refuses us (its token authentication, a dead address) is the user's
    setup to fix: one line, exit 2."""
    try:
        if os.environ.get("RAY_ADDRESS", "local") != "local":
            ray.init(logging_level="WARNING")
        else:
            env = {"PYTHONPATH": os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p),
                   "TRANSFORMERS_VERBOSITY": os.environ.get("TRANSFORMERS_VERBOSITY", "error")}
            ray.init(address="local", runtime_env={"env_vars": env}, logging_level="WARNING")
    except Exception as e:  # ray.exceptions.AuthenticationError, ConnectionError, RuntimeError
        raise InputError(_connect_error(e)) from None


def _connect_error(e: Exception) -> str:
    """What went wrong in ray.init, in one line. Ray wraps the cause (an AuthenticationError
    inside a RuntimeError whose text holds a traceback), so the whole chain is read."""
    chain = list(exception_chain(e))
    text = "\n".join(f"{type(x).__name__}: {x}" for x in chain)
    last = [ln.strip() for ln in str(chain[-1]).splitlines() if ln.strip()]
    cause = one_line(last[-1] if last else type(chain[-1]).__name__, 300)
    address = os.environ.get("RAY_ADDRESS", "local")
    if address == "local":
        return f"could not start a local Ray: {cause}"
    where = address if address != "auto" else "the Ray cluster running on this machine (RAY_ADDRESS=auto)"
    if "AuthenticationError" in text or "InvalidAuthToken" in text or "authentication token" in text.lower():
        return (f"cannot connect to {where}: it uses token authentication and refused this process's token: set "
                "RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or "
                "~/.ray/auth_token; README 'Quickstart'), or RAY_ADDRESS=local for a private local Ray")
    return f"cannot connect to {where}: {cause}; check RAY_ADDRESS, or set RAY_ADDRESS=local for a private local Ray"


class _RayDataConsoleFilter(logging.Filter):
    """Ray Data's INFO lines ("Dataset ... execution finished") on the console break the
    progress bar; they stay in Ray Data's log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def quiet_ray_data_console() -> None:
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not any(
                isinstance(f, _RayDataConsoleFilter) for f in handler.filters):
            handler.addFilter(_RayDataConsoleFilter())


def check_schedulable(ray, num_gpus: float, num_cpus: float) -> None:
    """Refuse an actor that no node of the cluster can host (e.g. --num-gpus 1 on a cluster
    without GPUs): Ray would otherwise wait for resources that never come."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(r.get("GPU", 0) >= num_gpus and r.get("CPU", 0) >= num_cpus for r in nodes):
        return
    have = "; ".join(f"node {i}: {r.get('CPU', 0):g} CPU, {r.get('GPU', 0):g} GPU" for i, r in enumerate(nodes)) or "no live nodes"
    flag = "--num-gpus" if num_gpus and not any(r.get("GPU", 0) >= num_gpus for r in nodes) else "--cpus-per-actor"
    raise InputError(f"{flag}: each generation actor needs {num_gpus:g} GPU and {num_cpus:g} CPU, "
                     f"but no node of the cluster has that ({have})")


def batch_attempts(ray, name: str):
    """A small named actor that counts attempts per batch across actor restarts. It lives on
    the driver's node: placed anywhere (it needs no CPU), it could share a worker node with the
    generation actor and be lost with it, and every retry would then fail on the lost counter."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    class BatchAttempts:
        def __init__(self):
            self.counts: dict[str, int] = {}

        def start(self, key: str) -> int:
            self.counts[key] = self.counts.get(key, 0) + 1
            return self.counts[key]

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return BatchAttempts.options(name=name, scheduling_strategy=here).remote()


class AttemptCounter:
    """What a generation worker calls to learn which attempt at a batch this is: it asks the
    run's BatchAttempts actor (by name, so it survives pickling into every actor)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, batch_key: str) -> int:
        import ray

        return ray.get(ray.get_actor(self.name).start.remote(batch_key))
