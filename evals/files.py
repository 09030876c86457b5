"""Files named by a local path or an object-store URI (s3://, gs://), through pyarrow's
filesystems, so that results, feature caches and reference statistics can live in a bucket.

pyarrow configures an object store the way boto does: AWS_ENDPOINT_URL, the credentials in
the environment (or the instance's role). A URI is never passed through pathlib (Path
would turn "s3://b/x" into "s3:/b/x"); names are joined as strings.

Writes are whole-or-nothing for a reader: a local file is written beside its target and
renamed into place; an object store's PUT is already all-or-nothing.
"""

from __future__ import annotations

import os
import uuid

import pyarrow.fs as pafs


def is_uri(path) -> bool:
    return "://" in str(path)


def resolve(path) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding `path` and the path within it."""
    path = str(path)
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def join(base, *names: str) -> str:
    """`base`/`names` as a string (a URI keeps its scheme)."""
    base = str(base)
    if not is_uri(base):
        return os.path.join(base, *names)
    return "/".join([base.rstrip("/"), *(n.strip("/") for n in names)])


def basename(path) -> str:
    path = str(path).rstrip("/")
    return path.rsplit("/", 1)[-1] if is_uri(path) else os.path.basename(path)


def as_uri(like, fs_path: str) -> str:
    """A path that `resolve` returned, as a name in the form of `like` (a URI or a local path)."""
    return f"{str(like).split('://', 1)[0]}://{fs_path}" if is_uri(like) else fs_path


def info(path) -> pafs.FileInfo:
    fs, p = resolve(path)
    return fs.get_file_info(p)


def is_file(path) -> bool:
    return info(path).type == pafs.FileType.File


def is_dir(path) -> bool:
    return info(path).type == pafs.FileType.Directory


def list_files(directory, recursive: bool = False) -> list[pafs.FileInfo]:
    """The files in `directory` ([] when it does not exist), sorted by path; their `.path`
    is within the filesystem (as_uri turns it back into a name like `directory`)."""
    fs, p = resolve(directory)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    found = fs.get_file_info(pafs.FileSelector(p, recursive=recursive))
    return sorted((i for i in found if i.type == pafs.FileType.File), key=lambda i: i.path)


def read_bytes(path) -> bytes:
    """The file's bytes; FileNotFoundError when there is none."""
    if not is_uri(path):
        with open(path, "rb") as f:
            return f.read()
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.File:
        raise FileNotFoundError(f"no such file: {path}")
    with fs.open_input_stream(p) as f:
        return f.read()


def write_bytes(path, data: bytes) -> None:
    """Replace the file with `data`, so that no reader ever sees part of it."""
    if not is_uri(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    fs, p = resolve(path)
    with fs.open_output_stream(p) as f:
        f.write(data)
