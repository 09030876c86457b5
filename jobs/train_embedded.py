"""Train the embedded default model from scratch: domain CLIP, VAE, UNet.

    python jobs/train_embedded.py --out pipelines/embedded [--device auto] [--seed 0] [--preset default]

Writes `<out>/clip` (CLIPModel + tokenizer + processor) and `<out>/model` (a
StableDiffusionPipeline whose text encoder is the domain CLIP's text tower). Every image is
rendered on the fly from seeded scene samples (evals/shapes.py), so the run
needs no data and no download. The three stages run in order because each depends on the
previous one: the UNet is conditioned on the frozen CLIP text tower and denoises the frozen
VAE's latents. The recipe is in pipelines/embedded/training/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipelines.embedded.training.settings import PRESETS, number_fields, with_overrides  # noqa: E402
from pipelines.embedded.training.stages import STAGES, pick_device, train  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "pipelines" / "embedded")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="smoke: seconds, for tests; default: the shipped recipe (~1.5 h on 2 idle CPU cores)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default; on a busy shared CPU 1 is much faster than 2)")
    p.add_argument("--resume-vae", action="store_true",
                   help="start the vae stage from the VAE already in --out (to train it further)")
    p.add_argument("--vae-decoder-only", action="store_true",
                   help="with --resume-vae: train only the decoder (keeps the latent space a UNet uses)")
    p.add_argument("--resume-unet", action="store_true",
                   help="start the unet stage from the UNet already in --out (to train a model further)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help="which stages to train; the others are loaded from --out (e.g. --stages unet)")
    for name, kind in number_fields().items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=f"override the preset's {name}")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    settings = with_overrides(args.preset, {name: getattr(args, name) for name in number_fields()})
    stages = set(args.stages.split(","))
    if not stages <= set(STAGES):
        raise SystemExit(f"--stages {args.stages!r}: allowed stages are {', '.join(STAGES)} (comma-separated)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    print(f"device={device} preset={args.preset} stages={sorted(stages)} {settings}", flush=True)
    return train(args.out, settings, stages, args.seed, device, resume_vae=args.resume_vae,
                 vae_decoder_only=args.vae_decoder_only, resume_unet=args.resume_unet)


if __name__ == "__main__":
    main()
