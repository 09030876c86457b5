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

import datetime as dt
import io
import json
import os
import re
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
from jobs.cli import OneLineParser, at_least  # noqa: E402
from pipelines.errors import InputError  # noqa: E402
from pipelines.storage.results import ResultStore  # noqa: E402
from pipelines.contract import RUN_KEY  # noqa: E402

EXTRACTORS = ("inception", "clip", "embedded")


def parse_args(argv=None):
    p = OneLineParser(prog="jobs/evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="?", help="results directory written by jobs/generate.py")
    p.add_argument("--reference", help="images directory, results directory, Parquet of images (column 'image'), "
                                       "stats .npz, or 'embedded[:N]' (N rendered images of the embedded domain, "
                                       "default 1000; ./embedded is a directory)")
    p.add_argument("--out", help="report directory, outside RESULTS (default: RESULTS-report beside it)")
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
    p.add_argument("--n-boot", type=at_least(1, int), default=200, help="bootstrap resamples per confidence interval")
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


# ----------------------------------------------------------------------------- results


# Columns evaluation reads from every shard (besides the image): a part-*.parquet without
# them cannot be evaluated even if it has the columns every results shard has.
EVAL_COLUMNS = ("sample_id", "status", "prompt", "seed", "model", "gen_seconds")
SHOWN = 5  # files or rows named in one warning or error line


def _short(e: BaseException) -> str:
    text = re.sub(r" ?<[^<>]* object at 0x[0-9a-f]+>", "", " ".join(str(e).split()))  # PIL names its BytesIO
    return text[:120] or type(e).__name__


def _listing(items: list[str]) -> str:
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def default_report_dir(results: str) -> Path:
    """`results/` -> `results-report/`: beside RESULTS, never inside it (readers of RESULTS,
    e.g. pandas.read_parquet(RESULTS), would trip over the report's files)."""
    base = Path(os.path.normpath(results))
    if base.name in ("", ".", ".."):
        base = Path(os.path.abspath(results))
    return base.with_name(base.name + "-report")


def report_dir(args) -> Path:
    """Where the report goes; refused (before any work) when it would land inside RESULTS."""
    out = Path(args.out) if args.out else default_report_dir(args.results)
    results, where = os.path.realpath(args.results), os.path.realpath(out)
    if where == results or where.startswith(results.rstrip(os.sep) + os.sep):
        raise InputError(f"--out {args.out}: is {'RESULTS itself' if where == results else 'inside RESULTS'} "
                         f"({args.results}); the report goes outside the results, e.g. --out "
                         f"{default_report_dir(args.results)} (the default)")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory; expected a report directory")
    return out


def read_results(results: str) -> tuple[pd.DataFrame, list[str], list[tuple[str, str]]]:
    """Every column but the image from the committed shards (ResultStore.scan().good), the
    shards read, and the files skipped (path, why): unreadable, another schema, foreign.
    Only top-level part-*.parquet shards count; nothing in RESULTS is moved or deleted."""
    results_dir = Path(results)
    if not results_dir.is_dir():
        raise InputError(f"RESULTS {results}: not a results directory (no such directory)")
    scan = ResultStore(str(results_dir)).scan()
    shown = lambda path: os.path.join(results, os.path.basename(path))  # noqa: E731
    skipped = [(shown(path), why) for path, why in scan.bad]
    skipped += [(shown(path), "not a results shard (not named part-*.parquet)") for path in scan.foreign]
    frames, good = [], []
    for path in scan.good:
        try:
            names = scan.columns[path]  # from the footer scan() read
            lacking = [c for c in EVAL_COLUMNS if c not in names]
            if lacking:
                skipped.append((shown(path), f"not a results shard (no {', '.join(lacking)} column)"))
                continue
            frames.append(pq.read_table(path, columns=[c for c in names if c != "image"]).to_pandas())
        except (OSError, pa.ArrowException) as e:
            skipped.append((shown(path), f"unreadable ({_short(e)})"))
            continue
        good.append(path)
    if not good:
        why = f"; skipped: {_listing([f'{p} ({w})' for p, w in skipped])}" if skipped else ""
        raise InputError(f"RESULTS {results}: not a results directory (no readable part-*.parquet shards "
                         f"from jobs/generate.py{why})")
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    return df, good, skipped


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

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def try_decode(data) -> tuple[np.ndarray | None, str]:
    """(RGB image, "") or (None, why) for bytes that are no decodable image."""
    if data is None or len(data) == 0:
        return None, "no image bytes"
    try:
        return decode_png(bytes(data)), ""
    except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
        return None, _short(e)


class FeatureActor:
    """Loads the extractors once; PNG bytes -> features (and attribute accuracy).

    A row whose image cannot be decoded does not fail the batch: it comes back with
    ok=False and the reason, and the driver counts it as an error row."""

    def __init__(self, names: list[str], kwargs: dict, attributes: bool, wanted: set[str]):
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the driver draws the one progress bar
        self.wanted = wanted
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.extractors = {n: make_extractor(n, kwargs, device) for n in names}
        self.attributes = attributes

    def __call__(self, batch: dict) -> dict:
        keep = np.array([s in self.wanted for s in batch["sample_id"]], dtype=bool)
        batch = {k: v[keep] for k, v in batch.items()}
        decoded = [try_decode(b) for b in batch["image"]]
        ok = np.array([im is not None for im, _ in decoded], dtype=bool)
        images = [im for im, _ in decoded if im is not None]
        out = {"sample_id": np.asarray(batch["sample_id"]), "ok": ok,
               "decode_error": np.array([why for _, why in decoded], dtype=str)}
        for name, ex in self.extractors.items():
            feats = np.zeros((len(ok), ex.dim), dtype=np.float32)
            if images:
                feats[ok] = ex(images)
            out[f"feat_{name}"] = feats
        if self.attributes:
            attr = np.full(len(ok), np.nan)
            attr[ok] = attribute_accuracy_safe(images, [p for p, good in zip(batch["prompt"], ok) if good])
            out["attribute_accuracy"] = attr
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


class ExtractionFailed(RuntimeError):
    """Feature actors kept dying; what was extracted is cached (exit code 1)."""


ACTOR_ATTEMPTS = 3  # passes over the rows still missing when a feature actor dies


def extract_missing(shards: list[str], ok: pd.DataFrame, caches: dict, attr_cache, kwargs: dict,
                    args) -> tuple[int, dict[str, str]]:
    """Extract features for ok rows not yet cached, with a Ray Data actor pool over the
    committed shards. Returns (rows done, {sample_id: why} of rows whose image would not decode)."""
    todo = set(ok.sample_id)
    needed = {name: todo - cache.ids() for name, cache in caches.items()}
    if attr_cache is not None:
        needed["attribute_accuracy"] = todo - attr_cache.ids()
    missing = set().union(*needed.values()) if needed else set()
    if not missing:
        return 0, {}
    from jobs.raydata.session import init_ray

    ray = init_ray()  # also keeps Ray Data's INFO lines off the console
    gpus = int(ray.cluster_resources().get("GPU", 0))
    pool = args.pool_size or max(1, gpus)
    names = [n for n, ids in needed.items() if ids and n != "attribute_accuracy"]
    attributes = bool(needed.get("attribute_accuracy"))
    actor_died = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)
    from tqdm import tqdm

    done: set[str] = set()
    undecodable: dict[str, str] = {}
    with tqdm(total=len(missing), unit="img", desc="features", disable=args.no_progress) as bar:
        for attempt in range(1, ACTOR_ATTEMPTS + 1):
            remaining = missing - done - set(undecodable)
            if not remaining:
                break
            ds = ray.data.read_parquet(shards, columns=["sample_id", "image", "prompt"])
            # No actor restarts: Ray Data hands its actors their arguments through the object store,
            # which Ray reports as an error line for every restartable actor (ray-project/ray#57733).
            # A dead actor instead ends this pass, and the next pass does the rows still missing
            # (every finished batch is already in the cache). Ray 2.60 takes max_restarts only as a
            # deprecated free keyword; its deprecation warning would break the progress bar.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
                ds = ds.map_batches(
                    FeatureActor,
                    fn_constructor_kwargs=dict(names=names, kwargs=kwargs, attributes=attributes, wanted=remaining),
                    batch_size=args.batch_size,
                    batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(size=pool),
                    num_gpus=1 if gpus else 0,
                    max_restarts=0,
                    max_task_retries=0,
                )
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    ids = np.array([str(s) for s in batch["sample_id"]], dtype=object)
                    good = np.asarray(batch["ok"], dtype=bool)
                    for sid, why in zip(ids[~good], batch["decode_error"][~good]):
                        undecodable[sid] = str(why)
                    for name in names:
                        sel = good & np.array([s in needed[name] for s in ids], dtype=bool)
                        caches[name].add(list(ids[sel]), batch[f"feat_{name}"][sel])
                    if attributes:
                        sel = good & np.array([s in needed["attribute_accuracy"] for s in ids], dtype=bool)
                        attr_cache.add(list(ids[sel]), batch["attribute_accuracy"][sel].reshape(-1, 1))
                    done.update(ids[good])
                    bar.update(len(ids))
            except actor_died as e:
                left = len(missing - done - set(undecodable))
                if attempt == ACTOR_ATTEMPTS:
                    raise ExtractionFailed(f"feature actors died {ACTOR_ATTEMPTS} times ({type(e).__name__}: "
                                           f"{_short(e)}); {len(done)} images' features are cached, {left} are "
                                           "not: run the same command again to go on") from None
                tqdm.write(f"warning: a feature actor died ({type(e).__name__}); extracting the {left} images left "
                           f"again (pass {attempt + 1} of {ACTOR_ATTEMPTS})", file=sys.stderr)
    return len(done), undecodable


