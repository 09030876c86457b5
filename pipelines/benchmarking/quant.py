"""What each CPU quantization scheme costs on the embedded model, against float32 weights.

    python -m pipelines.benchmarking.quant --n 64 --out quant.json   # prints the markdown table

For each scheme that runs on CPU (pipelines/registry/quant.py) the same captions and seeds
are generated with the scheme's weights and with float32 weights; reported: the mean
|pixel difference| against float32 (0..255, same seeds), the exact attribute accuracy of
the shapes domain (evals/shapes.py) with a 95 % bootstrap interval, FD against rendered
ground truth in the domain CLIP's features, the denoiser's weight bytes, load time and
images/s and CPU seconds per image (after a warm-up call, one process, all threads). The numbers of docs/quantization.md.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from evals import shapes as domain
from evals.stats import bootstrap_ci
from pipelines.embedded.measure import DomainClip, frechet_distance, generate
from pipelines.registry.models import ModelRegistry
from pipelines.registry.loading import load_model
from pipelines.registry.quant import SCHEMES, weights_bytes


def measure(n: int = 64, steps: int = 25, guidance: float = 7.5, seed: int = 0) -> dict:
    captions = domain.sample_captions(n, seed=10_000 + seed)
    reference = domain.render_captions(captions, seed=20_000 + seed)
    clip = DomainClip()
    ref_feats = clip.images(reference)
    spec = ModelRegistry().get("embedded")
    runs, images = {}, {}
    for scheme in [s for s, v in SCHEMES.items() if "cpu" in v.devices]:
        t = time.perf_counter()
        model = load_model(spec, "cpu", quant=scheme)
        load_s = time.perf_counter() - t
        generate(model, captions[:4], steps=2)  # warm-up
        t, cpu = time.perf_counter(), time.process_time()
        images[scheme] = generate(model, captions, seed=seed, steps=steps, guidance=guidance)
        seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
        acc = domain.attribute_accuracy(images[scheme], captions)
        runs[scheme] = {
            "mean_abs_diff_vs_float32": float(np.abs(images[scheme].astype(np.int16)
                                                     - images["none"].astype(np.int16)).mean()),
            "attribute_accuracy": float(acc.mean()),
            "attribute_accuracy_ci95": list(bootstrap_ci(acc)),
            "fd_embedded": frechet_distance(clip.images(images[scheme]), ref_feats),
            "unet_weights_bytes": weights_bytes(model.pipe.unet),
            "load_s": load_s,
            "images_per_s": n / seconds,
            "cpu_s_per_image": cpu / n,  # less sensitive than images/s to other processes on a shared machine
            "record": model.quant_record,
        }
    return {"n": n, "steps": steps, "guidance": guidance, "scheduler": spec.scheduler,
            "size": f"{spec.height}x{spec.width}", "runs": runs}


def to_markdown(results: dict) -> str:
    lines = ["| quant | mean \\|pixel diff\\| vs float32 (0-255) | attribute accuracy [95 % CI] | FD (embedded) | "
             "UNet weights (MB) | load (s) | images/s | CPU s/image |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        lo, hi = r["attribute_accuracy_ci95"]
        lines.append(f"| {name} | {r['mean_abs_diff_vs_float32']:.2f} | {r['attribute_accuracy']:.3f} "
                     f"[{lo:.3f}, {hi:.3f}] | {r['fd_embedded']:.2f} | {r['unet_weights_bytes'] / 1e6:.2f} | "
                     f"{r['load_s']:.1f} | {r['images_per_s']:.3f} | {r['cpu_s_per_image']:.2f} |")
    lines.append(f"\nn = {results['n']} captions, {results['steps']} {results['scheduler']} steps, guidance "
                 f"{results['guidance']:g}, {results['size']}, the same seeds for every scheme")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=64, help="captions (images per scheme)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--out", default=None, help="write the measurements as JSON here")
    args = p.parse_args(argv)
    results = measure(args.n, args.steps)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    print(to_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
