"""The FID Inception-v3: the 2015-12-05 TensorFlow graph as ported to PyTorch.

Every published FID (TTUR, pytorch-fid, clean-fid, torch-fidelity, torchmetrics) uses this one
network, so a number is only comparable if it comes from these exact weights and these exact
blocks. The port differs from torchvision's Inception-v3 in three places, which matter for the
features: average pools inside the mixed blocks ignore padded zeros (TensorFlow's behaviour),
the last block pools with max instead of average, and the classifier has 1008 outputs.

Parameter names follow the published state dict (`Conv2d_1a_3x3.conv.weight`, ...,
`Mixed_7c.branch_pool.bn.running_var`, `fc.bias`), so `pt_inception-2015-12-05-6726825d.pth`
(pytorch-fid) and its identical twin `weights-inception-2015-12-05-6726825d.pth`
(torch-fidelity) load with `strict=True`. Nothing is downloaded: the file is looked up locally.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
# torch-fidelity ships the same tensors under this name (same sha256 prefix).
ALT_WEIGHTS_FILENAMES = ("weights-inception-2015-12-05-6726825d.pth",)
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
)
# sha256 6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2 (torch hub names files by its prefix)
WEIGHTS_SHA256_PREFIX = "6726825d"
ENV_VAR = "DIFFSWEEP_INCEPTION_WEIGHTS"
CLI_FLAG = "--inception-weights"
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008


class InceptionWeightsNotFound(FileNotFoundError):
    """Raised when the FID Inception weights file is not on this machine."""


class _ConvBN(nn.Module):
    """conv (no bias) -> batch norm (TF epsilon 1e-3) -> relu; keys `conv.*`, `bn.*`."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x):
    # TensorFlow's SAME avg pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _chain(x, *layers):
    for layer in layers:
        x = layer(x)
    return x


