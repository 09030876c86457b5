"""The embedded domain: renderer, caption grammar and parser, and the attribute judge."""

import numpy as np
import pytest

from evals.shapes import attribute_accuracy
from evals import shapes as domain


def test_render_is_deterministic_and_seed_dependent():
    scenes = domain.sample_scenes(64, seed=3)
    a, b = domain.render(scenes, seed=5), domain.render(scenes, seed=5)
    assert a.shape == (64, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, domain.render(scenes, seed=6))  # jitter follows the seed
    assert domain.sample_scenes(64, seed=3) == scenes
    assert domain.sample_scenes(64, seed=4) != scenes


def test_every_render_shows_its_caption_where_the_caption_puts_it():
    # Each image on its own, not on average: every attribute the judge reads (background;
    # each shape's colour, shape and size in its caption's half) is right, and for a pair
    # of differently coloured shapes the first shape's pixels lie in the left (or top) half
    # and the second's in the other, as the relation says.
    scenes = domain.sample_scenes(300, seed=13)
    images = domain.render(scenes, seed=13)
    assert np.array_equal(images, domain.render(scenes, seed=13))
    for scene, image in zip(scenes, images):
        text = domain.caption(scene)
        scores = domain.attribute_scores(image, text)
        assert all(scores.values()), (text, scores)
        if scene.relation is not None and scene.shapes[0].colour != scene.shapes[1].colour:
            (y0, x0), (y1, x1) = (np.argwhere((image == domain.SHAPE_COLOURS[s.colour]).all(-1)).mean(0)
                                  for s in scene.shapes)
            first, second = (x0, x1) if scene.relation == "to the left of" else (y0, y1)
            assert first < domain.IMAGE_SIZE / 2 <= second, (text, first, second)


def test_render_uses_only_palette_colours_and_background_dominates():
    scenes = domain.sample_scenes(200, seed=1)
    images = domain.render(scenes, seed=1)
    palette = {*domain.SHAPE_COLOURS.values(), *domain.BACKGROUNDS.values()}
    assert {tuple(p) for p in images.reshape(-1, 3)} <= palette
    for scene, image in zip(scenes, images):
        corner = tuple(image[0, 0])
        assert corner == domain.BACKGROUNDS[scene.background]


def test_caption_roundtrip_for_every_sampled_scene():
    for scene in domain.sample_scenes(3000, seed=2):
        text = domain.caption(scene)
        assert domain.parse_caption(text) == scene
        assert set(text.split()) <= set(domain.vocabulary())


def test_caption_examples_read_as_english():
    scene = domain.parse_caption("a large blue square to the left of a small yellow triangle on a black background")
    assert scene == domain.Scene(
        (domain.Shape("square", "blue", "large"), domain.Shape("triangle", "yellow", "small")),
        "black", "to the left of",
    )
    assert domain.parse_caption("  A small red circle on a  white background ") == domain.Scene(
        (domain.Shape("circle", "red", "small"),), "white"
    )


@pytest.mark.parametrize("text", [
    "a cat on a sofa",
    "a small red circle",
    "a medium red circle on a white background",
    "a small red circle on a pink background",
    "a small red circle below a large blue square on a white background",
    "",
])
def test_parser_rejects_text_outside_the_grammar(text):
    with pytest.raises(ValueError, match="grammar"):
        domain.parse_caption(text)


def test_ground_truth_scores_perfectly():
    captions = domain.sample_captions(500, seed=7)
    images = domain.render_captions(captions, seed=8)
    assert attribute_accuracy(images, captions).mean() >= 0.99


def test_noise_and_wrong_captions_score_low():
    captions = domain.sample_captions(200, seed=9)
    noise = np.random.default_rng(0).integers(0, 256, (200, 64, 64, 3), dtype=np.uint8)
    assert attribute_accuracy(noise, captions).mean() < 0.5
    images = domain.render_captions(captions, seed=10)
    shuffled = domain.sample_captions(200, seed=11)  # independent scenes: right only by chance
    assert attribute_accuracy(images, shuffled).mean() < 0.5


def test_each_attribute_is_judged():
    good = "a small red circle to the left of a large blue square on a white background"
    image = domain.render_captions([good], seed=0)[0]
    assert all(domain.attribute_scores(image, good).values())
    wrong = {
        "background": "a small red circle to the left of a large blue square on a black background",
        "shape0.colour": "a small green circle to the left of a large blue square on a white background",
        "shape0.shape": "a small red triangle to the left of a large blue square on a white background",
        "shape0.size": "a large red circle to the left of a large blue square on a white background",
        "shape1.shape": "a small red circle to the left of a large blue circle on a white background",
    }
    for attribute, text in wrong.items():
        scores = domain.attribute_scores(image, text)
        assert [k for k, ok in scores.items() if not ok] == [attribute], text
    swapped = "a large blue square to the left of a small red circle on a white background"
    assert sum(domain.attribute_scores(image, swapped).values()) == 1  # only the background


def test_judge_accepts_pil_and_other_sizes():
    from PIL import Image

    captions = domain.sample_captions(8, seed=12)
    images = [Image.fromarray(im).resize((128, 128), Image.NEAREST) for im in domain.render_captions(captions)]
    assert attribute_accuracy(images, captions).mean() >= 0.95
    with pytest.raises(ValueError, match="captions"):
        attribute_accuracy(np.asarray(images[0])[None], captions)
