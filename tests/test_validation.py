"""Manifest validation: defaults filled in, every bad value named by row and column."""

import math

import numpy as np
import pyarrow as pa
import pytest

from pipelines.registry.models import ModelRegistry
from pipelines.contract import MANIFEST_COLUMNS
from pipelines.validation import ManifestError, validate_manifest
from pipelines.contract import sample_id

REG = ModelRegistry()


def validate(table, **kw):
    return validate_manifest(table, REG, default_model="tiny-random", **kw)


def test_defaults_are_filled_from_the_model():
    out = validate(pa.table({"prompt": ["a cat", "a cat", "a dog"]})).to_pylist()
    spec = REG.get("tiny-random")
    for row in out:
        assert (row["scheduler"], row["steps"], row["guidance"], row["height"], row["width"]) == (
            spec.scheduler, spec.steps, spec.guidance, spec.height, spec.width)
        assert row["model"] == "tiny-random" and row["negative_prompt"] == ""
        assert row["sample_id"] == sample_id(row)
    # the same prompt twice gets two different derived seeds; derivation is stable
    assert out[0]["seed"] != out[1]["seed"]
    assert validate(pa.table({"prompt": ["a cat", "a cat", "a dog"]})).to_pylist() == out


def test_extra_columns_pass_through_unchanged():
    tags = pa.array([[1, 2], None], type=pa.list_(pa.int32()))
    out = validate(pa.table({"prompt": ["x", "y"], "tags": tags, "note": ["n1", None]}))
    assert out.column_names == MANIFEST_COLUMNS + ["tags", "note"]
    assert out.column("tags").type == pa.list_(pa.int32())
    assert out.column("tags").to_pylist() == [[1, 2], None]
    assert out.column("note").to_pylist() == ["n1", None]


def test_a_column_named_like_a_result_column_is_rejected():
    with pytest.raises(ManifestError, match="column 'dtype'.*not a result column name"):
        validate(pa.table({"prompt": ["x"], "dtype": ["fp16"], "note": ["ok"]}))


def test_sample_id_changes_with_every_pixel_field():
    base = validate(pa.table({"prompt": ["p"], "seed": [1]})).to_pylist()[0]
    for col, value in [("prompt", "q"), ("seed", 2), ("steps", 3), ("guidance", 2.0), ("scheduler", "ddim"),
                       ("negative_prompt", "blurry"), ("height", 64), ("cache_interval", 3)]:
        other = validate(pa.table({"prompt": ["p"], "seed": [1], col: [value]})).to_pylist()[0]
        assert other["sample_id"] != base["sample_id"], col


BAD = [
    ("missing prompt", {"text": ["a"]}, None, "prompt"),
    ("null prompt", {"prompt": ["ok", None]}, 1, "prompt"),
    ("empty prompt", {"prompt": ["ok", "   "]}, 1, "prompt"),
    ("non-string prompt", {"prompt": [1, 2]}, None, "prompt"),
    ("steps zero", {"prompt": ["a", "b"], "steps": [5, 0]}, 1, "steps"),
    ("steps too many", {"prompt": ["a"], "steps": [1001]}, 0, "steps"),
    ("float steps", {"prompt": ["a"], "steps": [2.5]}, None, "steps"),
    ("nan guidance", {"prompt": ["a", "b"], "guidance": [1.0, math.nan]}, 1, "guidance"),
    ("inf guidance", {"prompt": ["a"], "guidance": [math.inf]}, 0, "guidance"),
    ("negative guidance", {"prompt": ["a"], "guidance": [-1.0]}, 0, "guidance"),
    ("unknown scheduler", {"prompt": ["a", "b"], "scheduler": ["ddim", "nope"]}, 1, "scheduler"),
    ("flow scheduler on eps model", {"prompt": ["a"], "scheduler": ["flow_match_euler"]}, 0, "scheduler"),
    ("unknown model", {"prompt": ["a"], "model": ["/etc/passwd"]}, 0, "model"),
    ("odd height", {"prompt": ["a", "b"], "height": [32, 33]}, 1, "height"),
    ("width not multiple", {"prompt": ["a"], "width": [36]}, 0, "width"),
    ("negative seed", {"prompt": ["a"], "seed": [-1]}, 0, "seed"),
    ("float seed", {"prompt": ["a"], "seed": [1.5]}, None, "seed"),
    ("duplicate sample_id", {"prompt": ["a", "b"], "sample_id": ["s", "s"]}, 1, "sample_id"),
    ("identical rows", {"prompt": ["a", "a"], "seed": [3, 3]}, 1, "sample_id"),
    ("cache_interval zero", {"prompt": ["a", "b"], "cache_interval": [2, 0]}, 1, "cache_interval"),
    ("float cache_interval", {"prompt": ["a"], "cache_interval": [1.5]}, None, "cache_interval"),
    ("feature reuse on a transformer", {"prompt": ["a"], "model": ["sd35-medium"], "cache_interval": [3]}, 0,
     "cache_interval"),
]


@pytest.mark.parametrize("name,cols,row,column", BAD, ids=[b[0] for b in BAD])
def test_bad_manifest_names_row_and_column(name, cols, row, column):
    with pytest.raises(ManifestError) as err:
        validate(pa.table(cols))
    msg = str(err.value)
    assert f"column {column!r}" in msg
    if row is not None:
        assert f"row {row}," in msg
    assert "\n" not in msg


def test_seed_at_or_above_2_63_is_rejected():
    seeds = pa.array([2**63 - 1, 2**63], type=pa.uint64())
    with pytest.raises(ManifestError, match=r"row 1, column 'seed'"):
        validate(pa.table({"prompt": ["a", "b"], "seed": seeds}))


def test_non_utf8_prompt_named_by_row():
    prompts = pa.array([b"fine", b"\xff\xfebad"], type=pa.binary())
    with pytest.raises(ManifestError, match=r"row 1, column 'prompt'.*UTF-8"):
        validate(pa.table({"prompt": prompts}))


def test_empty_manifest():
    with pytest.raises(ManifestError, match="at least one row"):
        validate(pa.table({"prompt": pa.array([], pa.string())}))


def test_all_problems_listed_at_once_up_to_a_limit():
    n = 50
    with pytest.raises(ManifestError) as err:
        validate(pa.table({"prompt": ["a"] * n, "steps": np.zeros(n, dtype=np.int64), "guidance": [-1.0] * n}),
                 max_problems=5)
    e = err.value
    assert len(e.problems) == 5 and "(and 95 more)" in str(e)