# ----------------------------------------------------------------------------- reference


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REFERENCE_FORMS = ("an images directory, a results directory, a .parquet of images, a stats .npz, "
                   "or 'embedded[:N]'")


def embedded_domain_size(source: str) -> int | None:
    """N for the rendered-domain forms, exactly 'embedded' (1000) or 'embedded:N'; None for
    anything else, which is a path (./embedded, embedded_refs/, embedded/x are directories)."""
    if source == "embedded":
        return 1000
    if not source.startswith("embedded:"):
        return None
    n = source.split(":", 1)[1]
    if not n.isdigit() or int(n) < 2:
        raise InputError(f"--reference {source!r}: expected 'embedded' or 'embedded:N' with N >= 2 images")
    return int(n)


def _digest(parts) -> str:
    import hashlib

    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:10]


def _file_stamp(path: Path) -> tuple:
    st = path.stat()
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


class Reference:
    """A --reference source, checked without decoding anything (resolve), and its images
    (images(): every file or row decoded, the undecodable ones named in one InputError)."""

    def __init__(self, source: str):
        self.source = source
        self.n = embedded_domain_size(source)
        self.files: list[Path] = []
        self.shards: list[str] = []
        self.notes: list[str] = []
        path = Path(source)
        if self.n is not None:
            self.kind, self.name = "embedded", f"embedded-{self.n}"
            if path.exists():
                self.notes.append(f"--reference {source} means {self.n} rendered images of the embedded domain; "
                                  f"to use the directory of that name pass ./{source}")
            return
        if source.endswith(".npz"):
            if not path.is_file():
                raise InputError(f"--reference {source}: no such statistics file")
            self.kind, self.name = "npz", path.stem
            return
        if path.is_dir():
            shards = ResultStore(str(path)).scan().good
            if shards:  # a results directory: the ok rows of its committed shards
                self.kind, self.shards = "results", shards
                stamp = [_file_stamp(Path(s)) for s in shards]
            else:
                self.kind = "images"
                self.files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                                    and not any(part.startswith(".") for part in p.relative_to(path).parts))
                if not self.files:
                    raise InputError(f"--reference {source}: directory holds no images "
                                     f"({'/'.join(IMAGE_SUFFIXES)}) and no results shards")
                stamp = [_file_stamp(f) for f in self.files]
            self.name = f"{safe_name(Path(os.path.abspath(source)).name)}-{_digest(stamp)}"
            return
        if path.suffix == ".parquet" and path.is_file():
            self.kind, self.name = "parquet", f"{safe_name(path.stem)}-{_digest([_file_stamp(path)])}"
            return
        if not path.exists():
            raise InputError(f"--reference {source}: no such file or directory; expected {REFERENCE_FORMS}")
        raise InputError(f"--reference {source!r}: expected {REFERENCE_FORMS}")

    def images(self) -> tuple[list[np.ndarray], list[str] | None]:
        """Images (and captions, when known)."""
        if self.kind == "embedded":
            from evals.shapes import render_captions, sample_captions

            captions = sample_captions(self.n, seed=12345)
            return list(render_captions(captions, seed=12345)), captions
        if self.kind == "npz":
            raise InputError(f"--reference {self.source}: statistics, not images")
        if self.kind == "images":
            decoded = []
            for f in self.files:
                decoded.append(try_decode(f.read_bytes()) if f.stat().st_size else (None, "empty file"))
            labels = [str(f) for f in self.files]
        else:
            decoded, labels = [], []
            for path in (self.shards if self.kind == "results" else [self.source]):
                try:
                    names = pq.read_schema(path).names
                    table = pq.read_table(path, columns=[c for c in ("sample_id", "status", "image") if c in names])
                except (OSError, pa.ArrowException) as e:
                    raise InputError(f"--reference {self.source}: cannot read {path} ({_short(e)})") from None
                if "image" not in table.column_names:
                    raise InputError(f"--reference {self.source}: Parquet has no 'image' column of PNG/JPEG bytes")
                if "status" in table.column_names:  # a results table: its ok rows
                    table = table.filter(pa.array([s == "ok" for s in table.column("status").to_pylist()]))
                ids = (table.column("sample_id").to_pylist() if "sample_id" in table.column_names
                       else [f"row {i}" for i in range(table.num_rows)])
                decoded += [try_decode(b) for b in table.column("image").to_pylist()]
                labels += [f"{os.path.basename(path)} sample_id {s}" if "sample_id" in table.column_names
                           else f"{os.path.basename(path)} {s}" for s in ids]
        bad = [f"{label} ({why})" for label, (im, why) in zip(labels, decoded) if im is None]
        if bad:
            raise InputError(f"--reference {self.source}: {len(bad)} of {len(decoded)} images cannot be decoded: "
                             f"{_listing(bad)}; remove or replace them")
        if len(decoded) < 2:
            raise InputError(f"--reference {self.source}: {len(decoded)} image(s); FID needs at least 2")
        return [im for im, _ in decoded], None


