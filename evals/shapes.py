"""The embedded model's procedural domain: rendered shapes, their captions, and a judge.

Rendered scenes are to the embedded model what MNIST is to classifiers: free, exact and
easy enough to learn on a CPU in minutes. Everything here is numpy/PIL only, because the
evaluation package imports it and must not pull in diffusers or ray.

A scene is one or two shapes on a plain background. Its caption comes from a small
grammar and says every attribute that decides the pixels except the exact jitter:

    a small red circle on a white background
    a large blue square to the left of a small yellow triangle on a black background
    a small green triangle above a large purple circle on a gray background

`parse_caption` inverts `caption` exactly, and `attribute_accuracy` reads the attributes
back from pixels (the palette is flat, so nearest-palette-colour masks find the shapes)
and scores the share that match the caption.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64

SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 215, 30),
    "purple": (150, 50, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
# Half the side of a shape's bounding box, in pixels of a 64x64 image.
SIZES: dict[str, float] = {"small": 7.0, "large": 13.0}
RELATIONS = ("to the left of", "above")
TWO_SHAPE_PROBABILITY = 0.5

# Judge thresholds: bbox side between the two sizes (14 and 26 px), and fill ratio of the
# bbox between triangle (0.5), circle (pi/4 ~ 0.785) and square (1.0).
_SIZE_SPLIT = 20.0
_FILL_TRIANGLE_CIRCLE = 0.64
_FILL_CIRCLE_SQUARE = 0.9
_MIN_SHAPE_PIXELS = 12


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    size: str


@dataclass(frozen=True)
class Scene:
    """One shape, or two with `relation` ("shapes[0] <relation> shapes[1]")."""

    shapes: tuple[Shape, ...]
    background: str
    relation: str | None = None


def vocabulary() -> list[str]:
    """Every word the grammar can produce (one tokenizer token each)."""
    words = {"a", "on", "background", "to", "the", "left", "of", "above", "small", "large"}
    words |= set(SHAPE_COLOURS) | set(BACKGROUNDS) | set(SHAPES)
    return sorted(words)


# ---------------------------------------------------------------- captions


def caption(scene: Scene) -> str:
    phrases = [f"a {s.size} {s.colour} {s.shape}" for s in scene.shapes]
    body = phrases[0] if len(phrases) == 1 else f"{phrases[0]} {scene.relation} {phrases[1]}"
    return f"{body} on a {scene.background} background"


_WORD = lambda options: "(" + "|".join(re.escape(o) for o in options) + ")"  # noqa: E731
_SHAPE_PHRASE = f"a {_WORD(SIZES)} {_WORD(SHAPE_COLOURS)} {_WORD(SHAPES)}"
_CAPTION_RE = re.compile(
    f"^{_SHAPE_PHRASE}(?: {_WORD(RELATIONS)} {_SHAPE_PHRASE})? on a {_WORD(BACKGROUNDS)} background$"
)


def parse_caption(text: str) -> Scene:
    """The scene a grammar caption describes; ValueError for text outside the grammar."""
    m = _CAPTION_RE.match(" ".join(str(text).lower().split()))
    if m is None:
        raise ValueError(
            f"caption {text!r} is not in the embedded domain's grammar; expected e.g. "
            f"'a small red circle on a white background' or 'a large blue square to the left of "
            f"a small yellow triangle on a black background' with sizes {list(SIZES)}, colours "
            f"{list(SHAPE_COLOURS)}, shapes {list(SHAPES)}, relations {list(RELATIONS)}, "
            f"backgrounds {list(BACKGROUNDS)}"
        )
    size1, colour1, shape1, relation, size2, colour2, shape2, background = m.groups()
    shapes = [Shape(shape1, colour1, size1)]
    if relation is not None:
        shapes.append(Shape(shape2, colour2, size2))
    return Scene(tuple(shapes), background, relation)


def sample_scenes(n: int, seed: int = 0) -> list[Scene]:
    """`n` random scenes, a pure function of (n, seed)."""
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(n):
        count = 2 if rng.random() < TWO_SHAPE_PROBABILITY else 1
        shapes = tuple(
            Shape(SHAPES[rng.integers(len(SHAPES))], list(SHAPE_COLOURS)[rng.integers(len(SHAPE_COLOURS))],
                  list(SIZES)[rng.integers(len(SIZES))])
            for _ in range(count)
        )
        background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        relation = RELATIONS[rng.integers(len(RELATIONS))] if count == 2 else None
        scenes.append(Scene(shapes, background, relation))
    return scenes


def sample_captions(n: int, seed: int = 0) -> list[str]:
    return [caption(s) for s in sample_scenes(n, seed)]


# ---------------------------------------------------------------- rendering


def _layout(scene: Scene, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Shape centres (x, y): one shape anywhere near the middle; two shapes in the two
    halves the relation names (first shape left / top), jittered along both axes."""
    c = IMAGE_SIZE / 2
    if scene.relation is None:
        return [(c + rng.uniform(-8, 8), c + rng.uniform(-8, 8))]
    near, far, across = IMAGE_SIZE / 4, 3 * IMAGE_SIZE / 4, lambda: c + rng.uniform(-6, 6)
    a, b = near + rng.uniform(-2, 2), far + rng.uniform(-2, 2)
    if scene.relation == "to the left of":
        return [(a, across()), (b, across())]
    return [(across(), a), (across(), b)]


