"""Feature extractors: the FID Inception (architecture, weights file handling, clean resize) and
CLIP directories (a tiny random CLIPModel stands in for the embedded one: same code path)."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evals import inception as inc
from evals.features import (
    EMBEDDED_CLIP_ENV_VAR,
    HFCLIPExtractor,
    InceptionExtractor,
    as_image_list,
    clean_resize,
    get_extractor,
)

ROOT = Path(__file__).resolve().parents[1]
WORDS = "a an the red green blue yellow circle square triangle star and on white black background small big".split()


def make_tiny_clip_dir(path: Path, seed: int = 0) -> Path:
    """A randomly initialised CLIPModel + CLIPProcessor directory (64 px, 24-d projection),
    written offline: the same layout `save_pretrained` gives the shipped embedded CLIP."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    from pipelines.registry.tokenizer import write_clip_tokenizer

    write_clip_tokenizer(path, WORDS)
    tok = CLIPTokenizer.from_pretrained(path)
    text = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).save_pretrained(path)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return make_tiny_clip_dir(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def random_inception():
    """FID Inception with random weights and non-trivial batch-norm statistics."""
    torch.manual_seed(0)
    model = inc.FIDInceptionV3()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def weights_file(random_inception, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / inc.WEIGHTS_FILENAME
    torch.save(random_inception.state_dict(), path)
    return path


def _images(n, h=64, w=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- Inception


def test_inception_state_dict_has_the_published_layout():
    """Names and shapes of pt_inception-2015-12-05-6726825d.pth (torchvision's Inception3 naming,
    1008 classes, no aux head): 94 conv+bn units, 23,850,960 parameters."""
    sd = inc.FIDInceptionV3().state_dict()
    expected = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6b.branch7x7_1.conv.weight": (128, 768, 1, 1),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "Mixed_7c.branch1x1.bn.num_batches_tracked": (),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    assert len(sd) == 94 * 6 + 2
    assert sum(1 for k in sd if k.endswith(".conv.weight")) == 94
    assert not any(k.startswith("AuxLogits") for k in sd)
    assert sum(v.numel() for k, v in sd.items() if "running" not in k and "num_batches" not in k) == 23_850_960
    assert all(m.eps == 1e-3 for m in inc.FIDInceptionV3().modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_inception_weights_round_trip_through_file(random_inception, weights_file):
    """Save -> strict load -> same 2048-d features. (One image keeps this CPU test quick;
    batching is shared with the CLIP extractors, whose batch invariance is tested below.)"""
    images = _images(1)
    x = torch.from_numpy(np.stack([clean_resize(im) for im in images])).permute(0, 3, 1, 2)
    with torch.no_grad():
        direct = random_inception(x).double().numpy()
    with pytest.warns(UserWarning, match="not comparable with published"):  # random weights: other sha256
        fe = InceptionExtractor(weights_file, batch_size=1, device="cpu")
    feats = fe(images)
    assert feats.shape == (1, 2048) and feats.dtype == np.float64
    assert np.isfinite(feats).all() and feats.std() > 0
    np.testing.assert_allclose(feats, direct, rtol=1e-4, atol=1e-5)
    assert (fe.name, fe.resize_mode, fe.image_size, fe.dim) == ("inception", "clean", 299, 2048)
    assert not fe.has_text
    with pytest.raises(NotImplementedError, match="no text tower"):
        fe.embed_text(["a red circle"])


def _torch_fidelity_source():
    """Reader for torch-fidelity's source files: the installed package, else a wheel in
    $DIFFSWEEP_TEST_WHEELS or ./.whl (`pip download --no-deps torch-fidelity==0.4.0 -d .whl`).
    Installing it is not an option here: without torchvision an installed torch-fidelity breaks
    `import torchmetrics.image.fid` (torchmetrics imports it whenever it is installed)."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is not None:
        root = Path(list(spec.submodule_search_locations)[0])
        return lambda file: (root / file).read_text()
    dirs = [Path(os.environ["DIFFSWEEP_TEST_WHEELS"])] if os.environ.get("DIFFSWEEP_TEST_WHEELS") else []
    for wheel in sorted(w for d in [*dirs, ROOT / ".whl"] for w in d.glob("torch_fidelity-*.whl")):
        archive = zipfile.ZipFile(wheel)
        return lambda file: archive.read(f"torch_fidelity/{file}").decode()
    pytest.skip("torch-fidelity source not found (pip download --no-deps torch-fidelity==0.4.0 -d .whl)")


def _torch_fidelity_inception_class():
    """torch-fidelity's FeatureExtractorInceptionV3 (what torchmetrics' FID runs), compiled from
    its source. Importing the package pulls in torchvision (no CPU build here), so we take its
    two torch-only files and supply four trivial helpers (base class, assert, dtype lookup,
    kwarg lookup); the network and its weight loading are torch-fidelity's own code."""
    read = _torch_fidelity_source()

    def run(file, ns):
        tree = ast.parse(read(file))
        body = [n for n in tree.body if not (isinstance(n, ast.ImportFrom) and (n.module or "").startswith("torch_fidelity"))]
        exec(compile(ast.Module(body, []), f"torch_fidelity/{file}", "exec"), ns)
        return ns

    class FeatureExtractorBase(torch.nn.Module):
        def __init__(self, name, features_list):
            super().__init__()
            self.name, self.features_list = name, list(features_list)

    def vassert(ok, msg):
        assert ok, msg

    ns = dict(
        FeatureExtractorBase=FeatureExtractorBase,
        vassert=vassert,
        text_to_dtype=lambda name, default=None: getattr(torch, name or default),
        get_kwarg=lambda name, kwargs: kwargs.get(name, False),
        interpolate_bilinear_2d_like_tensorflow1x=run("interpolate_compat_tensorflow.py", {})[
            "interpolate_bilinear_2d_like_tensorflow1x"
        ],
    )
    return run("feature_extractor_inceptionv3.py", ns)["FeatureExtractorInceptionV3"]


def test_inception_matches_torch_fidelity_network(weights_file):
    """Same weights file, same 299x299 image: torch-fidelity's network (strict-loading our file)
    and ours give the same 2048-d features. This pins the TF-port details (pooling without
    padded zeros, max pool in Mixed_7c, (x - 128) / 128 input scaling)."""
    reference = _torch_fidelity_inception_class()("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights_file))
    image = _images(1, 299, 299, seed=9)
    with torch.no_grad():
        theirs = reference(torch.from_numpy(image).permute(0, 3, 1, 2))[0].double().numpy()
    with pytest.warns(UserWarning, match="sha256"):
        ours = InceptionExtractor(weights_file, device="cpu")(image)
    assert theirs.std() > 0.01
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)


def test_inception_weights_lookup_order(weights_file, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(inc.ENV_VAR, str(weights_file.parent))  # a folder holding the file works
    assert inc.find_inception_weights() == weights_file
    monkeypatch.delenv(inc.ENV_VAR)
    cached = tmp_path / "xdg" / "diffsweep" / inc.WEIGHTS_FILENAME
    cached.parent.mkdir(parents=True)
    cached.symlink_to(weights_file)
    assert inc.find_inception_weights() == cached
    assert inc.find_inception_weights(weights_file) == weights_file  # explicit path wins


def test_missing_inception_weights_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv(inc.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(inc.InceptionWeightsNotFound) as err:
        get_extractor("inception")
    msg = str(err.value)
    for needle in ("pt_inception-2015-12-05-6726825d.pth", "--inception-weights", "DIFFSWEEP_INCEPTION_WEIGHTS"):
        assert needle in msg
    assert str(tmp_path / "xdg" / "diffsweep" / inc.WEIGHTS_FILENAME) in msg
    monkeypatch.setenv(inc.ENV_VAR, str(tmp_path / "nowhere.pth"))
    with pytest.raises(inc.InceptionWeightsNotFound, match=r"DIFFSWEEP_INCEPTION_WEIGHTS=.*nowhere.pth"):
        get_extractor("inception")
    with pytest.raises(inc.InceptionWeightsNotFound, match=r"--inception-weights .*other.pth"):
        get_extractor("inception", inception_weights=tmp_path / "other.pth")


def test_wrong_weights_file_is_rejected(tmp_path):
    bad = tmp_path / inc.WEIGHTS_FILENAME
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="not a state dict of the FID Inception"):
        inc.load_fid_inception(bad)
    bad.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="cannot read .* as a PyTorch state dict"):
        inc.load_fid_inception(bad)


def test_clean_resize_is_pil_bicubic_on_float_channels():
    img = _images(1, 37, 53, seed=3)[0]
    out = clean_resize(img)
    assert out.shape == (299, 299, 3) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    assert not np.allclose(out, np.round(out))  # not re-quantised to uint8
    # On a smooth image (no overshoot for 8-bit PIL to clip between its two passes), PIL's
    # 8-bit bicubic differs from ours only by rounding.
    yy, xx = np.mgrid[0:37, 0:53]
    smooth = np.stack([40 + 3 * yy, 60 + 2 * xx, 100 + yy + xx], axis=2).astype(np.uint8)
    pil = np.asarray(Image.fromarray(smooth).resize((299, 299), Image.BICUBIC), dtype=np.float32)
    assert np.abs(clean_resize(smooth) - pil).max() <= 1.0
    big = _images(1, 299, 299, seed=4)[0]
    np.testing.assert_array_equal(clean_resize(big), big.astype(np.float32))


def test_clean_resize_matches_cleanfid():
    resize = pytest.importorskip("cleanfid.resize", reason="pip install --no-deps clean-fid==0.1.35")
    img = _images(1, 40, 64, seed=5)[0]
    np.testing.assert_array_equal(clean_resize(img), resize.make_resizer("PIL", False, "bicubic", (299, 299))(img))


def test_image_validation():
    assert len(as_image_list([_images(1)[0], _images(1, 10, 12)[0]])) == 2  # sizes may differ
    with pytest.raises(ValueError, match="uint8"):
        as_image_list(_images(2).astype(np.float32))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        as_image_list(_images(1)[0])
    with pytest.raises(ValueError, match="image 1"):
        as_image_list([_images(1)[0], np.zeros((8, 8, 4), np.uint8)])


# ----------------------------------------------------------------------------- CLIP


def test_hf_clip_extractor_matches_the_model(tiny_clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    fe = HFCLIPExtractor(tiny_clip_dir, batch_size=2, device="cpu")
    assert (fe.dim, fe.image_size, fe.resize_mode, fe.has_text) == (24, 64, "clip-processor", True)
    images = _images(5, 64, 64, seed=6)
    feats = fe(images)
    assert feats.shape == (5, 24) and feats.dtype == np.float64
    model, proc = CLIPModel.from_pretrained(tiny_clip_dir).eval(), CLIPProcessor.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        out = model.get_image_features(pixel_values=proc(images=list(images), return_tensors="pt")["pixel_values"])
        want = out if isinstance(out, torch.Tensor) else out.pooler_output
    np.testing.assert_allclose(feats, want.double().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(HFCLIPExtractor(tiny_clip_dir, batch_size=5, device="cpu")(images), feats, atol=1e-6)


def test_hf_clip_text_embeddings_do_not_depend_on_batch_padding(tiny_clip_dir):
    texts = ["a red circle", "a small blue square and a big green triangle on a white background", "star"]
    one = HFCLIPExtractor(tiny_clip_dir, batch_size=1, device="cpu").embed_text(texts)
    all_ = HFCLIPExtractor(tiny_clip_dir, batch_size=3, device="cpu").embed_text(texts)
    assert one.shape == (3, 24) and one.dtype == np.float64
    np.testing.assert_allclose(one, all_, atol=1e-5)
    assert np.abs(one[0] - one[1]).max() > 1e-3


def test_embedded_extractor(tiny_clip_dir, tmp_path, monkeypatch):
    fe = get_extractor("embedded", embedded_clip=tiny_clip_dir, device="cpu")
    assert fe.name == "embedded" and fe.dim == 24
    monkeypatch.setenv(EMBEDDED_CLIP_ENV_VAR, str(tiny_clip_dir))
    assert get_extractor("embedded", device="cpu").path == tiny_clip_dir
    monkeypatch.setenv(EMBEDDED_CLIP_ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="embedded CLIP is not at .*missing.*train_embedded"):
        get_extractor("embedded")


def test_clip_extractor_naming_and_errors(tiny_clip_dir, tmp_path):
    fe = get_extractor("clip", clip_dir=tiny_clip_dir, device="cpu")
    assert fe.name == f"clip:{tiny_clip_dir.name}"
    with pytest.raises(ValueError, match="clip_dir="):
        get_extractor("clip")
    with pytest.raises((ImportError, FileNotFoundError), match="open_clip"):
        get_extractor("clip", clip_arch="ViT-B-32", clip_pretrained=tmp_path / "none.bin")
    with pytest.raises(FileNotFoundError, match="not a transformers CLIP directory"):
        get_extractor("clip", clip_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown feature extractor 'dino'.*inception, clip, embedded"):
        get_extractor("dino")


def test_evals_never_imports_diffusers_or_ray():
    code = (
        "import sys; import evals.features, evals.fid, evals.clip_score, evals.diversity, evals.stats, evals.inception, "
        "evals.references, evals.metrics_table, evals.text_embeddings, evals.attributes, evals.report.page; "
        "bad = [m for m in ('diffusers', 'ray') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_evals_imports_no_other_layer_and_no_private_names():
    """evals/ works on arrays, frames and paths: it imports neither diffusers, ray, pipelines
    nor jobs, and no module reaches into another's private (_underscore) names."""
    for path in sorted((ROOT / "evals").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules, names = [a.name for a in node.names], []
            elif isinstance(node, ast.ImportFrom):
                modules, names = [node.module or ""], [a.name for a in node.names]
            else:
                continue
            assert not [m for m in modules if m.split(".")[0] in ("diffusers", "ray", "pipelines", "jobs")], (path, modules)
            assert not [n for n in names if n.startswith("_") and n != "__future__"], (path, names)


def test_hf_clip_takes_read_only_images_without_a_warning(tiny_clip_dir):
    """Decoded images can be read-only; transformers' torchvision backend (used whenever
    torchvision imports) warns on those, and a clean evaluation log has no warnings."""
    import warnings

    im = np.zeros((2, 32, 32, 3), np.uint8)
    im.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert HFCLIPExtractor(tiny_clip_dir, device="cpu")(list(im)).shape == (2, 24)
