"""The reference set that FID and KID compare generated images against.

A `--reference` is an images directory, a results directory (its ok rows), a Parquet of
images (column 'image'), a statistics .npz, or 'embedded[:N]': N images rendered from the
embedded model's domain (default 1000). `Reference` checks the source without decoding
anything, so a bad one is refused before any feature work; `ReferencePlan` turns it into
statistics for one extractor, cached in the feature cache folder under a name that changes
when the source's files do.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from evals import files
from evals.decode import try_decode
from evals.feature_cache import cache_key
from evals.messages import listing, reason

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REFERENCE_FORMS = ("an images directory, a results directory, a .parquet of images, a stats .npz, "
                   "or 'embedded[:N]'")
EMBEDDED_SEED = 12345  # the rendered reference is the same set of images every time


class BadReference(ValueError):
    """A --reference that cannot be used; the message names it and what is allowed."""


def embedded_domain_size(source: str) -> int | None:
    """N for the rendered-domain forms, exactly 'embedded' (1000) or 'embedded:N'; None for
    anything else, which is a path (./embedded, embedded_refs/, embedded/x are directories)."""
    if source == "embedded":
        return 1000
    if not source.startswith("embedded:"):
        return None
    n = source.split(":", 1)[1]
    if not n.isdigit() or int(n) < 2:
        raise BadReference(f"--reference {source!r}: expected 'embedded' or 'embedded:N' with N >= 2 images")
    return int(n)


def safe_name(name: str) -> str:
    """A name that can be part of one file name in the cache folder (no separators, no '..')."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip(".")
    return name[:64] or "reference"


def _digest(parts) -> str:
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:10]


def _file_stamp(path) -> tuple:
    """What changes when the file does: its name, size and modification time."""
    if files.is_uri(path):
        i = files.info(path)
        return str(path), i.size, i.mtime_ns
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


class Reference:
    """A --reference source, checked without decoding anything, and its images (images():
    every file or row decoded, the undecodable ones named in one BadReference).

    `results_shards`: the committed shards of `source` when it is a results directory, as
    the caller's results store lists them (evals does not know the results layout); a
    directory without any is read as a directory of image files."""

    def __init__(self, source: str, results_shards: Sequence[str] = ()):
        self.source = source
        self.n = embedded_domain_size(source)
        self.files: list = []  # image files: Paths, or URIs on an object store
        self.shards: list[str] = []
        self.notes: list[str] = []
        path = Path(source)
        if self.n is not None:
            self.kind, self.name = "embedded", f"embedded-{self.n}"
            if path.exists():
                self.notes.append(f"--reference {source} means {self.n} rendered images of the embedded domain; "
                                  f"to use the directory of that name pass ./{source}")
        elif files.is_uri(source):
            self._remote(source, list(results_shards))
        elif source.endswith(".npz"):
            if not path.is_file():
                raise BadReference(f"--reference {source}: no such statistics file")
            self.kind, self.name = "npz", path.stem
        elif path.is_dir():
            self._directory(path, list(results_shards))
        elif path.suffix == ".parquet" and path.is_file():
            self.kind, self.name = "parquet", f"{safe_name(path.stem)}-{_digest([_file_stamp(path)])}"
        elif not path.exists():
            raise BadReference(f"--reference {source}: no such file or directory; expected {REFERENCE_FORMS}")
        else:
            raise BadReference(f"--reference {source!r}: expected {REFERENCE_FORMS}")

    def _remote(self, source: str, shards: list[str]) -> None:
        """The same forms on an object store (s3://, gs://), read through pyarrow."""
        try:
            kind = files.info(source).type
        except (OSError, ValueError) as e:
            raise BadReference(f"--reference {source}: cannot open ({reason(e)})") from None
        name = files.basename(source)
        if kind.name == "NotFound":
            raise BadReference(f"--reference {source}: no such file or directory; expected {REFERENCE_FORMS}")
        if source.endswith(".npz"):
            self.kind, self.name = "npz", name[:-len(".npz")]
        elif kind.name == "Directory":
            self._directory(source, shards)
        elif name.endswith(".parquet"):
            self.kind, self.name = "parquet", f"{safe_name(name[:-len('.parquet')])}-{_digest([_file_stamp(source)])}"
        else:
            raise BadReference(f"--reference {source!r}: expected {REFERENCE_FORMS}")

    def _image_files(self, path) -> list:
        """Image files under the directory, hidden ones (a dot in any part) left out."""
        if files.is_uri(path):
            root = files.resolve(path)[1].rstrip("/") + "/"
            found = [files.as_uri(path, i.path) for i in files.list_files(path, recursive=True)
                     if i.path.lower().endswith(IMAGE_SUFFIXES)
                     and not any(part.startswith(".") for part in i.path[len(root):].split("/"))]
            return sorted(found)
        return sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(path).parts))

    def _directory(self, path, shards: list[str]) -> None:
        """A results directory (its committed shards) or a directory of image files, named by
        the folder and a digest of its files, so changed files get new statistics."""
        if shards:
            self.kind, self.shards = "results", shards
            stamp = [_file_stamp(s) for s in shards]
        else:
            self.kind = "images"
            self.files = self._image_files(path)
            if not self.files:
                raise BadReference(f"--reference {self.source}: directory holds no images "
                                   f"({'/'.join(IMAGE_SUFFIXES)}) and no results shards")
            stamp = [_file_stamp(f) for f in self.files]
        base = files.basename(self.source) if files.is_uri(self.source) else Path(os.path.abspath(self.source)).name
        self.name = f"{safe_name(base)}-{_digest(stamp)}"

    def images(self) -> tuple[list[np.ndarray], list[str] | None]:
        """Images (and captions, when known)."""
        if self.kind == "embedded":
            from evals.shapes import render_captions, sample_captions

            captions = sample_captions(self.n, seed=EMBEDDED_SEED)
            return list(render_captions(captions, seed=EMBEDDED_SEED)), captions
        if self.kind == "npz":
            raise BadReference(f"--reference {self.source}: statistics, not images")
        if self.kind == "images":
            decoded = [try_decode(data) if data else (None, "empty file")
                       for data in (files.read_bytes(f) for f in self.files)]
            labels = [str(f) for f in self.files]
        else:
            decoded, labels = [], []
            for path in (self.shards if self.kind == "results" else [self.source]):
                more, more_labels = self._decode_parquet(path)
                decoded += more
                labels += more_labels
        bad = [f"{label} ({why})" for label, (im, why) in zip(labels, decoded) if im is None]
        if bad:
            raise BadReference(f"--reference {self.source}: {len(bad)} of {len(decoded)} images cannot be decoded: "
                               f"{listing(bad)}; remove or replace them")
        if len(decoded) < 2:
            raise BadReference(f"--reference {self.source}: {len(decoded)} image(s); FID needs at least 2")
        return [im for im, _ in decoded], None

    def _decode_parquet(self, path: str) -> tuple[list, list[str]]:
        """The decoded 'image' column of one Parquet file (only its ok rows when it is a results
        table), and a label per row for the error message."""
        try:
            fs, where = files.resolve(path)
            names = pq.read_schema(where, filesystem=fs).names
            table = pq.read_table(where, columns=[c for c in ("sample_id", "status", "image") if c in names],
                                  filesystem=fs)
        except (OSError, pa.ArrowException) as e:
            raise BadReference(f"--reference {self.source}: cannot read {path} ({reason(e)})") from None
        if "image" not in table.column_names:
            raise BadReference(f"--reference {self.source}: Parquet has no 'image' column of PNG/JPEG bytes")
        if "status" in table.column_names:  # a results table: its ok rows
            table = table.filter(pa.array([s == "ok" for s in table.column("status").to_pylist()]))
        base = files.basename(path)
        if "sample_id" in table.column_names:
            labels = [f"{base} sample_id {s}" for s in table.column("sample_id").to_pylist()]
        else:
            labels = [f"{base} row {i}" for i in range(table.num_rows)]
        return [try_decode(b) for b in table.column("image").to_pylist()], labels


