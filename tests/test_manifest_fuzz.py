"""Randomly corrupted manifests: a clear error naming row and column, or a correct
result -- never a traceback or a silently dropped row."""

import math
import re

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.errors import InputError
from pipelines.storage.manifest import read_manifest
from pipelines.registry.models import ModelRegistry
from pipelines.contract import MAX_STEPS
from pipelines.validation import ManifestError, validate_manifest

REG = ModelRegistry()
GOOD = {"prompt": "a red circle", "seed": 7, "steps": 4, "guidance": 7.5, "scheduler": "ddim", "height": 32, "width": 32}

junk = st.one_of(
    st.none(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["", " ", "ddim", "euler_a", "nope", "tiny-random", "../x"]),
)


@st.composite
def manifests(draw):
    n = draw(st.integers(1, 6))
    rows = [dict(GOOD, prompt=f"prompt {i}", seed=i) for i in range(n)]
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, n - 1))
        col = draw(st.sampled_from(sorted(GOOD) + ["model", "negative_prompt", "sample_id"]))
        rows[i][col] = draw(junk)
    return rows


def to_table(rows):
    """Columns whose values mix types become strings, as a careless writer would."""
    cols = {}
    for col in {c for r in rows for c in r}:
        values = [r.get(col) for r in rows]
        try:
            cols[col] = pa.array(values, from_pandas=False)
        except (pa.ArrowException, OverflowError):
            cols[col] = pa.array([None if v is None else str(v) for v in values])
    return pa.table(cols)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(manifests())
def test_corrupted_manifest_gives_clear_error_or_correct_result(rows):
    table = to_table(rows)
    try:
        out = validate_manifest(table, REG, default_model="tiny-random")
    except ManifestError as e:
        msg = str(e)
        assert "\n" not in msg and "Traceback" not in msg
        assert re.search(r"(row \d+|manifest), column '[a-z_]+': got .*; expected ", msg), msg
        return
    assert out.num_rows == len(rows)
    for r in out.to_pylist():
        assert isinstance(r["prompt"], str) and r["prompt"].strip()
        assert 1 <= r["steps"] <= MAX_STEPS and 0 <= r["seed"] < 2**63
        assert math.isfinite(r["guidance"]) and r["guidance"] >= 0
        assert r["height"] % 8 == 0 and r["width"] % 8 == 0
        assert r["model"] in REG
    assert len(set(out.column("sample_id").to_pylist())) == len(rows)


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=0, max_size=64))
def test_random_bytes_are_not_a_manifest(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("blob") / "m.parquet"
    path.write_bytes(blob)
    try:
        read_manifest(str(path))
    except InputError as e:
        assert "not a Parquet file" in str(e) or "cannot read" in str(e)
    else:
        raise AssertionError("random bytes were read as a manifest")


def test_directory_with_mixed_schemas(tmp_path):
    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"prompt": ["b"], "steps": [3]}), tmp_path / "b.parquet")
    try:
        read_manifest(str(tmp_path))
    except InputError as e:
        assert "different schemas" in str(e) and "steps" in str(e)
    else:
        raise AssertionError("mixed schemas accepted")


def test_directory_of_parquet_files_is_one_manifest(tmp_path):
    for i in range(3):
        pq.write_table(pa.table({"prompt": [f"p{i}", f"q{i}"]}), tmp_path / f"{i}.parquet")
    assert read_manifest(str(tmp_path)).num_rows == 6


def test_unreachable_object_store_uri_is_a_clear_error():
    uri = "s3://no-such-bucket/manifest.parquet?endpoint_override=127.0.0.1:9&scheme=http&connect_timeout=1&request_timeout=1"
    try:
        read_manifest(uri)
    except InputError as e:
        assert str(e).startswith("manifest s3://no-such-bucket") and "\n" not in str(e)
    else:
        raise AssertionError("unreachable URI read")
