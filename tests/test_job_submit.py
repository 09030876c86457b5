"""`ray job submit --working-dir . -- python jobs/generate.py ...` against a cluster
started with `ray start --head` (the job API needs the head's dashboard agent), with Ray's
token authentication on, set up the way README "On a cluster" says: a token from
`ray get-auth-token --generate`, RAY_AUTH_MODE=token on the head and on the submitting client.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import ROOT, free_port, write_parquet

AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
# What `ray job submit` says while the head's dashboard or job agent is still coming up.
NOT_UP_YET = ("No available agent", "Connection refused", "Failed to connect")


def env_with(**auth) -> dict:
    """This process's environment with the session's Ray auth settings (tests/conftest.py)
    replaced by `auth`, so each command sees exactly the token setup it is meant to test."""
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    return {**env, **auth}


def generate_token(home: Path) -> Path:
    """`ray get-auth-token --generate` as the docs give it; it writes ~/.ray/auth_token, so it
    runs with HOME in a temporary folder: the token is this test cluster's own."""
    ray_cli = shutil.which("ray")
    proc = subprocess.run([ray_cli, "get-auth-token", "--generate"], capture_output=True, text=True,
                          timeout=120, env={**env_with(), "HOME": str(home)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    token = home / ".ray" / "auth_token"
    assert token.read_text() == proc.stdout and len(proc.stdout) >= 32, "the CLI prints the token it saved"
    return token


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A head node with token authentication, in its own process group; `--block` ties the node
    to that process, so stopping the group stops exactly this cluster (not the session's
    ray.init one). Yields the ray CLI, the dashboard address, the head's token file and its GCS address."""
    ray_cli = shutil.which("ray")
    assert ray_cli, "the ray CLI comes with ray[default]"
    token = generate_token(tmp_path_factory.mktemp("head-home"))
    port, dash = free_port(), free_port()
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--port", str(port), "--dashboard-port", str(dash),
         "--dashboard-agent-listen-port", str(free_port()), "--num-cpus", "2",
         "--include-dashboard", "true", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env=env_with(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token)),
    )
    try:
        yield ray_cli, f"http://127.0.0.1:{dash}", token, f"127.0.0.1:{port}"
    finally:
        # Killed outright: Ray's graceful stop takes 10-30 s, and this cluster keeps nothing.
        # Its processes that are not in the group die with their parent (Ray sets PDEATHSIG).
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=60)
        # A later bare ray.init() on this machine must not try to join the stopped head.
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def submit(ray_cli, address, args, env) -> subprocess.CompletedProcess:
    """`ray job submit --address ADDRESS ARGS`, retried while the head is still starting."""
    deadline = time.monotonic() + 120
    while True:
        proc = subprocess.run([ray_cli, "job", "submit", "--address", address, *args],
                              capture_output=True, text=True, timeout=600, env=env)
        if time.monotonic() > deadline or not any(m in proc.stdout + proc.stderr for m in NOT_UP_YET):
            return proc
        time.sleep(2)


def test_generate_runs_under_ray_job_submit(tmp_path, ray_head):
    ray_cli, address, token, _ = ray_head
    manifest = write_parquet(tmp_path / "m.parquet", [dict(prompt=f"p{i}", seed=i, steps=2, model="tiny-random")
                                                       for i in range(4)])
    out = tmp_path / "results"
    runtime_env = {"excludes": ["pipelines/embedded/model", "docs", ".git"],
                   "env_vars": {"TRANSFORMERS_VERBOSITY": "error"}}
    args = ["--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env), "--",
            "python", "jobs/generate.py", str(manifest), "--out", str(out), "--no-progress"]
    # The client sends the token only when its own RAY_AUTH_MODE is token (Ray 2.60).
    proc = submit(ray_cli, address, args, env_with(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token)))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "succeeded" in proc.stdout
    df = pd.read_parquet(out)
    assert len(df) == 4 and (df.status == "ok").all()


