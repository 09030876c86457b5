"""The layers, checked on the source: what each package may import, no import circles,
and no module reaching into another's private names.

    evals/      metrics on arrays: never diffusers, ray, pipelines or jobs
    pipelines/  making images: never ray or jobs
    jobs/       the scripts users run; only jobs/raydata/ imports ray

Every import statement counts, also those inside functions (a lazy import still couples
two modules, and is how import circles hide).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "evals", "jobs")
FORBIDDEN = {"pipelines": {"ray", "jobs"}, "evals": {"diffusers", "ray", "pipelines", "jobs"}, "jobs": {"ray"}}
MAY_IMPORT_RAY = "jobs.raydata"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports(path: Path, name: str) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import statement in the file."""
    out = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.append((base, [a.name for a in node.names], node.lineno))
    return out


def internal_edges() -> dict[str, set[str]]:
    """Module -> the project modules it imports (`from pkg import mod` counts as importing pkg.mod)."""
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target, names, _ in imports(path, name):
            if target.split(".")[0] not in PACKAGES:
                continue
            found = {f"{target}.{n}" for n in names if f"{target}.{n}" in mods} or ({target} if target in mods else set())
            edges[name] |= found - {name}
    return edges


@pytest.mark.parametrize("package", PACKAGES)
def test_no_forbidden_import_anywhere_in_the_source(package):
    bad = []
    for name, path in modules().items():
        if name.split(".")[0] != package:
            continue
        for target, _, line in imports(path, name):
            top = target.split(".")[0]
            if top in FORBIDDEN[package] and not (top == "ray" and name.startswith(MAY_IMPORT_RAY)):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_module_imports_another_modules_private_names():
    bad = []
    for name, path in modules().items():
        for target, names, line in imports(path, name):
            if target.split(".")[0] in PACKAGES:
                bad += [f"{path.relative_to(ROOT)}:{line} imports {target}.{n}" for n in names if n.startswith("_")]
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    edges = internal_edges()
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_every_module_imports_and_pulls_in_no_forbidden_package():
    """Importing every module of a layer (what the static check cannot see: a third-party
    module that imports ray for us) leaves the forbidden packages unimported. One process
    per layer, both at once: an import is single-threaded, and each takes seconds."""
    procs = {}
    for package in ("pipelines", "evals"):
        names = [m for m in modules() if m.split(".")[0] == package]
        code = (f"import importlib, sys\nfor m in {names!r}: importlib.import_module(m)\n"
                f"bad = sorted(m for m in {sorted(FORBIDDEN[package])!r} if m in sys.modules)\n"
                "assert not bad, bad\n")
        procs[package] = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for package, proc in procs.items():
        err = proc.communicate(timeout=600)[1]
        assert proc.returncode == 0, f"importing {package}: {err[-3000:]}"


def test_validating_a_manifest_imports_neither_torch_nor_diffusers():
    code = ("import sys, pyarrow as pa\nfrom pipelines.registry.models import ModelRegistry\n"
            "from pipelines.validation import validate_manifest\nfrom pipelines.sweep import check_spec\n"
            "validate_manifest(pa.table({'prompt': ['a red circle']}), ModelRegistry())\n"
            "bad = [m for m in ('torch', 'diffusers', 'ray') if m in sys.modules]\nassert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