class ReferencePlan:
    """Reference statistics for one extractor: read (a given .npz, or cached), or decoded up
    front, before any feature work, and computed once the generated features are in."""

    def __init__(self, ref: Reference, extractor, cache_dir: Path, description: dict | None = None):
        """`description`: everything that changes the extractor's features (feature_cache.feature_description),
        so cached statistics of another model version are never reused; the extractor's own describe() if None."""
        from evals.fid import check_compatible, load_stats

        self.ref, self.extractor, self.notes = ref, extractor, list(ref.notes)
        self.stats, self._images = None, None
        desc = description or extractor.describe()
        if ref.kind == "npz":
            try:
                self.stats = load_stats(ref.source)
                self.notes += check_compatible(self.stats, desc)
            except (ValueError, OSError) as e:
                raise BadReference(f"--reference {ref.source}: {reason(e)}") from None
            return
        name = f"ref-{ref.name}-{cache_key(desc)}.npz"
        if "/" in name or os.sep in name or name.startswith("."):  # safe_name makes this so
            raise BadReference(f"--reference {ref.source}: its name would leave the cache folder {cache_dir}")
        self.path = files.join(cache_dir, name)  # a local folder or an object-store URI
        if not files.is_file(self.path) and ref.kind != "embedded":
            self._images = ref.images()[0]

    def compute(self):
        """The reference's RefStats (computed and cached on first use)."""
        from evals.fid import reference_stats

        if self.stats is None:
            desc = self.extractor.describe()
            images = self._images
            self.stats = reference_stats(
                self.path, lambda: self.extractor(images if images is not None else self.ref.images()[0]),
                extractor=desc["extractor"], resize_mode=desc["resize_mode"], image_size=desc["image_size"])
            self._images = None
        return self.stats


def save_reference_stats(path: str, ref: Reference, extractor) -> int:
    """Write the statistics (and features, for KID) of the reference's images under
    `extractor` to `path`, a stats .npz usable as --reference. Returns the image count."""
    from evals.fid import feature_stats, save_stats

    images, _ = ref.images()
    feats = extractor(images)
    mu, sigma = feature_stats(feats)
    d = extractor.describe()
    save_stats(path, mu, sigma, feats.shape[0], d["extractor"], d["resize_mode"], d["image_size"], features=feats)
    return int(feats.shape[0])
