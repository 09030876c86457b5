"""Measure the embedded model against its acceptance criteria; the numbers in docs/embedded.md.

    python -m pipelines.embedded.measure [--n 512] [--threads 2] [--json out.json]

Why rendered references: the domain's ground truth is free, so FD here compares generated
images with exact renders of the same captions (another seed's jitter), in the domain
CLIP's feature space. The baseline "random model" keeps the trained VAE and text encoder and
re-initialises only the UNet (same config), so it measures what the UNet learned.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from evals import shapes as domain
from pipelines.embedded import CLIP_DIR, MODEL_DIR


def load_pipeline(model_dir=MODEL_DIR):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_unet_pipeline(pipe, seed: int = 0):
    """The same pipeline with a freshly initialised UNet of the same architecture."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(pipe.unet.config).eval()
    other = StableDiffusionPipeline(**{**pipe.components, "unet": unet})
    other.set_progress_bar_config(disable=True)
    return other


def generate(pipe, captions, seed: int = 0, steps: int = 25, guidance: float = 7.5, scheduler=None,
             batch_size: int = 32) -> np.ndarray:
    """uint8 (N, 64, 64, 3) images; image i uses its own generator seeded `seed + i`."""
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    out = []
    for i in range(0, len(captions), batch_size):
        chunk = list(captions[i : i + batch_size])
        gens = [torch.Generator().manual_seed(seed + i + k) for k in range(len(chunk))]
        images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                      output_type="np").images
        out.append(np.clip(np.round(images * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    from evals.fid import feature_stats, frechet_distance as fd

    return float(fd(*feature_stats(a), *feature_stats(b)))


class DomainClip:
    """Image/text embeddings of the domain CLIP (the `embedded` feature extractor)."""

    def __init__(self, clip_dir=CLIP_DIR):
        from evals.features import get_extractor

        self.extractor = get_extractor("embedded", embedded_clip=clip_dir, device="cpu")

    def images(self, images: np.ndarray) -> np.ndarray:
        return self.extractor(images)

    def texts(self, captions) -> np.ndarray:
        return self.extractor.embed_text(list(captions))


def clip_scores(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    from evals.clip_score import raw_clip_scores

    return raw_clip_scores(image_emb, text_emb)


def matched_beats_shuffled(image_emb, text_emb, seed: int = 0) -> float:
    """Share of images whose own caption scores higher than a caption drawn from another row."""
    perm = np.random.default_rng(seed).permutation(len(text_emb))
    perm = np.where(perm == np.arange(len(perm)), (perm + 1) % len(perm), perm)
    return float(np.mean(clip_scores(image_emb, text_emb) > clip_scores(image_emb, text_emb[perm])))


def measure(n: int = 512, seed: int = 0) -> dict:
    captions = domain.sample_captions(n, seed=10_000 + seed)
    reference = domain.render_captions(captions, seed=20_000 + seed)

    import diffusers  # noqa: F401  (importing the library is not loading the model)

    t = time.perf_counter()
    pipe = load_pipeline()
    load_s = time.perf_counter() - t
    generate(pipe, captions[:4], steps=2)  # warm-up
    t = time.perf_counter()
    generate(pipe, captions[:16], seed=seed)
    gen16_s = time.perf_counter() - t

    runs = {
        "trained_g7.5_25steps": generate(pipe, captions, seed=seed),
        "trained_g7.5_2steps": generate(pipe, captions, seed=seed, steps=2),
        "trained_g1.0_25steps": generate(pipe, captions, seed=seed, guidance=1.0),
        "random_unet_g7.5_25steps": generate(random_unet_pipeline(pipe), captions, seed=seed),
        "rendered_ground_truth": domain.render_captions(captions, seed=30_000 + seed),
    }
    clip = DomainClip()
    ref_feats, text_emb = clip.images(reference), clip.texts(captions)
    results = {"n": n, "load_s": load_s, "generate_16_images_25_steps_s": gen16_s, "runs": {}}
    for name, images in runs.items():
        feats = clip.images(images)
        results["runs"][name] = {
            "attribute_accuracy": float(domain.attribute_accuracy(images, captions).mean()),
            "fd_embedded": frechet_distance(feats, ref_feats),
            "clip_score": float(clip_scores(feats, text_emb).mean()),
            "matched_beats_shuffled": matched_beats_shuffled(feats, text_emb),
        }
    return results


def to_markdown(results: dict) -> str:
    lines = ["| run | attribute accuracy | FD (embedded) | CLIP score | matched > shuffled |", "|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        lines.append(f"| {name} | {r['attribute_accuracy']:.3f} | {r['fd_embedded']:.2f} | {r['clip_score']:.2f} | "
                     f"{r['matched_beats_shuffled']:.3f} |")
    lines.append(f"\nn = {results['n']} captions; load {results['load_s']:.2f} s; "
                 f"16 images at 25 steps {results['generate_16_images_25_steps_s']:.2f} s")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = measure(args.n, args.seed)
    print(to_markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
