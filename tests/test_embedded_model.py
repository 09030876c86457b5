"""The shipped embedded model: it loads offline, and it measurably learned the domain.

Acceptance criteria from issue 4, on a modest n with margins (the n=512 measurements are
in docs/embedded.md, made by `python jobs/measure_embedded.py`). Images come from the
project's generation step, as in a sweep.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from evals import shapes as domain
from pipelines.embedded import CLIP_DIR, MODEL_DIR
from pipelines.embedded import measure as m

N = 48
GEN_SEED = 123


@pytest.fixture(scope="module")
def model():
    from diffusers import StableDiffusionPipeline  # noqa: F401  (import time is not load time)

    return m.load_embedded()


@pytest.fixture(scope="module")
def loaded(model):
    return model.pipe, model.load_seconds


@pytest.fixture(scope="module")
def pipe(loaded):
    return loaded[0]


@pytest.fixture(scope="module")
def captions():
    return domain.sample_captions(N, seed=777)


@pytest.fixture(scope="module")
def images_g75(model, captions):
    return m.generate(model, captions, seed=GEN_SEED)


@pytest.fixture(scope="module")
def clip():
    return m.DomainClip()


@pytest.fixture(scope="module")
def embeddings(clip, captions, images_g75):
    return clip.images(images_g75), clip.texts(captions)


def test_pipeline_loads_offline_with_the_registry_defaults(loaded):
    # Load and generation times (issue: < 5 s, 16 images < 10 s) are measured by
    # `python jobs/measure_embedded.py` and recorded in docs/embedded.md, not asserted here.
    from diffusers import DDIMScheduler

    pipe, _ = loaded
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.scheduler.config.num_train_timesteps == 1000
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64  # default height/width
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.tokenizer.model_max_length <= pipe.text_encoder.config.max_position_embeddings
    # The generator's text encoder is the domain CLIP's text tower.
    from transformers import CLIPModel

    clip_text = CLIPModel.from_pretrained(CLIP_DIR).text_model.state_dict()
    for k, v in pipe.text_encoder.state_dict().items():
        assert torch.equal(v, clip_text[k]), k


def test_weights_are_safetensors_and_small():
    root = MODEL_DIR.parent
    files = [p for d in (MODEL_DIR, CLIP_DIR) for p in d.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
    assert weights and all(p.suffix == ".safetensors" for p in weights), [str(p.relative_to(root)) for p in weights]
    total_mb = sum(p.stat().st_size for p in files) / 2**20
    assert total_mb < 25, f"embedded model is {total_mb:.1f} MB"


def test_domain_clip_loads_with_transformers_and_scores_with_torchmetrics(captions):
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(CLIP_DIR), CLIPProcessor.from_pretrained(CLIP_DIR)
    images = domain.render_captions(captions[:8], seed=1)
    batch = processor(text=captions[:8], images=list(images), return_tensors="pt", padding=True)
    assert batch["pixel_values"].shape == (8, 3, 64, 64)
    with torch.no_grad():
        logits = model(**batch).logits_per_image
    assert (logits.argmax(1) == torch.arange(8)).float().mean() >= 0.75  # it knows its domain

    from torchmetrics.multimodal.clip_score import CLIPScore

    from tests.test_clip_score import _TensorFeatures  # transformers-5 feature outputs as tensors

    metric = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(model), processor))
    matched = float(metric(torch.from_numpy(images).permute(0, 3, 1, 2), captions[:8]))
    metric.reset()
    shuffled = float(metric(torch.from_numpy(images).permute(0, 3, 1, 2), captions[1:8] + captions[:1]))
    assert matched > shuffled


def test_generated_images_show_the_caption(images_g75, captions):
    accuracy = domain.attribute_accuracy(images_g75, captions).mean()
    assert accuracy >= 0.8, f"attribute accuracy at guidance 7.5, 25 DDIM steps: {accuracy:.3f}"


def test_random_unet_is_near_chance(model, captions):
    images = m.generate(m.random_unet_model(model), captions[:16], seed=GEN_SEED, steps=10)
    assert domain.attribute_accuracy(images, captions[:16]).mean() < 0.5


def test_clip_prefers_matching_captions(embeddings):
    image_emb, text_emb = embeddings
    assert m.matched_beats_shuffled(image_emb, text_emb) >= 0.9


def test_guidance_7_5_beats_1_0_in_clip_score(model, captions, clip, embeddings):
    image_emb, text_emb = embeddings
    g1 = m.generate(model, captions, seed=GEN_SEED, guidance=1.0)
    assert m.clip_scores(image_emb, text_emb).mean() > m.clip_scores(clip.images(g1), text_emb).mean()


def test_fd_trained_beats_random_and_2_steps(model, captions, clip, embeddings):
    image_emb, _ = embeddings
    reference = clip.images(domain.render_captions(captions, seed=5))
    random_images = m.generate(m.random_unet_model(model), captions, seed=GEN_SEED)
    two_steps = m.generate(model, captions, seed=GEN_SEED, steps=2)
    fd_trained = m.frechet_distance(image_emb, reference)
    fd_random = m.frechet_distance(clip.images(random_images), reference)
    fd_two = m.frechet_distance(clip.images(two_steps), reference)
    assert fd_random >= 5 * fd_trained, (fd_trained, fd_random)
    assert fd_two > fd_trained, (fd_trained, fd_two)


# Registry names of Euler, DPM++ 2M, PNDM, Heun, LMS and UniPC (pipelines/registry/schedulers.py).
@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m", "pndm", "heun", "lms", "unipc"])
def test_other_diffusers_schedulers_work(model, pipe, captions, scheduler):
    from diffusers import DDIMScheduler

    original = pipe.scheduler
    try:
        images = m.generate(model, captions[:8], seed=GEN_SEED, steps=15, scheduler=scheduler)
    finally:
        pipe.scheduler = original
    assert isinstance(pipe.scheduler, DDIMScheduler)
    # Epsilon-prediction DDPM training makes every scheduler denoise to flat, image-like
    # output: per image, most pixels sit near one background-like colour, not noise.
    assert images.shape == (8, 64, 64, 3)
    flat = [np.mean(np.abs(im.astype(int) - np.median(im.reshape(-1, 3), 0)).sum(-1) < 60) for im in images]
    assert np.mean(flat) > 0.4, flat


def test_training_job_writes_loadable_directories(tmp_path):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel, CLIPProcessor

    from jobs.train_embedded import main

    threads = torch.get_num_threads()
    try:
        out = main(["--out", str(tmp_path), "--preset", "smoke", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    pipe = StableDiffusionPipeline.from_pretrained(out / "model")
    CLIPModel.from_pretrained(out / "clip"), CLIPProcessor.from_pretrained(out / "clip")
    images = pipe("a small red circle on a white background", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