def safe_name(name: str) -> str:
    """A name that can be part of one file name in the cache folder (no separators, no '..')."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip(".")
    return name[:64] or "reference"


class ReferencePlan:
    """Reference statistics for one extractor: read (a given .npz, or cached), or decoded up
    front, before any feature work, and computed once the generated features are in."""

    def __init__(self, ref: Reference, extractor, cache_dir: Path):
        from evals.fid import check_compatible, load_stats

        self.ref, self.extractor, self.notes = ref, extractor, list(ref.notes)
        self.stats, self._images = None, None
        desc = extractor.describe()
        if ref.kind == "npz":
            try:
                self.stats = load_stats(ref.source)
                self.notes += check_compatible(self.stats, desc)
            except (ValueError, OSError) as e:
                raise InputError(f"--reference {ref.source}: {_short(e)}") from None
            return
        self.path = cache_dir / f"ref-{ref.name}-{cache_key(desc)}.npz"
        if os.path.dirname(os.path.abspath(self.path)) != os.path.abspath(cache_dir):  # safe_name makes this so
            raise InputError(f"--reference {ref.source}: its name would leave the cache folder {cache_dir}")
        if not self.path.exists() and ref.kind != "embedded":
            self._images = ref.images()[0]

    def compute(self):
        from evals.fid import reference_stats

        if self.stats is None:
            desc = self.extractor.describe()
            images = self._images
            self.stats = reference_stats(self.path, lambda: self.extractor(images if images is not None else self.ref.images()[0]),
                                         extractor=desc["extractor"], resize_mode=desc["resize_mode"],
                                         image_size=desc["image_size"])
            self._images = None
        return self.stats


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


def warn(message: str, notes: list[str]) -> None:
    """A warning about the data, printed now (before the long part) and kept for the report."""
    print(f"warning: {message}", file=sys.stderr)
    notes.append(message)


def evaluate(args) -> int:
    results_dir = Path(args.results)
    out = report_dir(args)
    shown_notes: list[str] = []  # printed as they happened
    df, shards, skipped = read_results(args.results)
    if skipped:
        warn(f"skipped {len(skipped)} file(s) in RESULTS that are not readable results shards (left as they are): "
             + _listing([f"{p} ({why})" for p, why in skipped]), shown_notes)
    legacy = results_dir / "report"
    if (legacy / "metrics.parquet").is_file():
        warn(f"{legacy} is a report an older diffsweep wrote inside RESULTS; readers of the whole directory "
             f"(pandas.read_parquet({args.results})) fail on its files: move it out of RESULTS", shown_notes)
    keys = [k.strip() for k in args.by.split(",")] if args.by else [k for k in RUN_KEY if k in df.columns]
    if not args.by and "dtype" in df.columns and df["dtype"].nunique() > 1:
        keys.append("dtype")  # the same configuration in two precisions: not the same images
    unknown = [k for k in keys if k not in df.columns]
    if unknown:
        raise InputError(f"--by: unknown columns {unknown}; results have {sorted(df.columns)}")
    ok = df[df.status == "ok"].reset_index(drop=True)
    if ok.empty:
        raise InputError(f"RESULTS {args.results}: no rows with status 'ok' to evaluate ({len(df)} error rows)")
    reference = Reference(args.reference) if args.reference else None
    models = set(ok.model)
    fid_name = args.features if args.features != "auto" else ("embedded" if models == {"embedded"} else "inception")
    clip_name = "embedded" if fid_name == "embedded" else ("clip" if (args.clip_model or args.clip_arch) else None)
    kwargs = extractor_kwargs(args)
    fid_ex = make_extractor(fid_name, kwargs)
    clip_ex = fid_ex if clip_name == fid_name else (make_extractor(clip_name, kwargs) if clip_name else None)
    cache_root = Path(args.cache) if args.cache else results_dir / "_features"
    plan = ReferencePlan(reference, fid_ex, cache_root) if reference is not None else None  # decoded now
    caches = {fid_name: FeatureCache(cache_root, cache_key(fid_ex.describe()))}
    if clip_ex is not None:
        caches[clip_name] = FeatureCache(cache_root, cache_key(clip_ex.describe()))
    attr_cache = FeatureCache(cache_root, "attribute_accuracy") if "embedded" in models else None
    n_new, undecodable = extract_missing(shards, ok, caches, attr_cache, kwargs, args)
    bad_cache = {p: why for c in [*caches.values(), attr_cache] if c is not None for p, why in c.bad.items()}
    if bad_cache:
        warn(f"skipped {len(bad_cache)} unreadable feature cache shard(s), their features computed again: "
             + _listing([f"{p} ({why})" for p, why in bad_cache.items()]), shown_notes)
    if undecodable:
        ids = sorted(undecodable)
        warn(f"{len(ids)} row(s) with status 'ok' have an image that cannot be decoded; counted in n_error: "
             + _listing([f"sample_id {s} ({undecodable[s]})" for s in ids]), shown_notes)
        df.loc[df.sample_id.isin(undecodable), "status"] = "error"
        ok = ok[~ok.sample_id.isin(undecodable)].reset_index(drop=True)
        if ok.empty:
            raise InputError(f"RESULTS {args.results}: no row with status 'ok' has a decodable image")
    errors = df[df.status != "ok"].groupby(keys, dropna=False).size().rename("n_error")

    notes = list(shown_notes)
    ref = None
    ref_name = args.reference or "none"
    if plan is not None:
        ref = plan.compute()
        notes += plan.notes
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
    out.mkdir(parents=True, exist_ok=True)
    metrics.to_parquet(out / "metrics.parquet", index=False)
    metrics.to_csv(out / "metrics.csv", index=False)
    from evals.report import metrics_markdown, write_report

    table = metrics_markdown(metrics, keys)
    (out / "metrics.md").write_text(table + "\n" + "".join(f"\n> warning: {n}" for n in notes) + "\n")
    meta = {"results": str(results_dir), "reference": ref_name, "extractor": desc["extractor"],
            "resize_mode": desc["resize_mode"], "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "features computed this run": str(n_new)}
    write_report(metrics, image_grid(shards, ok, keys, args), out, keys=keys, title=f"diffsweep: {results_dir.name}",
                 warnings=notes, meta=meta)
    print(table)
    for n in notes[len(shown_notes):]:
        print(f"warning: {n}", file=sys.stderr)
    print(f"wrote the report to {out}/: metrics.parquet, metrics.csv, metrics.md, report.html "
          f"({n_new} images had features computed)", file=sys.stderr)
    return 0


def image_grid(shards: list[str], ok: pd.DataFrame, keys: list[str], args) -> pd.DataFrame:
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
    wanted = list(set(sel.sample_id))
    images = {}
    for path in shards if wanted else []:  # the committed shards only, each on its own
        try:
            table = pq.read_table(path, columns=["sample_id", "image"], filters=[("sample_id", "in", wanted)])
        except (OSError, pa.ArrowException):
            continue  # a shard that went bad since it was read: a gap in the grid
        images.update(zip(table.column("sample_id").to_pylist(), table.column("image").to_pylist()))
    from evals.report import config_labels

    label = config_labels(sel[keys].reset_index(drop=True), keys).to_numpy() if len(sel) else []
    return pd.DataFrame({"prompt": sel.prompt, "seed": sel.seed, "config": label,
                         "image": [images.get(s) for s in sel.sample_id]})


def make_reference(args) -> int:
    from evals.fid import save_stats, feature_stats

    name, source = args.make_reference
    if not name.endswith(".npz"):
        raise InputError(f"--make-reference: NAME must end in .npz, got {name!r}")
    reference = Reference(source)
    if reference.kind == "npz":
        raise InputError(f"--make-reference {name} {source}: SOURCE is statistics already; expected images")
    fid_name = "inception" if args.features == "auto" else args.features
    ex = make_extractor(fid_name, extractor_kwargs(args))
    images, _ = reference.images()
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
    except ExtractionFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from jobs.evaluate import main as _main  # importable name, so Ray workers can load FeatureActor

    sys.exit(_main())
