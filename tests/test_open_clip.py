"""The open_clip extractor on a tiny open_clip model: built from a model config with random
weights (nothing downloaded), saved in open_clip's hub layout (open_clip_config.json beside
open_clip_model.safetensors) and loaded the way a user's local model is, then run through
features, CLIP score and diversity, in `evals` and in jobs/evaluate.py."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

pytest.importorskip("torchvision", reason="open_clip imports torchvision")
open_clip = pytest.importorskip("open_clip", reason="pip install -e '.[openclip]' beside a torch/torchvision pair")
from safetensors.torch import save_file  # noqa: E402

from evals.decode import try_decode  # noqa: E402
from evals.feature_cache import files_digest  # noqa: E402
from evals.features import get_extractor  # noqa: E402
from jobs import evaluate as eval_job  # noqa: E402
from jobs import generate as gen_job  # noqa: E402
from tests.conftest import write_parquet  # noqa: E402

# A CLIP of open_clip's own ViT/text-transformer classes, ~1.7 M parameters (most in the token
# table of the 49408-token BPE vocabulary that open_clip ships); SimpleTokenizer, no download.
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """(model directory, the in-memory model it was saved from)."""
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CFG).eval()
    d = tmp_path_factory.mktemp("oc") / "tiny-open-clip"
    d.mkdir()
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    return d, model


def _images(n=5, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40 + 4 * i, 36, 3), dtype=np.uint8) for i in range(n)]


def test_features_are_the_saved_models(tiny_open_clip):
    """The loaded model's image and text embeddings are those of the model that was saved
    (open_clip's eval transform, its tokenizer), in any batch size, and deterministic."""
    d, model = tiny_open_clip
    fe = get_extractor("clip", clip_pretrained=d, device="cpu", batch_size=2)
    assert (fe.name, fe.dim, fe.image_size, fe.has_text) == ("clip:tiny-open-clip", 16, 32, True)
    assert fe.weights_file == d / "open_clip_model.safetensors"
    images = _images()
    feats = fe(images)
    assert feats.shape == (5, 16) and feats.dtype == np.float64 and np.isfinite(feats).all()
    preprocess = open_clip.image_transform(32, is_train=False)
    with torch.inference_mode():
        want = model.encode_image(torch.stack([preprocess(Image.fromarray(im)) for im in images]))
        want_text = model.encode_text(open_clip.tokenize(PROMPTS, context_length=16))
    np.testing.assert_allclose(feats, want.double().numpy(), rtol=1e-5, atol=1e-6)
    text = fe.embed_text(PROMPTS)
    np.testing.assert_allclose(text, want_text.double().numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(text[0] - text[1]).max() > 1e-3  # the prompt matters
    again = get_extractor("clip", clip_pretrained=d, device="cpu", batch_size=5)
    np.testing.assert_allclose(again(images), feats, atol=1e-6)
    assert np.array_equal(again.embed_text(PROMPTS), fe.embed_text(PROMPTS))


def test_checkpoint_file_of_a_registered_architecture(tiny_open_clip, tmp_path):
    """The other route: a checkpoint file (safetensors or a torch state dict) of an architecture
    open_clip knows by name, here one registered from a config file as open_clip documents."""
    d, model = tiny_open_clip
    (tmp_path / "tiny-test-clip.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(tmp_path / "tiny-test-clip.json")
    torch.save(model.state_dict(), tmp_path / "tiny.bin")
    images = _images(3, seed=1)
    want = get_extractor("clip", clip_pretrained=d, device="cpu")(images)
    for ckpt in (d / "open_clip_model.safetensors", tmp_path / "tiny.bin"):
        fe = get_extractor("clip", clip_arch="tiny-test-clip", clip_pretrained=ckpt, device="cpu")
        assert fe.name == "clip:tiny-test-clip" and fe.weights_file == ckpt
        np.testing.assert_allclose(fe(images), want, atol=1e-6)
    with pytest.raises(ValueError, match="needs its architecture"):
        get_extractor("clip", clip_pretrained=tmp_path / "tiny.bin")
    with pytest.raises(FileNotFoundError, match="not an open_clip model directory"):
        get_extractor("clip", clip_pretrained=tmp_path)
    (tmp_path / "open_clip_config.json").write_text((d / "open_clip_config.json").read_text())
    (tmp_path / "tiny.bin").unlink()
    with pytest.raises(FileNotFoundError, match="has no weights"):
        get_extractor("clip", clip_pretrained=tmp_path)


def test_evaluate_with_an_open_clip_model(tiny_open_clip, tmp_path, ray_local):
    """jobs/evaluate.py with --clip-pretrained DIR: CLIP score and diversity per configuration
    are those of the open_clip features, and every row names the model and its weights."""
    d, _ = tiny_open_clip
    rows = [dict(prompt=p, seed=s, scheduler="ddim", steps=2, guidance=7.5, model="tiny-random")
            for p in PROMPTS for s in range(3)]
    results = tmp_path / "results"
    assert gen_job.main([str(write_parquet(tmp_path / "m.parquet", rows)), "--out", str(results), "--no-progress"]) == 0
    args = [str(results), "--features", "clip", "--clip-pretrained", str(d), "--reference",
            str(next(results.glob("part-*.parquet"))), "--out", str(tmp_path / "report"), "--n-boot", "10",
            "--no-progress"]
    assert eval_job.main(args) == 0
    m = pd.read_parquet(tmp_path / "report" / "metrics.parquet")
    assert len(m) == 1
    r = m.iloc[0]
    digest = files_digest([d / "open_clip_model.safetensors"])
    assert (r.extractor, r.clip_model, r.diversity_features) == ("clip:tiny-open-clip",) * 3
    assert (r.clip_image_processor, r.clip_weights, r.weights, r.feature_dim) == ("open_clip", digest, digest, 16)
    assert np.isfinite(r.fid)  # FID on the open_clip features, against the images themselves

    shard = pd.concat([pd.read_parquet(p) for p in results.glob("part-*.parquet")]).reset_index(drop=True)
    fe = get_extractor("clip", clip_pretrained=d, device="cpu")
    img = fe(np.stack([try_decode(b)[0] for b in shard.image]))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    text = fe.embed_text(PROMPTS)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    own = np.array([PROMPTS.index(p) for p in shard.prompt])
    raw = 100 * np.einsum("nd,nd->n", img, text[own])
    per_image = pd.read_parquet(tmp_path / "report" / "image_scores.parquet").set_index("sample_id")
    np.testing.assert_allclose(per_image.loc[shard.sample_id, "clip_score_raw"], raw, rtol=1e-5, atol=1e-4)
    assert not np.allclose(raw, 100 * np.einsum("nd,nd->n", img, text[1 - own]), atol=1e-3)  # prompt swapped
    assert r.clip_score == pytest.approx(max(raw.mean(), 0.0), rel=1e-5, abs=1e-4)
    dist = [np.mean([1 - img[i] @ img[j] for i in g for j in g if i < j])
            for g in (np.flatnonzero(own == k) for k in range(len(PROMPTS)))]
    assert r.diversity == pytest.approx(np.mean(dist), rel=1e-5)
    assert 1.0 <= r.vendi <= 3.0
