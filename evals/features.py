"""Feature extractors behind one interface: uint8 images in, float64 features out.

Every metric downstream (FID, KID, CLIP score, diversity) is a pure function of these arrays,
so an extractor is the only place that touches a network. Each one is batched internally,
device-aware, and describes itself (`name`, `resize_mode`, `image_size`, `dim`) so that
reference statistics record exactly which features they hold and mismatches are caught.

    fe = get_extractor("inception", inception_weights="/weights/pt_inception-2015-12-05-6726825d.pth")
    feats = fe(images)            # images: uint8 [N, H, W, 3] (or a list of HxWx3 arrays)

Extractors: `inception` (standard FID, clean-fid's "clean" resize), `clip` (a transformers CLIP
directory, or open_clip from a local checkpoint or model directory), `embedded` (the shipped domain CLIP).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from evals import inception as _inception

EXTRACTORS = ("inception", "clip", "embedded")
EMBEDDED_CLIP_ENV_VAR = "DIFFSWEEP_EMBEDDED_CLIP"


# ----------------------------------------------------------------------------- images


def as_image_list(images) -> list[np.ndarray]:
    """Validate images: uint8, H x W x 3. Accepts an [N, H, W, 3] array or a sequence of
    H x W x 3 arrays (sizes may differ). Grayscale H x W and RGBA are not guessed at."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"expected uint8 images [N, H, W, 3], got an array of shape {images.shape}")
        items = list(images)
    elif isinstance(images, Sequence):
        items = [np.asarray(im) for im in images]
    else:
        raise TypeError(f"expected a uint8 array [N, H, W, 3] or a list of H x W x 3 arrays, got {type(images).__name__}")
    for i, im in enumerate(items):
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
            raise ValueError(
                f"image {i}: expected uint8 H x W x 3 (RGB), got dtype {im.dtype}, shape {im.shape}"
            )
    return items


