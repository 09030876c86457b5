"""The embedded default model: a tiny text-to-image pipeline and its domain CLIP, shipped
in the repo so the whole loop runs offline (see docs/embedded.md)."""

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"
CLIP_DIR = Path(__file__).parent / "clip"
LORA_DIR = Path(__file__).parent / "loras"  # adapters for the embedded model (docs/lora.md)
