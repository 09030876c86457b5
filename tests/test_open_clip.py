"""The open_clip extractor on a tiny open_clip model: built from a model config with random
weights (nothing downloaded), saved in open_clip's hub layout (open_clip_config.json beside
open_clip_model.safetensors) and loaded the way a user's local model is (the session fixture
`tiny_open_clip` in tests/conftest.py), then run through features and text embeddings here;
tests/test_evaluate_job.py runs jobs/evaluate.py through it (CLIP score, diversity) on the
results it already generated."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("torchvision", reason="open_clip imports torchvision")
open_clip = pytest.importorskip("open_clip", reason="pip install -e '.[openclip]' beside a torch/torchvision pair")

from evals.features import get_extractor  # noqa: E402
from tests.conftest import TINY_OPEN_CLIP_CFG  # noqa: E402

PROMPTS = ["a red circle", "a blue square"]


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
    (tmp_path / "tiny-test-clip.json").write_text(json.dumps(TINY_OPEN_CLIP_CFG))
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
