import atexit
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _session_ray_token() -> Path:
    """Every Ray the tests start (ray.init() here, jobs/*.py in subprocesses) runs with token
    authentication, as Ray 2.59+ does by default, but with a token of this session's own: with
    RAY_AUTH_MODE set explicitly Ray prints no "token authentication is enabled" warning (tests
    read stderr), and with RAY_AUTH_TOKEN_PATH set it neither reads nor writes ~/.ray/auth_token.
    The token is made like Ray's own (`ray get-auth-token --generate`: 32 random bytes, hex)."""
    folder = Path(tempfile.mkdtemp(prefix="diffsweep-ray-auth-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    token = folder / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    return token


os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN_PATH"] = str(_session_ray_token())
os.environ.pop("RAY_AUTH_TOKEN", None)  # it would take precedence over the session's token file


@pytest.fixture(scope="session")
def ray_local():
    """A small local Ray for the whole session, stopped at the end."""
    import ray

    ray.init(
        address="local",  # a fresh cluster, never one a `ray start` left on the machine
        num_cpus=2,
        include_dashboard=False,
        logging_level="WARNING",
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error"}},
    )
    yield ray
    ray.shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model():
    from pipelines.registry.models import ModelRegistry
    from pipelines.registry.loading import load_model

    return load_model(ModelRegistry().get("tiny-random"))


def write_parquet(path: Path, rows) -> Path:
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def wait_for(predicate, timeout, what):
    """Poll for an event (a committed shard, a live actor), failing with what was awaited."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class JobThread:
    """jobs/generate.py's main() in a thread of this process (on the session's Ray), joined
    even when the test fails, so no job is left running on the shared Ray."""

    def __init__(self, args):
        import threading

        from jobs import generate as gen_job

        self.result = {}
        self.thread = threading.Thread(target=lambda: self.result.setdefault("rc", gen_job.main(args)), daemon=True)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.thread.join(timeout=900)
        assert not self.thread.is_alive(), "the job did not finish within 900 s"
        return False