class _MixedA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1 = _ConvBN(cin, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat(
            [
                self.branch1x1(x),
                _chain(x, self.branch5x5_1, self.branch5x5_2),
                _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                self.branch_pool(_avg_pool_tf(x)),
            ],
            1,
        )


class _ReduceB(nn.Module):
    """35 -> 17 grid reduction (Mixed_6a)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat(
            [
                self.branch3x3(x),
                _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            1,
        )


class _MixedC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b..e)."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        h, v = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) horizontal / vertical
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1 = _ConvBN(cin, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, h[0], padding=h[1])
        self.branch7x7_3 = _ConvBN(c7, 192, v[0], padding=v[1])
        self.branch7x7dbl_1 = _ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, v[0], padding=v[1])
        self.branch7x7dbl_3 = _ConvBN(c7, c7, h[0], padding=h[1])
        self.branch7x7dbl_4 = _ConvBN(c7, c7, v[0], padding=v[1])
        self.branch7x7dbl_5 = _ConvBN(c7, 192, h[0], padding=h[1])
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x):
        return torch.cat(
            [
                self.branch1x1(x),
                _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                _chain(
                    x,
                    self.branch7x7dbl_1,
                    self.branch7x7dbl_2,
                    self.branch7x7dbl_3,
                    self.branch7x7dbl_4,
                    self.branch7x7dbl_5,
                ),
                self.branch_pool(_avg_pool_tf(x)),
            ],
            1,
        )


class _ReduceD(nn.Module):
    """17 -> 8 grid reduction (Mixed_7a)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _ConvBN(cin, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        return torch.cat(
            [
                _chain(x, self.branch3x3_1, self.branch3x3_2),
                _chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            1,
        )


class _MixedE(nn.Module):
    """8x8 block with split 1x3/3x1 heads (Mixed_7b avg-pools, Mixed_7c max-pools)."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        if self.pool == "avg":
            pooled = _avg_pool_tf(x)
        else:  # the ported graph max-pools here; keep it, or the features change
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(a),
                self.branch3x3_2b(a),
                self.branch3x3dbl_3a(b),
                self.branch3x3dbl_3b(b),
                self.branch_pool(pooled),
            ],
            1,
        )


class FIDInceptionV3(nn.Module):
    """FID Inception-v3. `forward` takes float pixels in [0, 255], N x 3 x 299 x 299
    (already resized: see `evals.features.clean_resize`) and returns the 2048-d pool3
    features. The input is scaled to [-1, 1) as (x - 128) / 128, like the TF graph."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _MixedA(192, 32)
        self.Mixed_5c = _MixedA(256, 64)
        self.Mixed_5d = _MixedA(288, 64)
        self.Mixed_6a = _ReduceB(288)
        self.Mixed_6b = _MixedC(768, 128)
        self.Mixed_6c = _MixedC(768, 160)
        self.Mixed_6d = _MixedC(768, 160)
        self.Mixed_6e = _MixedC(768, 192)
        self.Mixed_7a = _ReduceD(768)
        self.Mixed_7b = _MixedE(1280, pool="avg")
        self.Mixed_7c = _MixedE(2048, pool="max")
        # Unused for FID, but part of the published state dict (strict loading).
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected N x 3 x H x W float pixels in [0, 255], got shape {tuple(x.shape)}")
        x = (x - 128.0) / 128.0
        x = _chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = _chain(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = _chain(
            x,
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        )
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def default_weight_locations() -> list[Path]:
    """Where the weights are looked for when no path is given (after the env var)."""
    dirs = [Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffsweep"]
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")  # where pytorch-fid / torch-fidelity cache it
    return [d / name for d in dirs for name in (WEIGHTS_FILENAME, *ALT_WEIGHTS_FILENAMES)]


def _missing_message(looked: list[Path], reason: str) -> str:
    where = "\n".join(f"  - {p}" for p in looked)
    return (
        f"FID Inception weights not found ({reason}).\n"
        f"FID needs the file {WEIGHTS_FILENAME} (the 2015-12-05 TensorFlow Inception ported to "
        f"PyTorch, sha256 starting {WEIGHTS_SHA256_PREFIX}; published at {WEIGHTS_URL}; "
        f"torch-fidelity's weights-inception-2015-12-05-6726825d.pth is the same file).\n"
        f"Nothing is downloaded here: copy it onto this machine, then pass {CLI_FLAG} /path/to/{WEIGHTS_FILENAME}, "
        f"or set {ENV_VAR}=/path/to/{WEIGHTS_FILENAME}, or put it at {default_weight_locations()[0]}.\n"
        f"Looked in:\n{where}"
    )


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """Resolve the weights file: `path` (file, or a folder holding it), else $DIFFSWEEP_INCEPTION_WEIGHTS,
    else the cache locations. Raises InceptionWeightsNotFound naming the file, flag and env var."""
    looked: list[Path] = []
    explicit = path if path is not None else os.environ.get(ENV_VAR) or None
    if explicit is not None:
        p = Path(explicit).expanduser()
        candidates = [p / n for n in (WEIGHTS_FILENAME, *ALT_WEIGHTS_FILENAMES)] if p.is_dir() else [p]
        for c in candidates:
            if c.is_file():
                return c
        source = f"{CLI_FLAG} {explicit}" if path is not None else f"{ENV_VAR}={explicit}"
        raise InceptionWeightsNotFound(_missing_message(candidates, f"{source} does not point to the file"))
    for c in default_weight_locations():
        looked.append(c)
        if c.is_file():
            return c
    raise InceptionWeightsNotFound(_missing_message(looked, f"no {CLI_FLAG} given and {ENV_VAR} is unset"))


def sha256_prefix(path: Path, n: int = 8) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def load_fid_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """Build the network and load the real weights (strict); eval mode, no grads."""
    file = find_inception_weights(path)
    digest = sha256_prefix(file)
    if digest != WEIGHTS_SHA256_PREFIX:
        warnings.warn(
            f"{file} has sha256 {digest}..., not {WEIGHTS_SHA256_PREFIX}... of the published {WEIGHTS_FILENAME}: "
            "if it loads, its FIDs are not comparable with published ones",
            stacklevel=2,
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, or a pickle holding more than tensors
        raise ValueError(f"cannot read {file} as a PyTorch state dict (weights_only=True): {e}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    model = FIDInceptionV3()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{file} is not a state dict of the FID Inception ({WEIGHTS_FILENAME}): {e}"
        ) from None
    return model.to(device).eval().requires_grad_(False)
