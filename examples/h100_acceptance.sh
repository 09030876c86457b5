#!/usr/bin/env bash
# Issue 6's GPU measurements, in parts that each fit a 10-minute slot on one H100.
#
#   bash examples/h100_acceptance.sh PART [OUT]      PART: sd15 | sd15-small | sdxl | mixed | speed | compile | reuse | all
#
# OUT defaults to bench/h100. On a machine without ray/diffusers installed (the lent GPU
# box), build the wheels first on a machine with a registry (../shared/tools/gpu-wheels
# .whl) and carry .whl along; this script installs them into /tmp/site when present.
# Each part writes throughput.{md,json,parquet} under OUT/PART; copy the tables into
# docs/performance.md with the machine line they print.
set -euo pipefail
PART="${1:?usage: $0 sd15|sd15-small|sdxl|mixed|speed|compile|reuse|all [OUT]}"
OUT="${2:-bench/h100}"
if [ -d .whl ] && ! python3 -c "import diffusers, ray" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
status=0
# A benchmark that exits 3 (regression) or 4 (pixel check) has still written its tables:
# note it and go on with the part, exit with it at the end.
B=bench
bench() {
  python3 jobs/benchmark.py --suite throughput "$@" || { status=$?; echo "[h100_acceptance] exit $status: $*" >&2; }
}

run() {
  case "$1" in
    # SD 1.5, 512px, 50 DDIM steps, CFG 7.5: plain diffusers vs actor vs Ray job (>= 6 img/s, Ray >= 95 %)
    sd15) $B --model sd15 --batch-sizes 16,32 --out "$OUT/sd15" ;;
    # the same at small batches, for the table against the reference row
    sd15-small) $B --model sd15 --batch-sizes 1,4 --out "$OUT/sd15-small" ;;
    # SDXL, 1024px, 30 steps (>= 1.2 img/s)
    sdxl) $B --model sdxl --steps 30 --batch-sizes 1,4,8 --rows 16 --out "$OUT/sdxl" ;;
    # 4 schedulers x 3 step counts x 3 guidance scales, 2 rows each: grouped vs continuous, device busy (>= 90 %)
    mixed) $B --model sd15 --sweep mixed --batching config,continuous --batch-sizes 16 --rows 72 --out "$OUT/mixed" ;;
    # speed options, actor only
    speed)
      $B --model sd15 --batch-sizes 16 --paths actor --out "$OUT/eager"
      $B --model sd15 --batch-sizes 16 --paths actor --channels-last --out "$OUT/channels-last"
      $B --model sd15 --batch-sizes 16 --paths actor --fuse-qkv --out "$OUT/fuse-qkv" ;;
    # torch.compile, paid in the warm-up and reported as warmup_s (max-autotune may not fit one 10-minute call)
    compile) $B --model sd15 --batch-sizes 16 --paths actor --channels-last --fuse-qkv --compile default --out "$OUT/compile" ;;
    # feature reuse (cache_interval manifest value) vs unmodified plain diffusers
    reuse)
      for n in 2 3; do $B --model sd15 --batch-sizes 16 --paths plain,actor --cache-interval $n --out "$OUT/reuse-$n"; done
      $B --model sdxl --steps 30 --batch-sizes 8 --rows 16 --paths actor --cache-interval 3 --out "$OUT/reuse-sdxl" ;;
    all) for p in sd15 sd15-small sdxl mixed speed compile reuse; do run "$p"; done ;;
    *) echo "unknown part $1" >&2; exit 2 ;;
  esac
}
run "$PART"
exit "$status"
