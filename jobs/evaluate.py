#!/usr/bin/env python
"""Evaluate a results directory: per configuration, how good (FID, KID), how faithful
(CLIP score; attribute accuracy on the embedded model), how diverse (pairwise distance,
Vendi) and how expensive (GPU-seconds per image) its images are.

    python jobs/evaluate.py results/ --reference embedded --out report/
    python jobs/evaluate.py results/ --reference ref_images/ --features inception --inception-weights pt_inception.pth --out report/
    python jobs/evaluate.py --make-reference coco-val.npz ref_images/ --features inception

Features are extracted by a Ray Data actor pool over the result shards and cached per
(sample_id, extractor) in RESULTS/_features, so a second evaluation only recomputes
statistics. Writes metrics.parquet, metrics.csv, metrics.md (printed) and report.html.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import sys
import uuid
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from evals.feature_cache import FeatureCache, cache_key  # noqa: E402
from pipelines.errors import InputError  # noqa: E402
from pipelines.schema import RUN_KEY  # noqa: E402

EXTRACTORS = ("inception", "clip", "embedded")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="jobs/evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="?", help="results directory written by jobs/generate.py")
    p.add_argument("--reference", help="images directory, Parquet of images (column 'image'), stats .npz, "
                                       "or 'embedded[:N]' (N rendered images of the embedded domain, default 1000)")
    p.add_argument("--out", help="report directory (default RESULTS/report)")
    p.add_argument("--features", default="auto", choices=("auto",) + EXTRACTORS,
                   help="extractor for FID/KID (auto: embedded for the embedded model, else inception)")
    p.add_argument("--by", default=None, help="comma-separated grouping columns (default: the run key)")
    p.add_argument("--inception-weights", default=None, help="pt_inception-2015-12-05-6726825d.pth (or $DIFFSWEEP_INCEPTION_WEIGHTS)")
    p.add_argument("--clip-model", default=None, help="transformers CLIP directory for CLIP score and diversity")
    p.add_argument("--clip-arch", default=None, help="open_clip architecture (with --clip-pretrained)")
    p.add_argument("--clip-pretrained", default=None, help="local open_clip checkpoint file")
    p.add_argument("--cache", default=None, help="feature cache directory (default RESULTS/_features)")
    p.add_argument("--make-reference", nargs=2, metavar=("NAME.npz", "SOURCE"),
                   help="compute reference statistics of SOURCE into NAME.npz and exit")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples per confidence interval")
    p.add_argument("--batch-size", type=int, default=64, help="images per feature batch")
    p.add_argument("--pool-size", type=int, default=None, help="feature actors (default: one per GPU, 1 on CPU)")
    p.add_argument("--grid-prompts", type=int, default=6)
    p.add_argument("--grid-configs", type=int, default=12)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not args.make_reference and not args.results:
        p.error("RESULTS is required (or use --make-reference NAME.npz SOURCE)")
    if args.n_boot < 1 or args.batch_size < 1:
        p.error("--n-boot and --batch-size must be >= 1")
    return args


# ----------------------------------------------------------------------------- extraction


def extractor_kwargs(args) -> dict:
    return dict(inception_weights=args.inception_weights, clip_dir=args.clip_model, clip_arch=args.clip_arch,
                clip_pretrained=args.clip_pretrained, batch_size=args.batch_size)


def make_extractor(name: str, kwargs: dict, device=None):
    from evals.features import get_extractor

    try:
        return get_extractor(name, device=device, **kwargs)
    except (FileNotFoundError, ValueError) as e:
        flag = {"inception": "--inception-weights", "clip": "--clip-model"}.get(name, "--features")
        raise InputError(f"{flag}: {' '.join(str(e).split())}") from None


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


class FeatureActor:
    """Loads the extractors once; PNG bytes -> features (and attribute accuracy)."""

    def __init__(self, names: list[str], kwargs: dict, attributes: bool, wanted: set[str]):
        import torch

        self.wanted = wanted
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.extractors = {n: make_extractor(n, kwargs, device) for n in names}
        self.attributes = attributes

    def __call__(self, batch: dict) -> dict:
        keep = np.array([s in self.wanted for s in batch["sample_id"]], dtype=bool)
        batch = {k: v[keep] for k, v in batch.items()}
        images = [decode_png(b) for b in batch["image"]]
        out = {"sample_id": np.asarray(batch["sample_id"])}
        for name, ex in self.extractors.items():
            out[f"feat_{name}"] = ex(images).astype(np.float32)
        if self.attributes:
            out["attribute_accuracy"] = attribute_accuracy_safe(images, list(batch["prompt"]))
        return out


def attribute_accuracy_safe(images, prompts) -> np.ndarray:
    """Per image; NaN where the prompt is outside the embedded grammar."""
    from evals.attributes import attribute_accuracy

    out = np.full(len(images), np.nan)
    for i, (img, prompt) in enumerate(zip(images, prompts)):
        try:
            out[i] = attribute_accuracy([img], [prompt])[0]
        except ValueError:
            pass
    return out


def extract_missing(results_dir: Path, ok: pd.DataFrame, caches: dict, attr_cache, kwargs: dict, args) -> int:
    """Extract features for ok rows not yet cached, with a Ray Data actor pool. Returns rows done."""
    todo = set(ok.sample_id)
    needed = {name: todo - cache.ids() for name, cache in caches.items()}
    if attr_cache is not None:
        needed["attribute_accuracy"] = todo - attr_cache.ids()
    missing = set().union(*needed.values()) if needed else set()
    if not missing:
        return 0
    from jobs.ray_session import init_ray

    ray = init_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    pool = args.pool_size or max(1, gpus)
    missing_list = sorted(missing)
    shards = sorted(str(p) for p in results_dir.glob("part-*.parquet"))
    ds = ray.data.read_parquet(shards, columns=["sample_id", "image", "prompt", "status"])
    names = [n for n, ids in needed.items() if ids and n != "attribute_accuracy"]
    ds = ds.map_batches(
        FeatureActor,
        fn_constructor_kwargs=dict(names=names, kwargs=kwargs, attributes=bool(needed.get("attribute_accuracy")),
                                   wanted=set(missing_list)),
        batch_size=args.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool),
        num_gpus=1 if gpus else 0,
    )
    from tqdm import tqdm

    done = 0
    with tqdm(total=len(missing_list), unit="img", desc="features", disable=args.no_progress) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            ids = [str(s) for s in batch["sample_id"]]
            for name in names:
                caches[name].add(ids, batch[f"feat_{name}"])
            if "attribute_accuracy" in batch:
                attr_cache.add(ids, batch["attribute_accuracy"].reshape(-1, 1))
            done += len(ids)
            bar.update(len(ids))
    return done


# ----------------------------------------------------------------------------- reference


def load_reference_images(source: str, limit: int | None = None) -> tuple[list[np.ndarray], list[str] | None, str]:
    """Images (and captions, when known) of a reference source, plus a name for it."""
    if source.startswith("embedded"):
        from pipelines.embedded.domain import render_captions, sample_captions

        n = int(source.split(":", 1)[1]) if ":" in source else 1000
        captions = sample_captions(n, seed=12345)
        return list(render_captions(captions, seed=12345)), captions, f"embedded-{n}"
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        if not files:
            raise InputError(f"--reference {source}: directory holds no images (.png/.jpg/.jpeg/.webp/.bmp)")
        from PIL import Image

        return [np.asarray(Image.open(f).convert("RGB")) for f in files[:limit]], None, path.name
    if path.suffix == ".parquet" and path.is_file():
        table = pq.read_table(path)
        if "image" not in table.column_names:
            raise InputError(f"--reference {source}: Parquet has no 'image' column of PNG/JPEG bytes")
        if "status" in table.column_names:  # a results table: its ok rows
            table = table.filter(pa.array([s == "ok" for s in table.column("status").to_pylist()]))
        return [decode_png(b) for b in table.column("image").to_pylist()[:limit]], None, path.stem
    raise InputError(f"--reference {source!r}: expected an images directory, a .parquet of images, a stats .npz, or 'embedded[:N]'")


def check_reference(source: str) -> None:
    """Reject a --reference that cannot work before any model loads or feature is computed."""
    if source.startswith("embedded"):
        n = source.split(":", 1)[1] if ":" in source else "1000"
        if not n.isdigit() or int(n) < 2:
            raise InputError(f"--reference {source!r}: expected 'embedded' or 'embedded:N' with N >= 2 images")
        return
    path = Path(source)
    if source.endswith(".npz"):
        if not path.is_file():
            raise InputError(f"--reference {source}: no such statistics file")
    elif path.is_dir() or (path.suffix == ".parquet" and path.is_file()):
        return
    elif not path.exists():
        raise InputError(f"--reference {source}: no such file or directory")
    else:
        raise InputError(f"--reference {source!r}: expected an images directory, a .parquet of images, "
                         "a stats .npz, or 'embedded[:N]'")


def reference_stats_for(source: str, extractor, cache_dir: Path):
    """RefStats for `source` under `extractor`: a given .npz, or computed once and cached."""
    from evals.fid import check_compatible, load_stats, reference_stats

    desc = extractor.describe()
    if source.endswith(".npz"):
        if not Path(source).is_file():
            raise InputError(f"--reference {source}: no such statistics file")
        stats = load_stats(source)
        try:
            notes = check_compatible(stats, desc)
        except ValueError as e:
            raise InputError(f"--reference {source}: {e}") from None
        return stats, notes
    name = Path(source.rstrip("/")).stem if not source.startswith("embedded") else source.replace(":", "-")
    path = cache_dir / f"ref-{name}-{cache_key(desc)}.npz"
    stats = reference_stats(path, lambda: extractor(load_reference_images(source)[0]),
                            extractor=desc["extractor"], resize_mode=desc["resize_mode"], image_size=desc["image_size"])
    return stats, []


def text_embeddings(extractor, prompts: list[str], cache_root: Path) -> dict[str, np.ndarray]:
    """Prompt -> text embedding, cached beside the image features (one .npz per extractor),
    so re-evaluating does not load the text tower again."""
    path = cache_root / f"text-{cache_key(extractor.describe())}.npz"
    known: dict[str, np.ndarray] = {}
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            known = dict(zip(z["prompts"].tolist(), z["embeddings"]))
    missing = [p for p in prompts if p not in known]
    if missing:
        known.update(zip(missing, extractor.embed_text(missing)))
        cache_root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.npz")
        np.savez(tmp, prompts=np.array(list(known), dtype=str), embeddings=np.stack(list(known.values())))
        os.replace(tmp, path)
    return {p: known[p] for p in prompts}


# ----------------------------------------------------------------------------- metrics


def group_metrics(g: pd.DataFrame, feats, clip_img, text_emb, attr, ref, n_boot: int) -> dict:
    from evals.clip_score import clip_score_per_image
    from evals.diversity import diversity_by_prompt
    from evals.fid import fid_from_features, kernel_inception_distance
    from evals.stats import bootstrap_ci, fid_bootstrap_ci

    n = len(g)
    row = {"n": n}
    nan = float("nan")
    if ref is not None and n >= 2:
        row["fid"] = fid_from_features(feats, ref)
        row["fid_ci_lo"], row["fid_ci_hi"] = fid_bootstrap_ci(feats, ref, n_boot=n_boot)
        if ref.features is not None and n >= 2:
            row["kid"], row["kid_std"] = kernel_inception_distance(feats, ref.features, subsets=50, subset_size=min(n, ref.features.shape[0], 1000))
    if clip_img is not None:
        scores = clip_score_per_image(clip_img, text_emb)
        row["clip_score"] = float(scores.mean())
        row["clip_score_ci_lo"], row["clip_score_ci_hi"] = bootstrap_ci(scores, n_boot=n_boot)
    emb = clip_img if clip_img is not None else feats
    div = diversity_by_prompt(emb, list(g.prompt))
    div = div[div.n >= 2]
    row["diversity"] = float(div.mean_pairwise_cosine_distance.mean()) if len(div) else nan
    row["vendi"] = float(div.vendi_score.mean()) if len(div) else nan
    if attr is not None and np.isfinite(attr).any():
        row["attribute_accuracy"] = float(np.nanmean(attr))
        row["attribute_accuracy_ci_lo"], row["attribute_accuracy_ci_hi"] = bootstrap_ci(attr, n_boot=n_boot)
    sec = g.gen_seconds.to_numpy(dtype=float)
    row["gen_seconds"] = float(sec.mean())
    row["images_per_gpu_second"] = float(1.0 / sec.mean()) if sec.mean() > 0 else nan
    return row


def evaluate(args) -> int:
    results_dir = Path(args.results)
    if not results_dir.is_dir() or not list(results_dir.glob("part-*.parquet")):
        raise InputError(f"RESULTS {args.results}: not a results directory (no part-*.parquet shards from jobs/generate.py)")
    meta_cols = [c for c in pq.read_schema(next(results_dir.glob("part-*.parquet"))).names if c != "image"]
    df = pd.read_parquet(results_dir, columns=meta_cols)
    keys = [k.strip() for k in args.by.split(",")] if args.by else [k for k in RUN_KEY if k in df.columns]
    if not args.by and "dtype" in df.columns and df["dtype"].nunique() > 1:
        keys.append("dtype")  # the same configuration in two precisions: not the same images
    unknown = [k for k in keys if k not in df.columns]
    if unknown:
        raise InputError(f"--by: unknown columns {unknown}; results have {sorted(df.columns)}")
    errors = df[df.status != "ok"].groupby(keys, dropna=False).size().rename("n_error")
    ok = df[df.status == "ok"].reset_index(drop=True)
    if ok.empty:
        raise InputError(f"RESULTS {args.results}: no rows with status 'ok' to evaluate ({len(df)} error rows)")
    if args.reference:
        check_reference(args.reference)
    models = set(ok.model)
    fid_name = args.features if args.features != "auto" else ("embedded" if models == {"embedded"} else "inception")
    clip_name = "embedded" if fid_name == "embedded" else ("clip" if (args.clip_model or args.clip_arch) else None)
    kwargs = extractor_kwargs(args)
    fid_ex = make_extractor(fid_name, kwargs)
    clip_ex = fid_ex if clip_name == fid_name else (make_extractor(clip_name, kwargs) if clip_name else None)
    cache_root = Path(args.cache) if args.cache else results_dir / "_features"
    caches = {fid_name: FeatureCache(cache_root, cache_key(fid_ex.describe()))}
    if clip_ex is not None:
        caches[clip_name] = FeatureCache(cache_root, cache_key(clip_ex.describe()))
    attr_cache = FeatureCache(cache_root, "attribute_accuracy") if "embedded" in models else None
    n_new = extract_missing(results_dir, ok, caches, attr_cache, kwargs, args)

    notes = []
    ref = None
    ref_name = args.reference or "none"
    if args.reference:
        ref, ref_notes = reference_stats_for(args.reference, fid_ex, cache_root)
        notes += ref_notes
    else:
        notes.append("no --reference: FID and KID are not computed")
    if clip_ex is None:
        notes.append("no CLIP model (--clip-model or --clip-arch/--clip-pretrained): CLIP score is not computed "
                     "and diversity uses the FID features")

    ids = list(ok.sample_id)
    feats_all = caches[fid_name].load(ids)
    clip_all = caches[clip_name].load(ids) if clip_ex is not None else None
    attr_all = attr_cache.load(ids)[:, 0] if attr_cache is not None else None
    text_all = None
    if clip_ex is not None:
        text = text_embeddings(clip_ex, sorted(set(ok.prompt)), cache_root)
        text_all = np.stack([text[p] for p in ok.prompt])

    rows = []
    for key, idx in ok.groupby(keys, sort=True, dropna=False).indices.items():
        key = key if isinstance(key, tuple) else (key,)
        g = ok.iloc[idx]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = group_metrics(g, feats_all[idx], None if clip_all is None else clip_all[idx],
                              None if text_all is None else text_all[idx],
                              None if attr_all is None else attr_all[idx], ref, args.n_boot)
        rows.append({**dict(zip(keys, key)), **m})
    metrics = pd.DataFrame(rows)
    metrics.insert(len(keys) + 1, "n_error", [int(errors.get(tuple(r[k] for k in keys) if len(keys) > 1 else r[keys[0]], 0))
                                               for r in rows])
    desc = fid_ex.describe()
    metrics["extractor"], metrics["resize_mode"], metrics["reference"] = desc["extractor"], desc["resize_mode"], ref_name

    from evals.stats import weak_comparison_warnings

    if ref is not None:
        labels = {" ".join(str(r[k]) for k in keys): int(r["n"]) for r in rows}
        notes += weak_comparison_warnings(labels, desc["dim"], ref_n=ref.n)
    out = Path(args.out) if args.out else results_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    metrics.to_parquet(out / "metrics.parquet", index=False)
    metrics.to_csv(out / "metrics.csv", index=False)
    from evals.report import metrics_markdown, write_report

    table = metrics_markdown(metrics, keys)
    (out / "metrics.md").write_text(table + "\n" + "".join(f"\n> warning: {n}" for n in notes) + "\n")
    meta = {"results": str(results_dir), "reference": ref_name, "extractor": desc["extractor"],
            "resize_mode": desc["resize_mode"], "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "features computed this run": str(n_new)}
    write_report(metrics, image_grid(results_dir, ok, keys, args), out, keys=keys, title=f"diffsweep: {results_dir.name}",
                 warnings=notes, meta=meta)
    print(table)
    for n in notes:
        print(f"warning: {n}", file=sys.stderr)
    print(f"wrote {out}/metrics.parquet, metrics.csv, metrics.md, report.html ({n_new} images had features computed)",
          file=sys.stderr)
    return 0


def image_grid(results_dir: Path, ok: pd.DataFrame, keys: list[str], args) -> pd.DataFrame:
    """Prompt x configuration, one seed per prompt shared across the row."""
    prompts = list(dict.fromkeys(ok.prompt))[: args.grid_prompts]
    configs = ok[keys].drop_duplicates().sort_values(keys).head(args.grid_configs)
    picked = []
    for p in prompts:
        rows = ok[ok.prompt == p]
        common = set.intersection(*[set(rows.merge(c.to_frame().T.astype(configs.dtypes.to_dict()), on=keys).seed)
                                    for _, c in configs.iterrows()] or [set()])
        seed = min(common) if common else rows.seed.min()
        picked.append(rows[rows.seed == seed].merge(configs, on=keys))
    sel = pd.concat(picked, ignore_index=True) if picked else ok.head(0)
    wanted = set(sel.sample_id)
    table = pq.read_table(results_dir, columns=["sample_id", "image"],
                          filters=[("sample_id", "in", list(wanted))]) if wanted else None
    images = dict(zip(table.column("sample_id").to_pylist(), table.column("image").to_pylist())) if table else {}
    from evals.report import config_labels

    label = config_labels(sel[keys].reset_index(drop=True), keys).to_numpy() if len(sel) else []
    return pd.DataFrame({"prompt": sel.prompt, "seed": sel.seed, "config": label,
                         "image": [images.get(s) for s in sel.sample_id]})


def make_reference(args) -> int:
    from evals.fid import save_stats, feature_stats

    name, source = args.make_reference
    if not name.endswith(".npz"):
        raise InputError(f"--make-reference: NAME must end in .npz, got {name!r}")
    fid_name = "inception" if args.features == "auto" else args.features
    ex = make_extractor(fid_name, extractor_kwargs(args))
    images, _, _ = load_reference_images(source)
    feats = ex(images)
    mu, sigma = feature_stats(feats)
    d = ex.describe()
    save_stats(name, mu, sigma, feats.shape[0], d["extractor"], d["resize_mode"], d["image_size"], features=feats)
    print(json.dumps({"wrote": name, "n": int(feats.shape[0]), **d}))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return make_reference(args) if args.make_reference else evaluate(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from jobs.evaluate import main as _main  # importable name, so Ray workers can load FeatureActor

    sys.exit(_main())
