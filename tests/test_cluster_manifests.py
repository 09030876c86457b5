"""The cluster/ files against the structure their consumers read, not only "the YAML parses".

KubeRay's CRDs reject (or, with lenient field validation, silently drop) a field that is
misspelt or nested at the wrong level: a `runtimeEnvYaml` or a `rayStartParams` one level
too high would leave the job running without what the file promises. So each KubeRay
resource is checked against a small schema of the keys each level may hold, taken from
KubeRay's API types (ray-operator/apis/ray/v1/{rayjob,raycluster,raycronjob}_types.go,
ray-project/kuberay at feeaf72, 2026-08) and, inside the pod templates, from Kubernetes'
core/v1 names. The launcher YAML is checked against the JSON schema Ray ships with its
autoscaler (ray/autoscaler/ray-schema.json), plus what `ray up` checks beyond it.

A schema is a dict of key -> spec; a key ending in "!" is required. A spec is a type
(str, int, bool: the value's type), MAP (any mapping of strings to scalars), ANY (a
Kubernetes structure this file does not model), a dict (a nested object) or a one-item
list (a list of that spec).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"

ANY = object()
MAP = "map"

# ---------------------------------------------------------------- Kubernetes core/v1 (the parts a Ray pod uses)
QUANTITIES = MAP  # resource name -> quantity ("8", 48Gi, 1)
CONTAINER = {
    "name!": str, "image!": str, "imagePullPolicy": str, "workingDir": str, "command": [str], "args": [str],
    "env": [{"name!": str, "value": str, "valueFrom": ANY}], "envFrom": ANY, "ports": ANY,
    "resources": {"requests": QUANTITIES, "limits": QUANTITIES, "claims": ANY},
    "volumeMounts": [{"name!": str, "mountPath!": str, "readOnly": bool, "subPath": str}],
    "lifecycle": ANY, "livenessProbe": ANY, "readinessProbe": ANY, "startupProbe": ANY, "securityContext": ANY,
}
POD_SPEC = {
    "containers!": [CONTAINER], "initContainers": [CONTAINER], "volumes": [{
        "name!": str, "persistentVolumeClaim": {"claimName!": str, "readOnly": bool}, "emptyDir": ANY,
        "configMap": ANY, "secret": ANY, "hostPath": ANY, "csi": ANY}],
    "tolerations": [{"key": str, "operator": str, "value": str, "effect": str, "tolerationSeconds": int}],
    "nodeSelector": MAP, "affinity": ANY, "serviceAccountName": str, "imagePullSecrets": [{"name!": str}],
    "priorityClassName": str, "runtimeClassName": str, "schedulerName": str, "securityContext": ANY,
    "restartPolicy": str, "terminationGracePeriodSeconds": int,
}
POD_TEMPLATE = {"metadata": {"labels": MAP, "annotations": MAP, "name": str}, "spec!": POD_SPEC}
OBJECT_META = {"name!": str, "namespace": str, "labels": MAP, "annotations": MAP}

# ---------------------------------------------------------------- KubeRay ray.io/v1
RAY_START_PARAMS = MAP  # map[string]string: every value a string (checked below)
HEAD_GROUP = {
    "template!": POD_TEMPLATE, "rayStartParams": RAY_START_PARAMS, "headService": ANY, "enableIngress": bool,
    "ingressOptions": ANY, "resources": MAP, "labels": MAP, "serviceType": str,
}
WORKER_GROUP = {
    "groupName!": str, "template!": POD_TEMPLATE, "rayStartParams": RAY_START_PARAMS, "replicas": int,
    "minReplicas": int, "maxReplicas": int, "idleTimeoutSeconds": int, "priority": int, "suspend": bool,
    "resources": MAP, "labels": MAP, "scaleStrategy": {"workersToDelete": [str]}, "numOfHosts": int,
}
RAY_CLUSTER_SPEC = {
    "headGroupSpec!": HEAD_GROUP, "workerGroupSpecs": [WORKER_GROUP], "rayVersion": str,
    "authOptions": {"mode": str, "secretName": str, "enableK8sTokenAuth": bool},
    "enableInTreeAutoscaling": bool, "autoscalerOptions": ANY, "headServiceAnnotations": MAP, "suspend": bool,
    "managedBy": str, "upgradeStrategy": ANY, "gcsFaultToleranceOptions": ANY, "historyServerOptions": ANY,
    "networkPolicy": ANY, "tlsOptions": ANY,
}
RAY_JOB_SPEC = {
    "entrypoint": str, "runtimeEnvYAML": str, "rayClusterSpec": RAY_CLUSTER_SPEC, "clusterSelector": MAP,
    "shutdownAfterJobFinishes": bool, "ttlSecondsAfterFinished": int, "activeDeadlineSeconds": int,
    "preRunningDeadlineSeconds": int, "backoffLimit": int, "submissionMode": str, "submitterPodTemplate": ANY,
    "submitterConfig": {"backoffLimit": int}, "metadata": MAP, "jobId": str, "entrypointResources": str,
    "entrypointNumCpus": (int, float), "entrypointNumGpus": (int, float), "suspend": bool, "managedBy": str,
    "deletionStrategy": ANY,
}
RAY_CRON_JOB_SPEC = {"jobTemplate!": RAY_JOB_SPEC, "schedule!": str, "timeZone": str, "suspend": bool}
RESOURCES = {
    "RayJob": {"apiVersion!": str, "kind!": str, "metadata!": OBJECT_META, "spec!": RAY_JOB_SPEC},
    "RayCluster": {"apiVersion!": str, "kind!": str, "metadata!": OBJECT_META, "spec!": RAY_CLUSTER_SPEC},
    "RayCronJob": {"apiVersion!": str, "kind!": str, "metadata!": OBJECT_META, "spec!": RAY_CRON_JOB_SPEC},
}
KUBERAY_FILES = ["rayjob.yaml", "benchmark-cronjob.yaml", "quality-cronjob.yaml"]


def problems(value, spec, where: str) -> list[str]:
    """What in `value` does not fit `spec` (see the module docstring), each naming its path."""
    if spec is ANY:
        return []
    if spec == MAP:
        if not isinstance(value, dict) or not all(isinstance(v, (str, int, float, bool)) for v in value.values()):
            return [f"{where}: expected a mapping of names to values, got {value!r}"]
        return []
    if isinstance(spec, list):
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {type(value).__name__}"]
        return [p for i, item in enumerate(value) for p in problems(item, spec[0], f"{where}[{i}]")]
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping, got {type(value).__name__}"]
        allowed = {k.rstrip("!"): sub for k, sub in spec.items()}
        out = [f"{where}: unknown key {k!r} (allowed: {', '.join(sorted(allowed))})" for k in value if k not in allowed]
        out += [f"{where}: missing required key {k[:-1]!r}" for k in spec if k.endswith("!") and k[:-1] not in value]
        return out + [p for k, v in value.items() if k in allowed for p in problems(v, allowed[k], f"{where}.{k}")]
    if isinstance(value, bool) and spec is not bool and bool not in (spec if isinstance(spec, tuple) else (spec,)):
        return [f"{where}: expected {spec}, got a boolean"]
    return [] if isinstance(value, spec) else [f"{where}: expected {spec}, got {value!r}"]


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def cluster_specs(doc: dict) -> list[dict]:
    spec = doc["spec"]
    if doc["kind"] == "RayCronJob":
        spec = spec["jobTemplate"]
    return [spec["rayClusterSpec"]] if doc["kind"] != "RayCluster" else [spec]


def groups(cluster_spec: dict) -> list[tuple[str, dict]]:
    return [("headGroupSpec", cluster_spec["headGroupSpec"])] + [
        (f"workerGroupSpecs[{g.get('groupName')}]", g) for g in cluster_spec.get("workerGroupSpecs", [])]


def test_the_schema_catches_what_kuberay_would_reject():
    """The checker itself: a misspelt key, a key one level too high, a number where KubeRay
    takes a string map, a missing container list."""
    good = load("rayjob.yaml")
    assert problems(good, RESOURCES["RayJob"], "rayjob") == []
    bad = json.loads(json.dumps(good))
    bad["spec"]["runtimeEnvYaml"] = bad["spec"].pop("runtimeEnvYAML")
    bad["spec"]["rayClusterSpec"]["rayStartParams"] = {}
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "4"
    del bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    found = "\n".join(problems(bad, RESOURCES["RayJob"], "rayjob"))
    assert "rayjob.spec: unknown key 'runtimeEnvYaml'" in found
    assert "rayjob.spec.rayClusterSpec: unknown key 'rayStartParams'" in found
    assert "rayjob.spec.rayClusterSpec.workerGroupSpecs[0].replicas: expected <class 'int'>" in found
    assert "headGroupSpec.template.spec: missing required key 'containers'" in found


def entrypoint_parses(entrypoint: str) -> None:
    """The entrypoint's flags are ones its job accepts (the job's own parser; exit 2 otherwise)."""
    import importlib
    import shlex

    _, script, *argv = shlex.split(entrypoint)
    job = importlib.import_module(script.removesuffix(".py").replace("/", "."))
    try:
        job.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{entrypoint!r}: {script} refuses its arguments (exit {e.code})")


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_kuberay_resources_have_the_fields_kuberay_reads_where_it_reads_them(name):
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in RESOURCES, (doc["apiVersion"], doc["kind"])
    found = problems(doc, RESOURCES[doc["kind"]], name)
    assert not found, "\n".join(found)
    job = doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]
    if doc["kind"] != "RayCluster":
        assert job["entrypoint"].strip().startswith("python jobs/"), job["entrypoint"]
        entrypoint_parses(job["entrypoint"])
        assert job.get("shutdownAfterJobFinishes") is True, f"{name}: the cluster (GPUs) would outlive the job"
        env = yaml.safe_load(job["runtimeEnvYAML"])  # a YAML string in the CRD, a runtime_env inside
        from ray.runtime_env import RuntimeEnv

        unknown = set(env) - set(RuntimeEnv.known_fields)
        assert isinstance(env, dict) and not unknown, f"{name}: runtimeEnvYAML fields Ray does not know: {unknown}"
    for cluster_spec in cluster_specs(doc):
        assert (cluster_spec.get("authOptions") or {}).get("mode") in ("token", "disabled")
        import ray

        assert cluster_spec["rayVersion"] == ray.__version__, f"{name}: rayVersion vs the Ray the driver uses"
        for where, group in groups(cluster_spec):
            params = group.get("rayStartParams", {})
            assert all(isinstance(v, str) for v in params.values()), f"{name}: {where}.rayStartParams: {params}"
            containers = group["template"]["spec"]["containers"]
            # KubeRay treats the first container as the Ray one (it adds ray start to it).
            assert containers[0]["name"].startswith("ray-"), f"{name}: {where}: Ray container not first"
            if "replicas" in group:
                assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], f"{name}: {where}"


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_gpus_are_requested_the_way_kubernetes_schedules_them(name):
    """`nvidia.com/gpu` is an extended resource: Kubernetes needs it in limits (requests, if
    given, equal to limits) as a whole number; a Ray node with GPUs and rayStartParams
    num-gpus "0" would hide them from Ray."""
    gpu_groups = 0
    for cluster_spec in cluster_specs(load(name)):
        for where, group in groups(cluster_spec):
            resources = group["template"]["spec"]["containers"][0].get("resources", {})
            limits, requests = resources.get("limits", {}), resources.get("requests", {})
            gpus = limits.get("nvidia.com/gpu")
            assert "nvidia.com/gpu" not in requests or requests["nvidia.com/gpu"] == gpus, f"{name}: {where}"
            assert not any(k.endswith("/gpu") and k != "nvidia.com/gpu" for k in {**limits, **requests}), where
            if gpus is not None:
                assert int(gpus) == float(gpus) >= 1, f"{name}: {where}: nvidia.com/gpu {gpus!r}"
                assert group.get("rayStartParams", {}).get("num-gpus", str(gpus)) == str(gpus), f"{name}: {where}"
                gpu_groups += 1
            else:
                assert group.get("rayStartParams", {}).get("num-gpus", "0") == "0", f"{name}: {where}"
    assert gpu_groups, f"{name}: no group with nvidia.com/gpu"


def test_launcher_yaml_fits_the_autoscaler_schema_ray_ships():
    import jsonschema
    import ray

    doc = load("cluster.yaml")
    schema_path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    with open(schema_path) as f:
        jsonschema.validate(doc, json.load(f))  # what `ray up` validates first
    # ... and what it checks beyond the schema:
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types, f"head_node_type {doc['head_node_type']!r} not in {sorted(types)}"
    workers = {k: t for k, t in types.items() if k != doc["head_node_type"]}
    assert workers and all(t.get("max_workers", 0) <= doc["max_workers"] for t in workers.values())
    assert all(t.get("min_workers", 0) <= t.get("max_workers", 0) for t in workers.values())
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers.values()), "no GPU worker type"
    assert not types[doc["head_node_type"]]["resources"].get("GPU"), "GPU work on the head"
    assert doc["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}"), doc["docker"]["image"]


def test_launcher_schema_check_catches_a_misplaced_key():
    import jsonschema
    import ray

    doc = load("cluster.yaml")
    doc["available_node_types"]["gpu_worker"]["node_config_typo"] = {}
    doc["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "1"
    with open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")) as f:
        schema = json.load(f)
    errors = sorted(e.message for e in jsonschema.Draft7Validator(schema).iter_errors(doc))
    assert any("'1' is not of type 'integer'" in m for m in errors), errors
    assert any("'node_config_typo' was unexpected" in m for m in errors), errors
