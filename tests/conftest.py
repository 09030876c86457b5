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


# A CLIP of open_clip's own ViT/text-transformer classes, ~1.7 M parameters (most in the token
# table of the 49408-token BPE vocabulary that open_clip ships); SimpleTokenizer, no download.
TINY_OPEN_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory):
    """(model directory, the in-memory model it was saved from): a tiny open_clip model built
    from TINY_OPEN_CLIP_CFG with random weights, saved in open_clip's hub layout
    (open_clip_config.json beside open_clip_model.safetensors), the way a user's local model is.
    Session-wide so that tests/test_evaluate_job.py runs the job through it on its own results;
    skips where open_clip (or the torchvision it imports) does not import."""
    import json

    import torch

    pytest.importorskip("torchvision", reason="open_clip imports torchvision")
    open_clip = pytest.importorskip("open_clip", reason="pip install -e '.[openclip]' beside a torch/torchvision pair")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_OPEN_CLIP_CFG).eval()
    d = tmp_path_factory.mktemp("oc") / "tiny-open-clip"
    d.mkdir()
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP_CFG, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    return d, model


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
