"""Train the embedded model's shipped LoRA, `black_background` (every scene on black).

    python jobs/train_embedded_lora.py [--out pipelines/embedded/loras] [--steps 600] [--seed 0]

Starts from the shipped embedded model, trains low-rank updates of its UNet's attention
projections on renders of captions with the background replaced by black, and writes one
safetensors file in diffusers' LoRA format. The recipe is in
pipelines/embedded/training/lora.py; the measured effect is in docs/lora.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipelines.embedded.training.lora import LORA_DIR, WEIGHT_NAME, LoraSettings, save_lora, train_lora  # noqa: E402


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=LORA_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    for f in fields(LoraSettings):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline

    from pipelines.embedded import MODEL_DIR

    settings = LoraSettings(**{f.name: getattr(args, f.name) for f in fields(LoraSettings)})
    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL_DIR), safety_checker=None, requires_safety_checker=False)
    t0 = time.perf_counter()
    path = save_lora(StableDiffusionPipeline, train_lora(pipe, settings, args.seed), args.out, WEIGHT_NAME)
    print(f"wrote {path} ({path.stat().st_size} bytes) in {time.perf_counter() - t0:.0f} s; {settings}")
    return path


if __name__ == "__main__":
    main()
