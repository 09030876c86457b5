"""The row contract is the one place a manifest column is declared.

The test adds a pixel-changing column to a copy of the contract (one `column(...)` line, as
a contributor would) and checks that validation, the Arrow schema, the sample_id, the run
key and the sweep spec all know it without another edit.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa

from pipelines.contract import COLUMNS, MANIFEST_SCHEMA, RUN_KEY, Row, sample_id

ROOT = Path(__file__).resolve().parents[1]
NEW_FIELD = ('    strength: float = column(pa.float64(), 0.0, lo=0, hi=2, run_key=True, sweep="strengths",\n'
             '                               example=(0.5, 1.0), doc="a new knob")\n')


def test_the_schema_and_keys_come_from_the_row_fields():
    assert MANIFEST_SCHEMA.names == [c.name for c in COLUMNS] == [f for f in Row.__dataclass_fields__]
    assert set(RUN_KEY) == {c.name for c in COLUMNS if c.run_key} and RUN_KEY[:3] == ["model", "height", "width"]


def test_a_later_pixel_column_at_its_default_keeps_old_sample_ids():
    row = dict(model="embedded", prompt="a red circle", negative_prompt="", seed=3, scheduler="ddim", steps=4,
               guidance=2.0, height=64, width=64)
    assert sample_id(row) == sample_id({**row, "cache_interval": 1}) != sample_id({**row, "cache_interval": 2})


def test_adding_a_column_is_one_edit_in_the_contract(tmp_path):
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines", ignore=shutil.ignore_patterns("embedded"))
    (tmp_path / "pipelines" / "embedded").symlink_to(ROOT / "pipelines" / "embedded")
    contract = tmp_path / "pipelines" / "contract.py"
    text = contract.read_text()
    anchor = "    @classmethod\n    def of("
    assert anchor in text
    contract.write_text(text.replace(anchor, NEW_FIELD + "\n" + anchor, 1))
    code = r'''
import pyarrow as pa
from pipelines.contract import MANIFEST_SCHEMA, RUN_KEY, Row, sample_id
from pipelines.registry.models import ModelRegistry
from pipelines.sweep import SPEC_KEYS, build_manifest
from pipelines.validation import ManifestError, validate_manifest

reg = ModelRegistry()
assert MANIFEST_SCHEMA.field("strength").type == pa.float64() and "strength" in RUN_KEY
t = validate_manifest(pa.table({"prompt": ["a", "a", "b"], "seed": [1, 1, 2], "strength": [None, 0.5, 1.0]}), reg)
assert t.column("strength").to_pylist() == [0.0, 0.5, 1.0], t.column("strength")
ids = t.column("sample_id").to_pylist()
assert len(set(ids)) == 3  # the same prompt and seed at another scale is another image
row = Row.of(t.slice(1, 1).to_pylist()[0])
assert row.strength == 0.5 and 0.5 in row.config()
plain = {k: v for k, v in t.slice(0, 1).to_pylist()[0].items() if k not in ("sample_id", "strength")}
assert ids[0] == sample_id(plain)  # at its default the new column leaves the old id
try:
    validate_manifest(pa.table({"prompt": ["a", "b"], "strength": [1.0, 5.0]}), reg)
    raise AssertionError("strength 5.0 accepted")
except ManifestError as e:
    assert "row 1, column 'strength': got 5.0" in str(e), e
assert "strengths" in SPEC_KEYS
m = build_manifest({"prompts": ["a red circle"], "strengths": [0.5, 1.0], "steps": [2]}, reg)
assert sorted(m.column("strength").to_pylist()) == [0.5, 1.0]
try:
    build_manifest({"prompts": ["a"], "strengths": [3]}, reg)
    raise AssertionError("strengths [3] accepted")
except Exception as e:
    assert "'strengths'" in str(e) and "e.g. [0.5, 1.0]" in str(e), e
print("ok")
'''
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_rows_are_typed_records_with_defaults_for_columns_added_later():
    r = Row.of(dict(sample_id="x", model="embedded", prompt="a", negative_prompt="", seed=3, scheduler="ddim",
                    steps=4, guidance=2.0, height=64, width=64, my_column="kept elsewhere"))
    assert r.cache_interval == 1 and r.lora == "" and r.config() == (64, 64, "ddim", 4, 2.0, 1.0, 1.0, 1, "", 1.0)
    assert isinstance(pa.scalar(r.seed, MANIFEST_SCHEMA.field("seed").type).as_py(), int)
