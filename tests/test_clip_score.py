"""CLIP score: definition, and agreement with torchmetrics' CLIPScore on the same CLIP model.

torchmetrics 1.9 + transformers 5: CLIPScore calls `model.get_image_features(...)` /
`get_text_features(...)` and normalises the result as a tensor, but transformers 5 returns a
BaseModelOutputWithPooling (projected embedding in `.pooler_output`). We keep both versions and
adapt in the test: `_TensorFeatures` wraps the CLIPModel so those two methods return the
tensor, which is exactly what transformers 4 returned. torchmetrics also rejects local paths
by name, so the model goes in through its callable loader, `model_name_or_path=lambda: (model, processor)`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from evals.clip_score import aggregate_clip_score, clip_score, clip_score_per_image, raw_clip_scores
from evals.feature_cache import cache_key, feature_description
from evals.features import HFCLIPExtractor, get_extractor
from evals.metrics_table import RowFeatures, image_scores, metrics_table
from evals.shapes import render_captions, sample_captions
from tests.test_features import make_tiny_clip_dir


class _TensorFeatures(torch.nn.Module):
    """transformers-4-style view of a transformers-5 CLIPModel (feature methods return tensors)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.model.get_text_features(*args, **kwargs))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return HFCLIPExtractor(make_tiny_clip_dir(tmp_path_factory.mktemp("tiny_clip"), seed=1), batch_size=4, device="cpu")


PROMPTS = [
    "a red circle",
    "a blue square on a white background",
    "a small green triangle",
    "a big yellow star and a black circle",
    "a white square",
    "the blue triangle",
]


def _torchmetrics_clip_score(fe, images, prompts):
    pytest.importorskip("torchmetrics")
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(fe.model), fe.processor))
    metric.update(torch.from_numpy(images).permute(0, 3, 1, 2), list(prompts))
    return float(metric.compute())


def test_agrees_with_torchmetrics_clipscore(tiny_clip):
    images = np.random.default_rng(0).integers(0, 256, size=(6, 64, 64, 3), dtype=np.uint8)
    raw = raw_clip_scores(tiny_clip(images), tiny_clip.embed_text(PROMPTS))
    theirs = _torchmetrics_clip_score(tiny_clip, images, PROMPTS)
    ours = clip_score(tiny_clip(images), tiny_clip.embed_text(PROMPTS))
    assert ours == pytest.approx(theirs, rel=1e-3, abs=1e-4)
    per_image = clip_score_per_image(tiny_clip(images), tiny_clip.embed_text(PROMPTS))
    for i in (0, 3):  # torchmetrics on one pair = our per-image score
        assert per_image[i] == pytest.approx(
            _torchmetrics_clip_score(tiny_clip, images[i : i + 1], PROMPTS[i : i + 1]), rel=1e-3, abs=1e-4
        )
    assert raw.std() > 0.5  # the random model gives distinct scores, so agreement is not vacuous


@pytest.fixture(scope="module")
def embedded_clip():
    return get_extractor("embedded", device="cpu", batch_size=16)


def test_the_jobs_clip_score_is_torchmetrics_on_a_group_with_negative_cosines(embedded_clip):
    """What jobs/evaluate.py reports (metrics_table, the function it calls) for a group whose
    images are scored against other images' captions: many cosines are negative, the mean is
    not. torchmetrics' CLIPScore gets the embedded CLIP through its callable loader."""
    captions = sample_captions(16, seed=3)
    images = np.asarray(render_captions(captions, seed=3))
    prompts = captions[1:] + captions[:1]
    f = RowFeatures(fid=embedded_clip(images), clip=embedded_clip(images), text=embedded_clip.embed_text(prompts))
    rows = pd.DataFrame({"sample_id": [f"s{i}" for i in range(16)], "scheduler": "ddim", "prompt": prompts,
                         "seed": 0, "gen_seconds": 1.0})
    table = metrics_table(rows, rows.iloc[:0], ["scheduler"], f, None, n_boot=200)
    raw = image_scores(rows, ["scheduler"], f).clip_score_raw.to_numpy()
    assert (raw < 0).sum() >= 4 and raw.mean() > 10  # negative cosines in a group with a positive score
    theirs = _torchmetrics_clip_score(embedded_clip, images, prompts)
    assert table.clip_score[0] == pytest.approx(theirs, rel=1e-4)
    assert np.maximum(raw, 0).mean() > theirs + 5  # the mean of clamped scores is another number
    assert table.clip_score_ci_lo[0] < table.clip_score[0] < table.clip_score_ci_hi[0]
    # noise images: the mean cosine is negative, so the set scores 0 (clamped after the mean), as in torchmetrics
    noise = np.random.default_rng(0).integers(0, 256, size=(12, 64, 64, 3), dtype=np.uint8)
    noise_raw = raw_clip_scores(embedded_clip(noise), embedded_clip.embed_text(captions[:12]))
    theirs = _torchmetrics_clip_score(embedded_clip, noise, captions[:12])
    assert clip_score(embedded_clip(noise), embedded_clip.embed_text(captions[:12])) == pytest.approx(theirs, abs=1e-4)
    assert noise_raw.min() < 0 < noise_raw.max()


def test_feature_description_names_the_image_processor_transformers_builds(tiny_clip):
    desc = feature_description(tiny_clip)
    built = type(tiny_clip.processor.image_processor)
    torchvision = any(c.__name__ == "TorchvisionBackend" for c in built.__mro__) or built.__name__.endswith("Fast")
    assert desc["image_processor"] == ("torchvision" if torchvision else "pil"), built
    assert len(desc["weights"]) == 12 and desc["weights"] == feature_description(tiny_clip)["weights"]
    key = cache_key(desc)
    assert key.startswith("clip-clip-processor-64-")  # readable part, then a digest of the rest
    for change in ({"image_processor": "torchvision" if desc["image_processor"] == "pil" else "pil"},
                   {"weights": "0" * 12}, {"dim": desc["dim"] + 1}):
        assert cache_key({**desc, **change}) != key, change


def test_definition_on_known_angles():
    img = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, 0.0]])
    txt = np.array([[2.0, 0.0], [0.0, -1.0], [1.0, 0.0], [1.0, 1.0]])
    raw = raw_clip_scores(img, txt)
    np.testing.assert_allclose(raw, [100.0, -100.0, 100 / np.sqrt(2), 100 / np.sqrt(2)], rtol=1e-12)
    np.testing.assert_allclose(clip_score_per_image(img, txt), np.maximum(raw, 0), rtol=1e-12)
    # torchmetrics clamps the mean, not each pair
    assert clip_score(img, txt) == pytest.approx(raw.mean())
    assert clip_score(img, txt) < clip_score_per_image(img, txt).mean()
    assert clip_score(img[1:2], txt[1:2]) == 0.0
    assert aggregate_clip_score(np.array([[1.0, 3.0], [-5.0, 1.0]]), axis=1).tolist() == [2.0, 0.0]


def test_errors():
    with pytest.raises(ValueError, match="pair up"):
        raw_clip_scores(np.ones((3, 4)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="zero norm"):
        raw_clip_scores(np.zeros((1, 4)), np.ones((1, 4)))
    with pytest.raises(ValueError, match="at least one"):
        clip_score(np.zeros((0, 4)), np.zeros((0, 4)))