def render(scenes: list[Scene], seed: int = 0) -> np.ndarray:
    """(N, 64, 64, 3) uint8 images of `scenes`; deterministic given (scenes, seed).

    Masks are computed for the whole batch at once per shape slot, so thousands of
    images render per second on one core."""
    n = len(scenes)
    rng = np.random.default_rng(seed)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    images[:] = np.array([BACKGROUNDS[s.background] for s in scenes], dtype=np.uint8)[:, None, None, :]
    layouts = [_layout(s, rng) for s in scenes]
    grid = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5  # pixel centres
    for slot in range(2):
        idx = [i for i, s in enumerate(scenes) if len(s.shapes) > slot]
        if not idx:
            continue
        shapes = [scenes[i].shapes[slot] for i in idx]
        cx = np.array([layouts[i][slot][0] for i in idx], dtype=np.float32)[:, None, None]
        cy = np.array([layouts[i][slot][1] for i in idx], dtype=np.float32)[:, None, None]
        r = np.array([SIZES[s.size] for s in shapes], dtype=np.float32)[:, None, None]
        dx, dy = grid[None, None, :] - cx, grid[None, :, None] - cy
        circle = dx**2 + dy**2 <= r**2
        square = (np.abs(dx) <= r) & (np.abs(dy) <= r)
        # Upright isosceles triangle: apex at the top of the bbox, base at the bottom.
        triangle = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
        kind = np.array([SHAPES.index(s.shape) for s in shapes])[:, None, None]
        mask = np.where(kind == 0, circle, np.where(kind == 1, square, triangle))
        colour = np.array([SHAPE_COLOURS[s.colour] for s in shapes], dtype=np.uint8)
        sub = images[idx]
        sub[mask] = np.repeat(colour, mask.reshape(len(idx), -1).sum(1), axis=0)
        images[idx] = sub
    return images


def render_captions(captions: list[str], seed: int = 0) -> np.ndarray:
    return render([parse_caption(c) for c in captions], seed)


# ---------------------------------------------------------------- judging

_PALETTE_NAMES = list(SHAPE_COLOURS) + list(BACKGROUNDS)
_PALETTE = np.array([*SHAPE_COLOURS.values(), *BACKGROUNDS.values()], dtype=np.float32)
_N_SHAPE_COLOURS = len(SHAPE_COLOURS)


