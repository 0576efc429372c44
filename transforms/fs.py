"""Filesystem access for every URI a user can give.

fsspec rather than Beam's FileSystems: one API covers local paths, gs://, s3://
(including S3-compatible endpoints), http(s):// and memory://, with the same
file objects that pyarrow, gzip and zstandard read from. Beam's registry lacks
several of these schemes and per-store options such as a custom endpoint.
"""
from __future__ import annotations

import glob as _glob
import os
from typing import IO, Any

import fsspec

from tokenmill.schemas.storage import with_retries
from tokenmill.transforms.records import InputFile

GLOB_CHARS = "*?["


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def canonical(uri: str) -> str:
    """Absolute local path, or the URI unchanged."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return os.path.abspath(uri) if is_local(uri) else uri


def _change_token(info: dict) -> str:
    for key in ("ETag", "etag", "md5Hash", "crc32c", "mtime", "LastModified", "updated", "created"):
        if info.get(key) is not None:
            return f"{key}={info[key]}"
    return ""


def match(pattern: str) -> list[InputFile]:
    """Files matching a glob (or one path/URI), sorted by URI. Directories are expanded."""
    if is_local(pattern):
        path = canonical(pattern)
        if os.path.isdir(path):
            path = os.path.join(path, "**")
        names = sorted(p for p in _glob.glob(path, recursive=True) if os.path.isfile(p))
        out = []
        for name in names:
            st = os.stat(name)
            out.append(InputFile(name, st.st_size, f"mtime={st.st_mtime_ns}"))
        return out
    fs, _ = fsspec.core.url_to_fs(pattern)
    protocol = pattern.split("://", 1)[0]
    found = with_retries(lambda: _list_remote(fs, pattern), f"listing {pattern}")
    out = []
    for path, info in found.items():
        if info.get("type") == "directory":
            continue
        if "://" not in path:  # give URIs back in the form the user wrote them
            path = path.lstrip("/") if not pattern.split("://", 1)[1].startswith("/") else path
        uri = path if "://" in path else f"{protocol}://{path}"
        out.append(InputFile(uri, int(info.get("size") or 0), _change_token(info)))
    return sorted(out, key=lambda f: f.uri)


def _list_remote(fs: fsspec.AbstractFileSystem, pattern: str) -> dict[str, dict]:
    fs.invalidate_cache()  # a retry must not see a listing cut short by the failure
    found = fs.glob(pattern, detail=True) if any(c in pattern for c in GLOB_CHARS) else {}
    if not found:
        path = fs._strip_protocol(pattern)
        if fs.isdir(path):
            found = fs.find(path, detail=True)
        elif fs.exists(path):
            found = {path: fs.info(path)}
    return found


def open_binary(uri: str) -> IO[bytes]:
    """A seekable binary file object for reading; remote reads survive transient failures."""
    if is_local(uri):
        return open(canonical(uri), "rb")
    return RetryingReader(uri)  # type: ignore[return-value]


class RetryingReader:
    """A remote file opened for reading whose reads are retried (schemas.storage.with_retries).

    fsspec's buffered files leave their position unchanged when a range request
    fails, so a failed read is tried again from the same offset. Other
    attributes pass through to the fsspec file.
    """

    def __init__(self, uri: str):
        self._uri = uri
        self._f = with_retries(lambda: fsspec.open(uri, "rb").open(), f"opening {uri}")

    def _retried(self, method: str, *args: Any) -> Any:
        pos = self._f.tell()

        def attempt() -> Any:
            self._f.seek(pos)
            return getattr(self._f, method)(*args)

        return with_retries(attempt, f"reading {self._uri}")

    def read(self, size: int = -1) -> bytes:
        return self._retried("read", size)

    def readline(self) -> bytes:  # fsspec's readline takes no size
        return self._retried("readline")

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> "RetryingReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()
