"""Feature extraction on Ray Data: an actor pool over the committed result shards that turns
PNG bytes into features (and attribute accuracy), committing each batch to the feature cache.

Only rows whose features are not cached yet are extracted, so a second evaluation reads
the cache and starts no actor. A row whose image cannot be decoded does not fail its batch:
it comes back with the reason and is counted as an error row. A dead actor ends a pass; the
next pass does the rows still missing.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np

from evals.attributes import attribute_accuracy_or_nan
from evals.decode import try_decode
from evals.feature_cache import FeatureCache
from evals.messages import reason
from pipelines.errors import InputError

ACTOR_ATTEMPTS = 3  # passes over the rows still missing when a feature actor dies
ATTRIBUTES = "attribute_accuracy"  # the cache of attribute accuracy, beside the extractors' caches
FLAG_OF_EXTRACTOR = {"inception": "--inception-weights", "clip": "--clip-model"}


class ExtractionFailed(RuntimeError):
    """Feature actors kept dying; what was extracted is cached (exit code 1)."""


def make_extractor(name: str, kwargs: dict, device=None):
    """The `evals.features` extractor `name`; a missing or bad weights file is an InputError
    naming the flag that sets it."""
    from evals.features import get_extractor

    try:
        return get_extractor(name, device=device, **kwargs)
    except (FileNotFoundError, ValueError) as e:
        flag = FLAG_OF_EXTRACTOR.get(name, "--features")
        if name == "clip" and kwargs.get("clip_pretrained") is not None and kwargs.get("clip_dir") is None:
            flag = "--clip-pretrained"  # open_clip
        raise InputError(f"{flag}: {' '.join(str(e).split())}") from None


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
            attr[ok] = attribute_accuracy_or_nan(images, [p for p, good in zip(batch["prompt"], ok) if good])
            out[ATTRIBUTES] = attr
        return out


def extract_missing(shards: list[str], sample_ids: set[str], caches: dict[str, FeatureCache],
                    extractor_kwargs: dict, *, batch_size: int, pool_size: int | None,
                    progress: bool) -> tuple[int, dict[str, str]]:
    """Extract, for the rows `sample_ids` of the committed `shards`, what `caches` lacks (one
    cache per extractor name, and one named ATTRIBUTES for attribute accuracy). Returns (rows
    done, {sample_id: why} of rows whose image would not decode). Ray starts only when
    something is missing."""
    needed = {name: set(sample_ids) - cache.ids() for name, cache in caches.items()}
    missing = set().union(*needed.values()) if needed else set()
    if not missing:
        return 0, {}
    from tqdm import tqdm

    from jobs.raydata.session import init_ray

    ray = init_ray()  # also keeps Ray Data's INFO lines off the console
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actor_died = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)
    names = [n for n, ids in needed.items() if ids and n != ATTRIBUTES]
    done: set[str] = set()
    undecodable: dict[str, str] = {}
    with tqdm(total=len(missing), unit="img", desc="features", disable=not progress) as bar:
        for attempt in range(1, ACTOR_ATTEMPTS + 1):
            remaining = missing - done - set(undecodable)
            if not remaining:
                break
            actor_args = dict(names=names, kwargs=extractor_kwargs, attributes=bool(needed.get(ATTRIBUTES)),
                              wanted=remaining)
            ds = _feature_dataset(ray, shards, actor_args, batch_size, pool_size or max(1, gpus), gpus)
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    bar.update(_commit(batch, needed, caches, done, undecodable))
            except actor_died as e:
                left = len(missing - done - set(undecodable))
                if attempt == ACTOR_ATTEMPTS:
                    raise ExtractionFailed(f"feature actors died {ACTOR_ATTEMPTS} times ({type(e).__name__}: "
                                           f"{reason(e)}); {len(done)} images' features are cached, {left} are "
                                           "not: run the same command again to go on") from None
                tqdm.write(f"warning: a feature actor died ({type(e).__name__}); extracting the {left} images left "
                           f"again (pass {attempt + 1} of {ACTOR_ATTEMPTS})", file=sys.stderr)
    return len(done), undecodable


def _feature_dataset(ray, shards: list[str], actor_args: dict, batch_size: int, pool: int, gpus: int):
    """The shards' (sample_id, image, prompt) columns mapped through a pool of FeatureActors."""
    # The shards are named files: Ray's V1 Parquet reader takes them as they are. The V2 one
    # (Ray 2.60's default) lists them again in a ListFiles task whose work-stealing pool can
    # end with an uncaught InterruptedError in its completion thread, printed to the job's
    # stderr as a traceback (seen under load, the run itself unharmed).
    context = ray.data.DataContext.get_current()
    v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        ds = ray.data.read_parquet(shards, columns=["sample_id", "image", "prompt"])
    finally:
        context.use_datasource_v2 = v2
    # No actor restarts: Ray Data hands its actors their arguments through the object store,
    # which Ray reports as an error line for every restartable actor (ray-project/ray#57733).
    # A dead actor instead ends this pass, and the next pass does the rows still missing
    # (every finished batch is already in the cache). Ray 2.60 takes max_restarts only as a
    # deprecated free keyword; its deprecation warning would break the progress bar.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return ds.map_batches(
            FeatureActor,
            fn_constructor_kwargs=actor_args,
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=pool),
            num_gpus=1 if gpus else 0,
            max_restarts=0,
            max_task_retries=0,
        )


def _commit(batch: dict, needed: dict[str, set[str]], caches: dict[str, FeatureCache], done: set[str],
            undecodable: dict[str, str]) -> int:
    """Add one extracted batch to the caches that lacked its rows; note its undecodable rows.
    Returns the batch's row count (for the progress bar)."""
    ids = np.array([str(s) for s in batch["sample_id"]], dtype=object)
    good = np.asarray(batch["ok"], dtype=bool)
    for sid, why in zip(ids[~good], batch["decode_error"][~good]):
        undecodable[sid] = str(why)
    for name, cache in caches.items():
        if not needed[name]:
            continue
        sel = good & np.array([s in needed[name] for s in ids], dtype=bool)
        values = batch[ATTRIBUTES].reshape(-1, 1) if name == ATTRIBUTES else batch[f"feat_{name}"]
        cache.add(list(ids[sel]), values[sel])
    done.update(ids[good])
    return len(ids)
