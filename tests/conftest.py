import os
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


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
    from pipelines.models import ModelRegistry, load_model

    return load_model(ModelRegistry().get("tiny-random"))


def write_parquet(path: Path, rows) -> Path:
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path
