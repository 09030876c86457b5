"""Prompt embeddings for the CLIP score, cached beside the image features.

The CLIP score pairs each image embedding with its prompt's text embedding. Prompts repeat
across a sweep and across evaluations, so each extractor's text embeddings are kept in one
.npz in the feature cache folder: re-evaluating does not load the text tower again.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from evals import files
from evals.feature_cache import cache_key


def text_embeddings(extractor, prompts: list[str], cache_root: Path,
                    description: dict | None = None) -> dict[str, np.ndarray]:
    """Prompt -> `extractor.embed_text` embedding, computed only for prompts not in the cache
    (cache_root/text-<key>.npz, replaced atomically). The key is made from `description`
    (feature_cache.feature_description: weights included, so a retrained CLIP misses the
    cache), else from the extractor's describe()."""
    path = files.join(cache_root, f"text-{cache_key(description or extractor.describe())}.npz")
    known: dict[str, np.ndarray] = {}
    if files.is_file(path):
        with np.load(io.BytesIO(files.read_bytes(path)), allow_pickle=False) as z:
            known = dict(zip(z["prompts"].tolist(), z["embeddings"]))
    missing = [p for p in prompts if p not in known]
    if missing:
        known.update(zip(missing, extractor.embed_text(missing)))
        buf = io.BytesIO()
        np.savez(buf, prompts=np.array(list(known), dtype=str), embeddings=np.stack(list(known.values())))
        files.write_bytes(path, buf.getvalue())
    return {p: known[p] for p in prompts}
