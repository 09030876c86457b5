#!/usr/bin/env python
"""Evaluate a results directory: per configuration, how good (FID, KID), how faithful
(CLIP score; attribute accuracy on the embedded model), how diverse (pairwise distance,
Vendi) and how expensive (GPU-seconds per image) its images are. The headline FID is the
bias-corrected FID-infinity; the plain FID is "FID at n" (--fid-n: one n for every group).

    python jobs/evaluate.py results/ --reference embedded --out report/
    python jobs/evaluate.py results/ --reference ref_images/ --features inception --inception-weights pt_inception.pth --out report/
    python jobs/evaluate.py --make-reference coco-val.npz ref_images/ --features inception

Features are extracted by a Ray Data actor pool over the result shards and cached per
(sample_id, everything that changes them) in RESULTS/_features, so a second evaluation only
recomputes statistics. Writes metrics.parquet, metrics.csv, metrics.md (printed; headed by
how it was measured), image_scores.parquet (unclamped per-image CLIP scores) and report.html.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from evals import files  # noqa: E402
from evals.cost import cost_warnings  # noqa: E402
from evals.memory import add_weights_memory  # noqa: E402
from evals.metrics_table import comparison_warnings, image_scores, measurement_description, metrics_table  # noqa: E402
from evals.provenance import run_provenance  # noqa: E402
from evals.references import BadReference, Reference, save_reference_stats  # noqa: E402
from jobs.cli import OneLineParser, at_least  # noqa: E402
from jobs.raydata.evaluation import extract, extractor_kwargs, read  # noqa: E402
from jobs.raydata.features import ExtractionFailed, make_extractor  # noqa: E402
from jobs.raydata.result_rows import committed_shards, read_images  # noqa: E402
from pipelines.contract import COLUMN, FROM_MODEL  # noqa: E402
from pipelines.errors import InputError  # noqa: E402

EXTRACTORS = ("inception", "clip", "embedded")  # evals.features.EXTRACTORS; importing that loads torch


def parse_args(argv=None):
    p = OneLineParser(prog="jobs/evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="?", help="results directory written by jobs/generate.py (or an s3://, gs:// URI)")
    p.add_argument("--reference", help="images directory, results directory, Parquet of images (column 'image'), "
                                       "stats .npz, or 'embedded[:N]' (N rendered images of the embedded domain, "
                                       "default 1000; ./embedded is a directory)")
    p.add_argument("--out", help="local report directory, outside RESULTS (default: RESULTS-report beside it; "
                                 "for a URI, NAME-report in the current directory)")
    p.add_argument("--features", default="auto", choices=("auto",) + EXTRACTORS,
                   help="extractor for FID/KID (auto: embedded for the embedded model, else inception)")
    p.add_argument("--by", default=None, help="comma-separated grouping columns (default: the run key)")
    p.add_argument("--inception-weights", default=None, help="pt_inception-2015-12-05-6726825d.pth (or $DIFFSWEEP_INCEPTION_WEIGHTS)")
    p.add_argument("--clip-model", default=None, help="transformers CLIP directory for CLIP score and diversity")
    p.add_argument("--clip-arch", default=None, help="open_clip architecture (with --clip-pretrained)")
    p.add_argument("--clip-pretrained", default=None, help="local open_clip checkpoint file of --clip-arch, or an "
                   "open_clip model directory (open_clip_config.json + weights, the hub layout; no --clip-arch needed)")
    p.add_argument("--cache", default=None, help="feature cache directory (default RESULTS/_features)")
    p.add_argument("--make-reference", nargs=2, metavar=("NAME.npz", "SOURCE"),
                   help="compute reference statistics of SOURCE into NAME.npz and exit")
    p.add_argument("--n-boot", type=at_least(1, int), default=200, help="bootstrap resamples per interval (FID-inf: <=50)")
    p.add_argument("--fid-n", type=at_least(2, int), metavar="N", help="plain FID of a seeded subset of N images of "
                   "every group, so plain FIDs compare (smaller groups: NaN, warned; default: all images)")
    p.add_argument("--batch-size", type=at_least(1, int), default=64, help="images per feature batch")
    p.add_argument("--pool-size", type=at_least(1, int), default=None, help="feature actors (default: one per GPU, 1 on CPU)")
    p.add_argument("--grid-prompts", type=at_least(1, int), default=6, help="prompts (rows) in the report's image grid")
    p.add_argument("--grid-configs", type=at_least(1, int), default=12, help="configurations (columns) in the image grid")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not args.make_reference and not args.results:
        p.error("RESULTS is required (or use --make-reference NAME.npz SOURCE)")
    for flag in ("out", "cache", "reference"):
        value = getattr(args, flag)
        if value is not None and not value.strip():
            p.error(f"--{flag}: got an empty string")
    return args


def default_report_dir(results: str) -> Path:
    """`results/` -> `results-report/`: beside RESULTS, never inside it (readers of RESULTS,
    e.g. pandas.read_parquet(RESULTS), would trip over the report's files). The report is
    written locally, so results on an object store get theirs in the current directory."""
    if files.is_uri(results):
        return Path(files.basename(results) + "-report")
    base = Path(os.path.normpath(results))
    if base.name in ("", ".", ".."):
        base = Path(os.path.abspath(results))
    return base.with_name(base.name + "-report")


def report_dir(args) -> Path:
    """Where the report goes; refused (before any work) when it would land inside RESULTS."""
    if args.out and files.is_uri(args.out):
        raise InputError(f"--out {args.out}: the report is written to a local directory; expected a local path")
    out = Path(args.out) if args.out else default_report_dir(args.results)
    results, where = os.path.realpath(args.results), os.path.realpath(out)
    inside = where == results or where.startswith(results.rstrip(os.sep) + os.sep)
    if inside and not files.is_uri(args.results):
        raise InputError(f"--out {args.out}: is {'RESULTS itself' if where == results else 'inside RESULTS'} "
                         f"({args.results}); the report goes outside the results, e.g. --out "
                         f"{default_report_dir(args.results)} (the default)")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory; expected a report directory")
    return out


def shown_keys(metrics, keys: list[str]) -> list[str]:
    """The grouping keys worth a column in the tables and plots: a manifest column that is at
    its constant default in every configuration (quant none, no LoRA, no refiner, ...) tells
    the reader nothing there. metrics.parquet keeps every key."""
    def at_default(k: str) -> bool:
        c = COLUMN.get(k)
        return (c is not None and c.default is not FROM_MODEL and k in metrics and len(metrics)
                and bool((metrics[k] == c.default).all()))

    return [k for k in keys if not at_default(k)] or list(keys)


def evaluate(args) -> int:
    from evals.report.grid import grid_rows
    from evals.report.format import config_labels
    from evals.report.page import write_report
    from evals.report.tables import write_metrics_files

    out = report_dir(args)
    shown: list[str] = []  # warnings printed as they happened
    df, ok, shards, keys = read(args, shown)
    ok, features, plan, (desc, clip_desc), n_new = extract(args, df, ok, shards, shown)
    notes = list(shown)
    ref = plan.compute() if plan is not None else None
    notes += plan.notes if plan is not None else ["no --reference: FID and KID are not computed"]
    if features.clip is None:
        notes.append("no CLIP model (--clip-model or --clip-pretrained): CLIP score is not computed "
                     "and diversity uses the FID features")
    metrics = metrics_table(ok, df[df.status != "ok"], keys, features, ref, args.n_boot, fid_n=args.fid_n)
    metrics = add_weights_memory(metrics, ok, keys, args.results)  # per (model, quant), from _run.json
    ref_name = args.reference or "none"
    for col, value in measurement_description(desc, clip_desc, ref_name, ref.n if ref else None, args.n_boot).items():
        metrics[col] = value
    labels = config_labels(metrics, keys)  # "ddim 4 steps g7.5": how warnings name configurations
    if ref is not None:
        notes += comparison_warnings(metrics, keys, desc["dim"], ref, fid_n=args.fid_n, labels=labels)
    notes += cost_warnings(metrics, labels)
    table_keys = shown_keys(metrics, keys)  # constant-default columns left out of the tables
    table = write_metrics_files(out, metrics, table_keys, notes, image_scores(ok, keys, features))
    grid = grid_rows(ok, keys, args.grid_prompts, args.grid_configs)
    images = read_images(shards, list(set(grid.sample_id)))
    grid["image"] = [images.get(s) for s in grid.sample_id]
    shown_results = args.results if files.is_uri(args.results) else str(Path(args.results))
    meta = {"results": shown_results, "reference": ref_name, "extractor": desc["extractor"],
            "resize_mode": desc["resize_mode"], "image processor": desc["image_processor"],
            "CLIP model": clip_desc["extractor"] if clip_desc else "none", "n_boot": str(args.n_boot),
            "FID at n": f"--fid-n {args.fid_n}" if args.fid_n else "all images of each group", **run_provenance(ok),
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "features computed this run": str(n_new)}
    write_report(metrics, grid.drop(columns="sample_id"), out, keys=table_keys,
                 title=f"diffsweep: {files.basename(args.results)}", warnings=notes, meta=meta)
    print(table)
    for n in notes[len(shown):]:
        print(f"warning: {n}", file=sys.stderr)
    scores = ", image_scores.parquet" if features.clip is not None else ""
    print(f"wrote the report to {out}/: metrics.parquet, metrics.csv, metrics.md{scores}, report.html "
          f"({n_new} images had features computed)", file=sys.stderr)
    return 0


def make_reference(args) -> int:
    name, source = args.make_reference
    if not name.endswith(".npz"):
        raise InputError(f"--make-reference: NAME must end in .npz, got {name!r}")
    reference = Reference(source, committed_shards(source))
    if reference.kind == "npz":
        raise InputError(f"--make-reference {name} {source}: SOURCE is statistics already; expected images")
    extractor = make_extractor("inception" if args.features == "auto" else args.features, extractor_kwargs(args))
    n = save_reference_stats(name, reference, extractor)
    print(json.dumps({"wrote": name, "n": n, **extractor.describe()}))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return make_reference(args) if args.make_reference else evaluate(args)
    except (InputError, BadReference) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ExtractionFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
