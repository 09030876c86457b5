"""Reading a manifest: a Parquet file, a directory of them, or an object-store URI.

Only reading lives here; what a valid manifest is lives in schema.py.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.errors import InputError

PARQUET_MAGIC = b"PAR1"
# The environment variables pyarrow's S3 filesystem (and boto) read: where the store is and
# who we are. Workers that write to the store get the driver's values (object_store_env).
OBJECT_STORE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                    "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED")


def filesystem_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem for a local path or s3://, gs://, hdfs:// URI."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    import os

    return pafs.LocalFileSystem(), os.path.abspath(uri)


def object_store_env(uri: str) -> dict[str, str]:
    """The driver's object-store settings (OBJECT_STORE_ENV that are set) for processes that
    write `uri` on its behalf, so they write where the driver reads; {} for a local path. A
    worker node's own settings would do too, but a job run by hand on a cluster (RAY_ADDRESS)
    has them only in the driver's shell."""
    import os

    if "://" not in uri:
        return {}
    return {k: os.environ[k] for k in OBJECT_STORE_ENV if k in os.environ}


def read_manifest(uri: str) -> pa.Table:
    """The whole manifest as one table. Errors name the file and what was expected."""
    try:
        fs, path = filesystem_and_path(uri)
        info = fs.get_file_info(path)
    except (OSError, pa.ArrowException, ValueError) as e:
        raise _error(uri, f"cannot open: {e}") from None
    if info.type == pafs.FileType.NotFound:
        raise _error(uri, "no such file or directory")
    if info.type == pafs.FileType.Directory:
        files = sorted(
            f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
            if f.type == pafs.FileType.File and f.base_name.endswith(".parquet") and not f.base_name.startswith((".", "_"))
        )
        if not files:
            raise _error(uri, "directory holds no *.parquet files")
    else:
        files = [path]
    for f in files:
        _check_magic(fs, f)
    try:
        if len(files) == 1:
            return pq.read_table(files[0], filesystem=fs)
        schemas = {f: pq.read_schema(f, filesystem=fs) for f in files}
        first = files[0]
        for f, schema in schemas.items():
            if not schema.equals(schemas[first]):
                diff = sorted(set(map(str, schema)) ^ set(map(str, schemas[first])))
                raise _error(uri, f"files have different schemas: {f} vs {first} differ in {diff}")
        return pds.dataset(files, filesystem=fs, format="parquet").to_table()
    except InputError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise _error(uri, f"cannot read Parquet: {str(e).splitlines()[0]}") from None


def _check_magic(fs: pafs.FileSystem, path: str) -> None:
    with fs.open_input_file(path) as f:
        size = f.size()
        head = f.read(4)
        f.seek(max(0, size - 4))
        tail = f.read(4)
    if size < 12 or head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
        hint = " (it looks like CSV or other text)" if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head) else ""
        raise _error(path, f"not a Parquet file{hint}; write manifests with pandas.DataFrame.to_parquet or jobs/make_manifest.py")


def _error(uri: str, message: str) -> InputError:
    return InputError(f"manifest {uri}: {message}")
