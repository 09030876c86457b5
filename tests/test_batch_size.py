"""Batch size from free memory, and what an out-of-memory error does to later batches.

There is no GPU here, so the device running out of memory is simulated with a forward
hook on the real UNet that raises torch.OutOfMemoryError above a batch size, as the CUDA
allocator would on a card with room for that many latents."""

import copy

import pyarrow as pa
import pytest
import torch

from jobs import generate as gen_job
from pipelines.generation.batch_size import AUTO_CAP, CPU_BATCH_SIZE, BatchSizes, fit_batch_size
from pipelines.generation.continuous import generate_mixed
from pipelines.generation.grouped import generate
from pipelines.registry.models import ModelRegistry
from pipelines.validation import validate_manifest

REG = ModelRegistry()
GiB = 2**30


def rows_for(n: int, **cols):
    cols = {"prompt": [f"a red circle {i}" for i in range(n)], "steps": [2] * n, **cols}
    return validate_manifest(pa.table(cols), REG, default_model="tiny-random").to_pylist()


def test_fit_batch_size_fills_free_memory_within_headroom():
    n = fit_batch_size(available=80 * GiB, overhead=2 * GiB, per_row=GiB)
    assert n == AUTO_CAP  # 0.85 * 80 - 2 = 66 rows would fit; capped
    assert fit_batch_size(available=20 * GiB, overhead=2 * GiB, per_row=GiB) == 15  # 0.85 * 20 - 2 = 15
    assert fit_batch_size(available=GiB, overhead=2 * GiB, per_row=GiB) == 1  # never below one row
    assert fit_batch_size(available=20 * GiB, overhead=0, per_row=0, cap=16) == 16  # nothing grows with n


def test_auto_is_the_cpu_default_without_a_gpu(tiny_model):
    sizes = BatchSizes(tiny_model, None)
    assert sizes.get(32, 32) == CPU_BATCH_SIZE
    assert BatchSizes(tiny_model, 5).get(64, 64) == 5


def test_lower_halves_and_is_per_image_size(tiny_model):
    sizes = BatchSizes(tiny_model, 16)
    sizes.lower(32, 32, failed=16)
    assert sizes.get(32, 32) == 8 and sizes.get(64, 64) == 16
    sizes.lower(32, 32, failed=16)  # a late report of a larger batch never raises it again
    assert sizes.get(32, 32) == 8
    sizes.lower(32, 32, failed=1)
    assert sizes.get(32, 32) == 1


@pytest.fixture()
def small_memory_model(tiny_model):
    """The tiny model on a 'device' that holds at most 4 UNet rows (2 images with CFG)."""
    model = copy.copy(tiny_model)
    model.pipe = copy.deepcopy(tiny_model.pipe)
    calls = []

    def hook(module, args, kwargs):
        calls.append(args[0].shape[0])
        if args[0].shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated: room for 4 UNet rows)")

    model.pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    return model, calls


def test_out_of_memory_lowers_the_batch_for_the_rest(small_memory_model, tiny_model):
    model, calls = small_memory_model
    rows = rows_for(16, guidance=[7.5] * 16)
    sizes = BatchSizes(model, 8)
    out = generate(model, rows, sizes)
    assert [r.status for r in out] == ["ok"] * 16
    assert sizes.get(32, 32) == 2
    # The first batch of 8 fails (16 UNet rows), its first half of 4 fails (8 rows), then every
    # batch is 2: later batches start at the lowered size instead of failing again.
    failed = [n for n in calls if n > 4]
    assert failed == [16, 8], failed
    assert max(r.batch_size for r in out) == 2
    reference = generate(tiny_model, rows, 2)
    assert all((a.pixels.astype(int) - b.pixels.astype(int)).__abs__().max() <= 1 for a, b in zip(out, reference))


def test_out_of_memory_in_continuous_batching_falls_back_with_a_lower_batch(small_memory_model):
    model, calls = small_memory_model
    rows = rows_for(6, guidance=[7.5] * 6)
    sizes = BatchSizes(model, 6)
    out = generate_mixed(model, rows, sizes)
    assert [r.status for r in out] == ["ok"] * 6
    assert sizes.get(32, 32) <= 2


def test_batch_size_flag_accepts_auto_and_rejects_nonsense(capsys):
    assert gen_job.parse_args(["m.parquet", "--out", "o", "--batch-size", "auto"]).batch_size == "auto"
    assert gen_job.parse_args(["m.parquet", "--out", "o", "--batch-size", "3"]).batch_size == 3
    for bad in ("0", "many"):
        with pytest.raises(SystemExit):
            gen_job.parse_args(["m.parquet", "--out", "o", "--batch-size", bad])
        assert "--batch-size" in capsys.readouterr().err
