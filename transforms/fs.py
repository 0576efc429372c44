"""Filesystem access for every URI a user can give.

fsspec rather than Beam's FileSystems: one API covers local paths, gs://, s3://
(including S3-compatible endpoints), http(s):// and memory://, with the same
file objects that pyarrow, gzip and zstandard read from. Beam's registry lacks
several of these schemes and per-store options such as a custom endpoint.
"""
from __future__ import annotations

import glob as _glob
import os
from typing import IO

import fsspec

from transforms.records import InputFile

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
    found = fs.glob(pattern, detail=True) if any(c in pattern for c in GLOB_CHARS) else {}
    if not found:
        path = fs._strip_protocol(pattern)
        if fs.isdir(path):
            found = fs.find(path, detail=True)
        elif fs.exists(path):
            found = {path: fs.info(path)}
    out = []
    for path, info in found.items():
        if info.get("type") == "directory":
            continue
        if "://" not in path:  # give URIs back in the form the user wrote them
            path = path.lstrip("/") if not pattern.split("://", 1)[1].startswith("/") else path
        uri = path if "://" in path else f"{protocol}://{path}"
        out.append(InputFile(uri, int(info.get("size") or 0), _change_token(info)))
    return sorted(out, key=lambda f: f.uri)


def open_binary(uri: str) -> IO[bytes]:
    """A seekable binary file object for reading."""
    if is_local(uri):
        return open(canonical(uri), "rb")
    return fsspec.open(uri, "rb").open()