def clean_resize(image: np.ndarray, size: int = _inception.INPUT_SIZE) -> np.ndarray:
    """clean-fid's "clean" resize: each channel as a float32 PIL image, bicubic (with PIL's
    antialiasing) to size x size, clipped to [0, 255], not re-quantised. Returns float32 HxWx3.
    Why: resizing with a non-antialiased kernel or quantising again shifts FID noticeably
    (Parmar et al., 2022); this is the variant clean-fid's published statistics use."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected H x W x 3, got shape {image.shape}")
    channels = [
        np.asarray(Image.fromarray(image[:, :, c].astype(np.float32)).resize((size, size), Image.BICUBIC))
        for c in range(3)
    ]
    return np.stack(channels, axis=2).clip(0, 255).astype(np.float32)


# ----------------------------------------------------------------------------- base


class FeatureExtractor:
    """Base class. Subclasses set the attributes and implement `_embed_images(list) -> Tensor`."""

    name: str = ""
    resize_mode: str = ""
    image_size: int = 0
    dim: int = 0

    def __init__(self, batch_size: int = 64, device: str | torch.device | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))

    def __call__(self, images) -> np.ndarray:
        items = as_image_list(images)
        out = [np.zeros((0, self.dim))]
        with torch.inference_mode():
            for i in range(0, len(items), self.batch_size):
                feats = self._embed_images(items[i : i + self.batch_size])
                out.append(feats.detach().to("cpu", torch.float64).numpy())
        return np.concatenate(out, axis=0)

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError(f"extractor {self.name!r} has no text tower; use 'clip' or 'embedded'")

    @property
    def has_text(self) -> bool:
        return type(self).embed_text is not FeatureExtractor.embed_text

    def describe(self) -> dict:
        """Metadata stored with features and reference statistics."""
        return {"extractor": self.name, "resize_mode": self.resize_mode, "image_size": self.image_size, "dim": self.dim}

    def _embed_images(self, images: list[np.ndarray]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, device={str(self.device)!r})"


# ----------------------------------------------------------------------------- inception


class InceptionExtractor(FeatureExtractor):
    """Standard FID features: clean resize to 299, FID Inception-v3 pool3 (2048-d)."""

    name = "inception"
    resize_mode = "clean"
    image_size = _inception.INPUT_SIZE
    dim = _inception.FEATURE_DIM

    def __init__(self, weights: str | os.PathLike | None = None, batch_size: int = 32, device=None, model=None):
        super().__init__(batch_size, device)
        # `model` lets tests (and callers holding a loaded network) skip the file lookup.
        self.model = (model if model is not None else _inception.load_fid_inception(weights)).to(self.device).eval()

    def _embed_images(self, images):
        x = np.stack([clean_resize(im, self.image_size) for im in images])
        x = torch.from_numpy(x).permute(0, 3, 1, 2).to(self.device)
        # cuDNN's default TF32 convolutions (Ampere and later) move features by ~1e-3: keep FP32
        # so FIDs from different GPUs, and from published float32 pipelines, agree.
        cudnn = torch.backends.cudnn
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False):
            return self.model(x)


# ----------------------------------------------------------------------------- CLIP


def _projected(out) -> torch.Tensor:
    """transformers < 5 returns the projected embedding as a tensor; transformers 5 returns a
    BaseModelOutputWithPooling whose `pooler_output` is the projected embedding."""
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "pooler_output", None) is not None:
        return out.pooler_output
    raise TypeError(f"unexpected CLIP feature output {type(out).__name__}")


def _clip_crop_size(path: Path) -> int | None:
    """The processor's crop height from processor_config.json (transformers 5) or
    preprocessor_config.json (transformers 4); None if neither gives one."""
    for name, section in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        file = path / name
        if file.is_file():
            doc = json.loads(file.read_text())
            doc = doc.get(section, {}) if section else doc
            crop = doc.get("crop_size")
            if isinstance(crop, dict):
                crop = crop.get("height")
            if crop:
                return int(crop)
    return None


class HFCLIPExtractor(FeatureExtractor):
    """A transformers CLIPModel directory (config + safetensors + processor/tokenizer files).
    Image and text embeddings are the projection-head outputs (`dim` = projection_dim), not
    normalised: cosine-based metrics normalise themselves, FID uses them as they are."""

    resize_mode = "clip-processor"

    def __init__(self, path: str | os.PathLike, name: str = "clip", batch_size: int = 64, device=None):
        super().__init__(batch_size, device)
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a transformers CLIP directory (no config.json)")
        self.path = path
        self.name = name
        # What describe() needs comes from the JSON files; the model (and transformers, a few
        # seconds to import) loads on first use, so re-evaluating cached features skips it.
        config = json.loads((path / "config.json").read_text())
        self.dim = int(config.get("projection_dim", 512))
        self.max_text_length = int(config.get("text_config", {}).get("max_position_embeddings", 77))
        self.image_size = _clip_crop_size(path) or int(config.get("vision_config", {}).get("image_size", 224))
        self._model = self._processor = None

    @property
    def model(self):
        if self._model is None:
            from transformers import CLIPModel

            self._model = CLIPModel.from_pretrained(self.path, use_safetensors=True).to(self.device).eval()
        return self._model

    @property
    def processor(self):
        if self._processor is None:
            from transformers import CLIPProcessor

            self._processor = CLIPProcessor.from_pretrained(self.path)
        return self._processor

    def _embed_images(self, images):
        # transformers' torchvision backend (whenever torchvision imports) warns on read-only
        # arrays, which decoded images can be; a copy of those is cheap beside the network.
        images = [im if im.flags.writeable else im.copy() for im in images]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return _projected(self.model.get_image_features(pixel_values=pixels.to(self.device)))

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("embed_text takes a list of strings, got a single str")
        out = [np.zeros((0, self.dim))]
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                tok = self.processor.tokenizer(
                    list(texts[i : i + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_text_length,
                    return_tensors="pt",
                )
                feats = _projected(
                    self.model.get_text_features(
                        input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
                    )
                )
                out.append(feats.to("cpu", torch.float64).numpy())
        return np.concatenate(out, axis=0)


class OpenCLIPExtractor(FeatureExtractor):
    """open_clip, from local files only: `pretrained` is a checkpoint file of the built-in
    architecture `arch` (state dict, .pt/.bin/.safetensors), or a model directory in open_clip's
    hub layout (open_clip_config.json with its model and preprocess configs, beside the weights,
    as `push_to_hf_hub` writes and a hub download leaves), whose config is the architecture:
    that is how a model that is not one of open_clip's built-ins (a fine-tune, a tiny test
    model) loads. `weights_file` is the checkpoint read: it names the features in caches."""

    resize_mode = "open_clip-preprocess"

    def __init__(self, arch: str | None, pretrained: str | os.PathLike, batch_size: int = 64, device=None):
        super().__init__(batch_size, device)
        try:
            import open_clip
        except ImportError as e:
            raise ImportError(
                "the 'clip' extractor with an open_clip architecture needs the open_clip package "
                "(pip install open_clip_torch); or pass clip_dir=<transformers CLIP directory>"
            ) from e
        pretrained = Path(pretrained)
        if pretrained.is_dir():
            self.weights_file = open_clip_weights_file(pretrained)
            model_name, pretrained_arg = f"local-dir:{pretrained}", None
            arch = arch or pretrained.resolve().name
        elif pretrained.is_file():
            if arch is None:
                raise ValueError(f"open_clip checkpoint {pretrained}: a checkpoint file needs its architecture "
                                 f"(clip_arch); a model directory with open_clip_config.json does not")
            self.weights_file = pretrained
            model_name, pretrained_arg = arch, str(pretrained)
        else:
            raise FileNotFoundError(f"open_clip checkpoint {pretrained} not found (a local file or model "
                                    f"directory is required)")
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained_arg)
        self.model = self.model.to(self.device).eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.name = f"clip:{arch}"
        with torch.inference_mode():
            self.dim = int(self.model.encode_text(self.tokenizer(["a"]).to(self.device)).shape[-1])
        size = getattr(self.model.visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)

    def _embed_images(self, images):
        x = torch.stack([self.preprocess(Image.fromarray(im)) for im in images]).to(self.device)
        return self.model.encode_image(x)

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        out = [np.zeros((0, self.dim))]
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                tok = self.tokenizer(list(texts[i : i + self.batch_size])).to(self.device)
                out.append(self.model.encode_text(tok).to("cpu", torch.float64).numpy())
        return np.concatenate(out, axis=0)


def open_clip_weights_file(model_dir: Path) -> Path:
    """The checkpoint of an open_clip model directory, by open_clip's own preference (safetensors
    first); the directory must hold open_clip_config.json, which gives the architecture."""
    if not (model_dir / "open_clip_config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not an open_clip model directory (no open_clip_config.json)")
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                 "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth"):
        if (model_dir / name).is_file():
            return model_dir / name
    raise FileNotFoundError(f"open_clip model directory {model_dir} has no weights (e.g. open_clip_model.safetensors)")


def embedded_clip_dir() -> Path:
    """The shipped domain CLIP: pipelines/embedded/clip, found without importing `pipelines`
    (whose modules pull in diffusers); $DIFFSWEEP_EMBEDDED_CLIP overrides."""
    if os.environ.get(EMBEDDED_CLIP_ENV_VAR):
        return Path(os.environ[EMBEDDED_CLIP_ENV_VAR])
    spec = importlib.util.find_spec("pipelines")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))) / "embedded" / "clip"
    return Path(__file__).resolve().parents[1] / "pipelines" / "embedded" / "clip"


# ----------------------------------------------------------------------------- factory


def get_extractor(
    name: str,
    *,
    inception_weights: str | os.PathLike | None = None,
    clip_dir: str | os.PathLike | None = None,
    clip_arch: str | None = None,
    clip_pretrained: str | os.PathLike | None = None,
    embedded_clip: str | os.PathLike | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
) -> FeatureExtractor:
    """Build an extractor by name.

    inception: weights from `inception_weights`, else $DIFFSWEEP_INCEPTION_WEIGHTS, else the cache.
    clip:      `clip_dir` (transformers CLIP directory), or open_clip: `clip_pretrained` (a checkpoint
               file of the built-in architecture `clip_arch`, or an open_clip model directory).
    embedded:  `embedded_clip` or the shipped pipelines/embedded/clip.
    """
    kw = {"device": device}
    if batch_size is not None:
        kw["batch_size"] = batch_size
    if name == "inception":
        return InceptionExtractor(inception_weights, **kw)
    if name == "clip":
        if clip_dir is not None:
            return HFCLIPExtractor(clip_dir, name=f"clip:{Path(clip_dir).resolve().name}", **kw)
        if clip_pretrained is not None:
            return OpenCLIPExtractor(clip_arch, clip_pretrained, **kw)
        raise ValueError(
            "the 'clip' extractor needs a local model: clip_dir=<transformers CLIP directory>, "
            "or clip_arch=<open_clip architecture> with clip_pretrained=<local checkpoint file>, "
            "or clip_pretrained=<open_clip model directory>"
        )
    if name == "embedded":
        path = Path(embedded_clip) if embedded_clip is not None else embedded_clip_dir()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"the embedded CLIP is not at {path} (no config.json). It ships in pipelines/embedded/clip and "
                f"is rebuilt by jobs/train_embedded.py; or pass embedded_clip=<dir> / set {EMBEDDED_CLIP_ENV_VAR}."
            )
        return HFCLIPExtractor(path, name="embedded", **kw)
    raise ValueError(f"unknown feature extractor {name!r}; valid names: {', '.join(EXTRACTORS)}")