@pytest.mark.parametrize("case", ["no-token", "token-without-auth-mode", "wrong-token"])
def test_submit_without_the_clusters_token_is_refused(tmp_path, ray_head, case):
    """The head really enforces authentication: a client without its token cannot run code."""
    ray_cli, address, token, _ = ray_head
    client, refusal = {
        "no-token": ({}, "Missing authentication token"),
        # A client sends its token only when its own RAY_AUTH_MODE is token.
        "token-without-auth-mode": ({"RAY_AUTH_TOKEN_PATH": str(token)}, "Missing authentication token"),
        "wrong-token": ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, "Invalid authentication token"),
    }[case]
    ran = tmp_path / "ran"
    proc = submit(ray_cli, address, ["--", "python", "-c", f"open({str(ran)!r}, 'w')"], env_with(**client))
    said = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"submitted with {client or 'no auth settings'} and the head accepted it:\n{said[-2000:]}"
    assert "AuthenticationError" in said and refusal in said, said[-2000:]
    assert not ran.exists(), "the refused job ran anyway"


# ------------------------------------------------------------------ token auth in cluster/ configs

CLUSTER = ROOT / "cluster"


def _ray_containers(doc):
    """(where, container) for every Ray head/worker container in a KubeRay resource, with the
    RayClusterSpec that holds it (RayCluster spec, RayJob rayClusterSpec, RayCronJob's jobTemplate)."""
    spec = doc["spec"]
    cluster_spec = spec.get("rayClusterSpec") or spec.get("jobTemplate", {}).get("rayClusterSpec") or spec
    groups = [("head", cluster_spec["headGroupSpec"])] + [(g["groupName"], g) for g in cluster_spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        for container in group["template"]["spec"]["containers"]:
            yield cluster_spec, f"{name}/{container['name']}", container


@pytest.mark.parametrize("name", ["rayjob.yaml", "benchmark-cronjob.yaml"])
def test_kuberay_files_turn_token_auth_on_for_every_ray_container(name):
    """KubeRay >= 1.6: `authOptions: {mode: token, secretName}` makes the operator set
    RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (from the Secret) on every Ray container and on the
    job submitter; a container that sets them itself must set them to the same."""
    doc = yaml.safe_load((CLUSTER / name).read_text())
    containers = list(_ray_containers(doc))
    assert containers, f"{name}: no Ray containers found"
    for cluster_spec, where, container in containers:
        auth = cluster_spec.get("authOptions") or {}
        assert auth.get("mode") == "token" and auth.get("secretName"), f"{name}: authOptions {auth} (want mode token + secretName)"
        version = tuple(int(part) for part in cluster_spec["rayVersion"].split(".")[:2])
        assert version >= (2, 52), f"{name}: token auth needs rayVersion >= 2.52.0, not {cluster_spec['rayVersion']}"
        env = {e["name"]: e for e in container.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value", "token") == "token", f"{name}: {where} turns auth off"
        ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
        assert "RAY_AUTH_TOKEN" not in env or ref == {"name": auth["secretName"], "key": "auth_token"}, \
            f"{name}: {where} sets its own RAY_AUTH_TOKEN"


def test_cluster_launcher_mounts_the_token_and_sets_token_mode_on_every_node():
    """Ray's cluster-launcher recipe: the local ~/.ray/auth_token mounted on every node, and
    RAY_AUTH_MODE=token where `ray start` runs (in the container, with docker)."""
    doc = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    mounts = {target: source for target, source in doc["file_mounts"].items()}
    assert mounts.get("/home/ray/.ray/auth_token") == "~/.ray/auth_token", mounts
    assert "--env RAY_AUTH_MODE=token" in doc["docker"]["run_options"], doc["docker"]["run_options"]
    text = (CLUSTER / "cluster.yaml").read_text() + (CLUSTER / "runtime_env.yaml").read_text()
    assert "RAY_AUTH_MODE=disabled" not in text


def test_a_job_without_the_clusters_token_says_so_in_one_line(tmp_path, ray_head):
    """jobs/generate.py run by hand against the cluster (RAY_ADDRESS) with a wrong token: exit 2,
    one error line that says what to set, and --out not created (Ray's own retry lines before it
    are its C++ logging)."""
    _, _, _, gcs = ray_head
    manifest = write_parquet(tmp_path / "m.parquet", [dict(prompt="p", seed=0, steps=2, model="tiny-random")])
    out = tmp_path / "results"
    env = env_with(RAY_ADDRESS=gcs, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64,
                   RAY_gcs_server_port_wait_time_s="2")  # Ray's connect retries: 2 s instead of ~20
    proc = subprocess.run([sys.executable, "jobs/generate.py", str(manifest), "--out", str(out), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert last.startswith(f"error: cannot connect to {gcs}: it uses token authentication"), last
    assert "RAY_AUTH_TOKEN" in last and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()
