"""What a generated row becomes: a RowResult, with uint8 pixels made on the device.

Both generation paths (one diffusers call per configuration, and continuous batching)
end here, so an image, a non-finite image and a failed row read the same whichever path
made them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipelines.contract import Row


@dataclass
class RowResult:
    sample_id: str
    pixels: np.ndarray | None  # uint8 [H, W, 3], None on error
    status: str  # "ok" | "error"
    error: str | None
    gen_seconds: float  # this image's share of its batch's wall time
    batch_size: int
    prompt_truncated: bool


def to_pixels(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Decoded images [B, 3, H, W] in [0, 1] (diffusers' output_type="pt") -> uint8 pixels
    [B, H, W, 3] and whether each image was finite. Clip, x255 and round run in float32 on
    the device, the same operations as a numpy conversion of output_type="np" (so the same
    pixels), but only the uint8 result, a quarter of the bytes, crosses to the host, and the
    host does no per-pixel work while the GPU waits for the next batch."""
    images = images.float()
    finite = torch.isfinite(images).flatten(1).all(1)
    pixels = images.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).permute(0, 2, 3, 1)
    return pixels.cpu().numpy(), finite.cpu().numpy()


def image_result(row: Row, pixels: np.ndarray, finite: bool, seconds: float, batch_size: int,
                 truncated: bool) -> RowResult:
    """An ok result, or an error result if the decoded image had NaN/inf pixels."""
    if not finite:
        return error_result(row, "non-finite pixels in the decoded image (NaN/inf)", seconds, batch_size, truncated)
    return RowResult(row.sample_id, pixels, "ok", None, seconds, batch_size, truncated)


def error_result(row: Row, message: str, seconds: float = 0.0, batch_size: int = 1,
                 truncated: bool = False) -> RowResult:
    return RowResult(row.sample_id, None, "error", message, seconds, batch_size, truncated)


def prompts_truncated(pipe, prompts: list[str], max_tokens: int, max_sequence_length: int | None = None) -> list[bool]:
    """Whether each prompt is longer than one of the pipeline's text encoders reads (diffusers
    cuts it): the CLIP tokenizers (`tokenizer`, SDXL/SD3's `tokenizer_2`) at `max_tokens` or
    their model_max_length, a T5 tokenizer (SD3's `tokenizer_3`, FLUX's `tokenizer_2`) at
    `max_sequence_length` (the registry's, passed to the pipeline; None: the pipeline's default)."""
    truncated = [False] * len(prompts)
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is None:
            continue
        limit = _token_limit(pipe, tokenizer, max_tokens, max_sequence_length)
        lengths = [len(ids) for ids in tokenizer(prompts, truncation=False, verbose=False).input_ids]
        truncated = [t or n > limit for t, n in zip(truncated, lengths)]
    return truncated


def _token_limit(pipe, tokenizer, max_tokens: int, max_sequence_length: int | None) -> int:
    """How many tokens (specials included) the pipeline passes on from this tokenizer."""
    own = getattr(tokenizer, "model_max_length", max_tokens)
    if "T5" not in type(tokenizer).__name__:  # CLIP: what the registry and the tokenizer allow
        return min(max_tokens, own)
    if max_sequence_length is not None:
        return max_sequence_length  # the pipeline tokenizes T5 text with max_length=max_sequence_length
    import inspect

    param = inspect.signature(pipe.__call__).parameters.get("max_sequence_length")
    default = param.default if param is not None and isinstance(param.default, int) else own
    return min(default, own)
