"""Local paths and s3:// URIs behind one small API, with atomic writes.

A reader never sees a half-written file: locally we write a temporary sibling and rename it
over the target; on S3 the object appears with a single PUT of the complete bytes.
S3 endpoint and region come from `StorageConfig` or the usual AWS variables
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), so MinIO and test servers work like AWS.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from functools import lru_cache
from pathlib import Path

import fsspec


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_s3(base):
        return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])
    return str(Path(base, *parts))


def s3_endpoint_and_region(storage=None) -> tuple[str | None, str | None]:
    """The S3 endpoint and region every S3 client here uses: `storage.s3_endpoint` / `s3_region` when
    set, else the usual AWS variables; None where neither says (the client's own default)."""
    endpoint = (getattr(storage, "s3_endpoint", None) or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL"))
    region = getattr(storage, "s3_region", None) or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    return endpoint, region


@lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str | None):
    import s3fs

    client_kwargs = {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    if region:
        client_kwargs["region_name"] = region
    # No listing cache: resume logic must see objects written by other processes.
    return s3fs.S3FileSystem(client_kwargs=client_kwargs, use_listings_cache=False, skip_instance_cache=True)


def filesystem(uri: str, storage=None):
    """(fsspec filesystem, path inside it) for a URI. `storage` is a StorageConfig or None."""
    uri = str(uri)
    if is_s3(uri):
        fs = _s3(*s3_endpoint_and_region(storage))
        return fs, uri[len("s3://"):]
    return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(uri))


def write_bytes(uri: str, data: bytes, storage=None) -> None:
    """Atomically write `data` to `uri` (temp + rename locally; one PUT on S3)."""
    fs, path = filesystem(uri, storage)
    if is_s3(uri):
        fs.pipe_file(path, data)
        return
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix="-" + os.path.basename(path), dir=parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs should be readable like any file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


TEMP_PREFIX = ".tmp-"


def remove_temp_files(uri: str, recursive: bool = True) -> int:
    """Delete the temporary siblings that writers killed mid-write left under a local `uri` (in it alone
    unless `recursive`); returns how many. Call it only when no writer of this output is running (S3 has
    none: a PUT is whole)."""
    if is_s3(uri):
        return 0
    removed = 0
    for root, dirs, files in os.walk(os.path.abspath(os.path.expanduser(str(uri)))):
        if not recursive:
            dirs.clear()
        for name in files:
            if name.startswith(TEMP_PREFIX):
                try:
                    os.unlink(os.path.join(root, name))
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


@lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(uri: str, text: str, storage=None) -> None:
    write_bytes(uri, text.encode("utf-8"), storage)


def read_bytes(uri: str, storage=None) -> bytes:
    fs, path = filesystem(uri, storage)
    return fs.cat_file(path)


def read_text(uri: str, storage=None) -> str:
    return read_bytes(uri, storage).decode("utf-8")


def exists(uri: str, storage=None) -> bool:
    fs, path = filesystem(uri, storage)
    return fs.exists(path)


def ensure_writable(uri: str, storage=None) -> None:
    """Fail early, with the URI in the message, when outputs could not be written there."""
    probe = join(uri, f".write-probe-{uuid.uuid4().hex}")
    try:
        write_bytes(probe, b"", storage)
        fs, path = filesystem(probe, storage)
        fs.rm_file(path)
    except Exception as exc:  # noqa: BLE001 - any failure means "not writable" to the user
        raise PermissionError(f"output location is not writable: {uri} ({type(exc).__name__}: {exc})") from None
