"""The evaluation's inputs, before any metric: the committed result rows read, the grouping
keys chosen, the reference checked, and every feature the metrics need extracted on a Ray
Data actor pool (jobs/raydata/features.py) or loaded from the feature cache.

jobs/evaluate.py calls `read` then `extract`, and computes the metrics and the report from
what they return; warnings about the data are printed as they happen and kept for the report.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from evals import files
from evals.feature_cache import FeatureCache, cache_key, feature_description
from evals.messages import listing
from evals.metrics_table import RowFeatures
from evals.references import Reference, ReferencePlan
from evals.text_embeddings import text_embeddings
from jobs.raydata.features import ATTRIBUTES, extract_missing, make_extractor
from jobs.raydata.result_rows import committed_shards, read_results
from pipelines.contract import RUN_KEY
from pipelines.errors import InputError


def warn(message: str, notes: list[str]) -> None:
    """A warning about the data, printed now (before the long part) and kept for the report."""
    print(f"warning: {message}", file=sys.stderr)
    notes.append(message)


def grouping_keys(df, by: str | None) -> list[str]:
    """--by's columns, else the run key (and dtype when the results mix precisions: the same
    configuration in two precisions does not make the same images)."""
    keys = [k.strip() for k in by.split(",")] if by else [k for k in RUN_KEY if k in df.columns]
    if not by and "dtype" in df.columns and df["dtype"].nunique() > 1:
        keys.append("dtype")
    unknown = [k for k in keys if k not in df.columns]
    if unknown:
        raise InputError(f"--by: unknown columns {unknown}; results have {sorted(df.columns)}")
    return keys


def extractor_kwargs(args) -> dict:
    return dict(inception_weights=args.inception_weights, clip_dir=args.clip_model, clip_arch=args.clip_arch,
                clip_pretrained=args.clip_pretrained, batch_size=args.batch_size)


def read(args, notes: list[str]):
    """The results' rows, their ok rows, the shards read and the grouping keys."""
    df, shards, skipped = read_results(args.results)
    if skipped:
        warn(f"skipped {len(skipped)} file(s) in RESULTS that are not readable results shards (left as they are): "
             + listing([f"{p} ({why})" for p, why in skipped]), notes)
    legacy = Path(args.results) / "report"
    if not files.is_uri(args.results) and (legacy / "metrics.parquet").is_file():
        warn(f"{legacy} is a report an older diffsweep wrote inside RESULTS; readers of the whole directory "
             f"(pandas.read_parquet({args.results})) fail on its files: move it out of RESULTS", notes)
    keys = grouping_keys(df, args.by)
    ok = df[df.status == "ok"].reset_index(drop=True)
    if ok.empty:
        raise InputError(f"RESULTS {args.results}: no rows with status 'ok' to evaluate ({len(df)} error rows)")
    return df, ok, shards, keys


def extract(args, df, ok, shards, notes: list[str]):
    """Extractors chosen, reference checked (decoded now, before the long part), missing
    features extracted. Returns the ok rows with decodable images, their RowFeatures, the
    reference plan, the feature descriptions (FID extractor, CLIP model or None; they key the
    caches) and how many rows had features computed."""
    models = set(ok.model)
    fid_name = args.features if args.features != "auto" else ("embedded" if models == {"embedded"} else "inception")
    wants_clip = args.clip_model or args.clip_arch or args.clip_pretrained
    clip_name = "embedded" if fid_name == "embedded" else ("clip" if wants_clip else None)
    reference = Reference(args.reference, committed_shards(args.reference)) if args.reference else None
    kwargs = extractor_kwargs(args)
    fid_ex = make_extractor(fid_name, kwargs)
    clip_ex = fid_ex if clip_name == fid_name else (make_extractor(clip_name, kwargs) if clip_name else None)
    cache_root = args.cache or files.join(args.results, "_features")  # a local folder or a URI
    described = {name: feature_description(ex, args.clip_pretrained if name == "clip" else None)
                 for name, ex in ((fid_name, fid_ex), (clip_name, clip_ex)) if ex is not None}
    plan = ReferencePlan(reference, fid_ex, cache_root, described[fid_name]) if reference is not None else None
    caches = {name: FeatureCache(cache_root, cache_key(desc)) for name, desc in described.items()}
    if "embedded" in models:
        caches[ATTRIBUTES] = FeatureCache(cache_root, ATTRIBUTES)
    n_new, undecodable = extract_missing(shards, set(ok.sample_id), caches, kwargs, batch_size=args.batch_size,
                                         pool_size=args.pool_size, progress=not args.no_progress)
    bad_cache = {p: why for c in caches.values() for p, why in c.bad.items()}
    if bad_cache:
        warn(f"skipped {len(bad_cache)} unreadable feature cache shard(s), their features computed again: "
             + listing([f"{p} ({why})" for p, why in bad_cache.items()]), notes)
    if undecodable:
        warn(f"{len(undecodable)} row(s) with status 'ok' have an image that cannot be decoded; counted in n_error: "
             + listing([f"sample_id {s} ({undecodable[s]})" for s in sorted(undecodable)]), notes)
        df.loc[df.sample_id.isin(undecodable), "status"] = "error"
        ok = ok[~ok.sample_id.isin(undecodable)].reset_index(drop=True)
        if ok.empty:
            raise InputError(f"RESULTS {args.results}: no row with status 'ok' has a decodable image")
    ids = list(ok.sample_id)
    features = RowFeatures(caches[fid_name].load(ids))
    if clip_ex is not None:
        features.clip = caches[clip_name].load(ids)
        text = text_embeddings(clip_ex, sorted(set(ok.prompt)), cache_root, described[clip_name])
        features.text = np.stack([text[p] for p in ok.prompt])
    if ATTRIBUTES in caches:
        features.attributes = caches[ATTRIBUTES].load(ids)[:, 0]
    return ok, features, plan, (described[fid_name], described.get(clip_name)), n_new
