"""Measuring the embedded model against its acceptance criteria: the numbers in docs/embedded.md
(`jobs/measure_embedded.py` is the command line; tests/test_embedded_model.py asserts the
criteria on fewer captions).

Why rendered references: the domain's ground truth is free, so FD here compares generated
images with exact renders of the same captions (another seed's jitter), in the domain
CLIP's feature space. The baseline "random model" keeps the trained VAE and text encoder and
re-initialises only the UNet (same config), so it measures what the UNet learned.

Images are made by the project's generation step (`pipelines.generation.grouped.generate`)
from manifest rows, so the measured model is the one a sweep runs.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from evals import shapes as domain
from evals.clip_score import clip_score, raw_clip_scores
from pipelines.contract import Row, sample_id
from pipelines.embedded import CLIP_DIR
from pipelines.generation.grouped import generate as generate_rows
from pipelines.registry.models import ModelRegistry
from pipelines.registry.loading import LoadedModel, load_model


def load_embedded(device: str = "cpu") -> LoadedModel:
    """The shipped model as the registry loads it for a sweep (model `embedded`)."""
    return load_model(ModelRegistry().get("embedded"), device=device)


def random_unet_model(model: LoadedModel, seed: int = 0) -> LoadedModel:
    """The same model with a freshly initialised UNet of the same architecture."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(model.pipe.unet.config).eval().to(model.device)
    pipe = StableDiffusionPipeline(**{**model.pipe.components, "unet": unet}, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return dataclasses.replace(model, pipe=pipe, digest="random-unet")


def caption_rows(model: LoadedModel, captions, seed: int, steps: int, guidance: float,
                 scheduler: str | None = None) -> list[Row]:
    """One manifest row per caption at the model's image size; row i has seed `seed + i`."""
    rows = []
    for i, caption in enumerate(captions):
        fields = dict(prompt=caption, negative_prompt="", seed=seed + i, model=model.spec.name,
                      scheduler=scheduler or model.spec.scheduler, steps=steps, guidance=guidance,
                      height=model.spec.height, width=model.spec.width)
        rows.append(Row.of(dict(sample_id=sample_id(fields), **fields)))
    return rows


def generate(model: LoadedModel, captions, seed: int = 0, steps: int = 25, guidance: float = 7.5,
             scheduler: str | None = None, batch_size: int = 32) -> np.ndarray:
    """uint8 (N, 64, 64, 3) images, image i from seed `seed + i`. `scheduler` is a registry
    name (pipelines.registry.schedulers; default: the model's). A row that fails is an error
    here: a measurement with missing images would be wrong."""
    results = generate_rows(model, caption_rows(model, captions, seed, steps, guidance, scheduler), batch_size)
    failed = [r for r in results if r.status != "ok"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(results)} images failed; first: {failed[0].error}")
    return np.stack([r.pixels for r in results])


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
    """Per-pair 100 cos, unclamped (the set's score is `clip_score`: max(mean, 0))."""
    return raw_clip_scores(image_emb, text_emb)


def matched_beats_shuffled(image_emb, text_emb, seed: int = 0) -> float:
    """Share of images whose own caption scores higher than a caption drawn from another row."""
    perm = np.random.default_rng(seed).permutation(len(text_emb))
    perm = np.where(perm == np.arange(len(perm)), (perm + 1) % len(perm), perm)
    return float(np.mean(raw_clip_scores(image_emb, text_emb) > raw_clip_scores(image_emb, text_emb[perm])))


def measure(n: int = 512, seed: int = 0) -> dict:
    """Every number of docs/embedded.md's table, on `n` captions sampled from the grammar."""
    captions = domain.sample_captions(n, seed=10_000 + seed)
    reference = domain.render_captions(captions, seed=20_000 + seed)

    import diffusers  # noqa: F401  (importing the library is not loading the model)

    t = time.perf_counter()
    model = load_embedded()
    load_s = time.perf_counter() - t
    generate(model, captions[:4], steps=2)  # warm-up
    t = time.perf_counter()
    generate(model, captions[:16], seed=seed)
    gen16_s = time.perf_counter() - t

    runs = {
        "trained_g7.5_25steps": generate(model, captions, seed=seed),
        "trained_g7.5_2steps": generate(model, captions, seed=seed, steps=2),
        "trained_g1.0_25steps": generate(model, captions, seed=seed, guidance=1.0),
        "random_unet_g7.5_25steps": generate(random_unet_model(model), captions, seed=seed),
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
            "clip_score": clip_score(feats, text_emb),  # torchmetrics' definition, as in the evaluation report
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