def _nearest_palette_index(image: np.ndarray) -> np.ndarray:
    d = ((image[..., None, :].astype(np.float32) - _PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


def _regions(scene: Scene) -> list[tuple[slice, slice]]:
    """Where each caption shape must be: the whole image, or the half its relation names."""
    whole, lo, hi = slice(0, IMAGE_SIZE), slice(0, IMAGE_SIZE // 2), slice(IMAGE_SIZE // 2, IMAGE_SIZE)
    if scene.relation is None:
        return [(whole, whole)]
    if scene.relation == "to the left of":
        return [(whole, lo), (whole, hi)]
    return [(lo, whole), (hi, whole)]


def detect_shape(labels: np.ndarray) -> Shape | None:
    """The dominant shape in a patch of palette labels, or None if it holds no shape."""
    fg = labels < _N_SHAPE_COLOURS
    if fg.sum() < _MIN_SHAPE_PIXELS:
        return None
    colour_index = int(np.bincount(labels[fg], minlength=_N_SHAPE_COLOURS).argmax())
    mask = labels == colour_index
    # Bbox from row/column profiles, ignoring thin strays (a few pixels of other blobs).
    rows, cols = mask.sum(1), mask.sum(0)
    keep_rows = np.nonzero(rows >= max(1, 0.1 * rows.max()))[0]
    keep_cols = np.nonzero(cols >= max(1, 0.1 * cols.max()))[0]
    h, w = keep_rows[-1] - keep_rows[0] + 1, keep_cols[-1] - keep_cols[0] + 1
    box = mask[keep_rows[0] : keep_rows[-1] + 1, keep_cols[0] : keep_cols[-1] + 1]
    fill = box.sum() / float(h * w)
    shape = "triangle" if fill < _FILL_TRIANGLE_CIRCLE else "circle" if fill < _FILL_CIRCLE_SQUARE else "square"
    size = "large" if max(h, w) >= _SIZE_SPLIT else "small"
    return Shape(shape, _PALETTE_NAMES[colour_index], size)


def detect_background(labels: np.ndarray) -> str:
    """Majority background colour of the border pixels (shapes never cover most of it)."""
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    bg = border[border >= _N_SHAPE_COLOURS]
    if bg.size == 0:
        return "none"
    return _PALETTE_NAMES[int(np.bincount(bg).argmax())]


def _to_domain_size(image: np.ndarray) -> np.ndarray:
    if image.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE):
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))


def attribute_scores(image: np.ndarray, text: str) -> dict[str, bool]:
    """Each attribute of the caption -> whether the image shows it.

    Attributes: the background colour, and for each shape its colour, shape and size,
    read in the region where the caption puts it (so relative position is part of each
    shape's attributes: a swapped pair fails them)."""
    scene = parse_caption(text)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got shape {image.shape} dtype {image.dtype}")
    labels = _nearest_palette_index(_to_domain_size(image))
    scores = {"background": detect_background(labels) == scene.background}
    for k, (want, (rows, cols)) in enumerate(zip(scene.shapes, _regions(scene))):
        got = detect_shape(labels[rows, cols])
        for attr in ("colour", "shape", "size"):
            scores[f"shape{k}.{attr}"] = got is not None and getattr(got, attr) == getattr(want, attr)
    return scores


def attribute_accuracy(images_uint8, captions: list[str]) -> np.ndarray:
    """Per image, the share of its caption's attributes that the image shows (0..1).

    `images_uint8`: (N, H, W, 3) uint8 array or a sequence of such images / PIL images."""
    captions = list(captions)
    if len(images_uint8) != len(captions):
        raise ValueError(f"got {len(images_uint8)} images but {len(captions)} captions")
    out = np.empty(len(captions), dtype=np.float64)
    for i, (image, text) in enumerate(zip(images_uint8, captions)):
        scores = attribute_scores(np.asarray(image), text)
        out[i] = sum(scores.values()) / len(scores)
    return out
