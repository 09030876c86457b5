"""What a benchmark ran on: device, versions, commit, load. Recorded with every run, so
runs on different machines or code are never mistaken for one another."""

from __future__ import annotations

import datetime as dt
import os
import platform
import socket
import subprocess
import sys
import uuid
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def device() -> tuple[str, str]:
    """("cuda", GPU name) or ("cpu", CPU model x cores)."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.cuda.get_device_name()
    return "cpu", cpu_name()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} x{os.cpu_count()}"


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def load_avg() -> float | None:
    """1-minute load average: on a shared machine, what else was competing for the cores."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def describe(args, device_kind: str, device_name: str, with_ray: bool) -> dict:
    """The run's environment record (throughput.json's "environment"). Ray's version is
    read from its package metadata: nothing here imports ray."""
    import diffusers
    import torch

    return dict(run_id=new_run_id(), suite=args.suite, created_at=now(), host=socket.gethostname(),
                device=device_kind, device_name=device_name, torch_version=torch.__version__,
                diffusers_version=diffusers.__version__, ray_version=metadata.version("ray") if with_ray else None,
                python=sys.version.split()[0], git_commit=git_commit(), cpu_count=os.cpu_count(),
                command=args.command, load_avg_at_start=load_avg())
