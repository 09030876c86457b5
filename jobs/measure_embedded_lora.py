"""Measure the embedded model's `black_background` LoRA: the numbers in docs/lora.md.

    python jobs/measure_embedded_lora.py [--file pipelines/embedded/loras/black_background.safetensors] [--n 128]

For lora_scale 0 / 0.25 / 0.5 / 0.75 / 1 (and the base model without adapter), on `--n`
captions whose background is not black: the share of images on black (the targeted
attribute), the shape attributes' accuracy (must stay), and the largest pixel difference
to the base model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", type=Path, default=None, help="the adapter file (default: the shipped one)")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--scales", default="0,0.25,0.5,0.75,1")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    import numpy as np
    import torch

    from pipelines.embedded.lora_effect import NAME, captions_to_change, images_at, read_back
    from pipelines.embedded.measure import load_embedded
    from pipelines.registry.loras import BUILTIN_LORAS, LoraSpec

    if args.threads:
        torch.set_num_threads(args.threads)
    loras = {NAME: LoraSpec(NAME, str(args.file), ("embedded",))} if args.file else BUILTIN_LORAS
    model = load_embedded()
    captions = captions_to_change(args.n, seed=1)
    kw = dict(steps=args.steps, scheduler=args.scheduler, loras=loras)
    t0 = time.perf_counter()
    base = images_at(model, captions, None, **kw)
    out = [{"lora_scale": "none", **read_back(base, captions), "max_abs_diff": 0}]
    for s in [float(v) for v in args.scales.split(",")]:
        images = images_at(model, captions, s, **kw)
        diff = int(np.abs(images.astype(int) - base.astype(int)).max())
        out.append({"lora_scale": s, **read_back(images, captions), "max_abs_diff": diff})
    print(f"n={args.n} captions (none on a black background), {args.scheduler} {args.steps} steps, guidance 7.5, "
          f"{time.perf_counter() - t0:.0f} s")
    print("| lora_scale | on black | shape attributes | max pixel diff to base |\n|---|---|---|---|")
    for r in out:
        print(f"| {r['lora_scale']} | {r['black']:.1%} | {r['shapes']:.1%} | {r['max_abs_diff']} |")
    return out


if __name__ == "__main__":
    main()
