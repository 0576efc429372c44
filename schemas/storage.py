"""Where datasets live: atomic whole-file writes on local disks and object stores.

Credentials and endpoints come from the standard environment and fsspec's
configuration (AWS_ENDPOINT_URL_S3, STORAGE_EMULATOR_HOST, FSSPEC_S3_*, ...),
never from tokenmill's code. Transient failures are retried here, in one place.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import logging
import mmap
import os
import random
import threading
import time
import uuid
from typing import Any, Callable, Iterator, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem


_LOG = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_ATTEMPTS = 7
RETRY_FIRST_DELAY_S = 0.25
RETRY_MAX_DELAY_S = 8.0
# Matched by class name: the storage libraries (botocore, aiohttp, gcsfs) are
# optional, and importing them here would load them into every process.
_TRANSIENT_NAMES = frozenset({
    "EndpointConnectionError", "ConnectionClosedError", "ConnectTimeoutError", "ReadTimeoutError",
    "ResponseStreamingError", "IncompleteReadError", "ClientConnectionError", "ServerDisconnectedError",
    "ClientPayloadError", "FSTimeoutError", "RetryError", "TransportError",
})
_THROTTLING_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                               "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable"})
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        if response.get("Error", {}).get("Code") in _THROTTLING_CODES:
            return 503
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = getattr(exc, "code", None)  # gcsfs HttpError, google.api_core errors
    return code if isinstance(code, int) and 100 <= code < 600 else None


def is_transient(exc: BaseException) -> bool:
    """Whether another try may succeed: dropped or refused connections, timeouts, throttling, 5xx."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, _PERMANENT):
            return False
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        status = _http_status(exc)
        if status is not None:
            return status in (408, 429) or status >= 500
        if any(c.__name__ in _TRANSIENT_NAMES for c in type(exc).__mro__):
            return True
        exc = exc.__cause__ or exc.__context__  # s3fs wraps botocore errors in OSError
    return False


def with_retries(call: Callable[[], T], what: str, *, attempts: int = RETRY_ATTEMPTS,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """`call()`, tried again after transient failures with exponential backoff and jitter.

    Delays grow 0.25, 0.5, 1, 2, 4, 8 s (times 0.5 to 1): about 16 s of outage at
    most is bridged before the error reaches the caller. Written here rather than
    taken from Beam (apache_beam.utils.retry) because schemas/ and the training
    reader must not import Beam.
    """
    for attempt in range(attempts):
        try:
            return call()
        except Exception as e:
            if attempt == attempts - 1 or not is_transient(e):
                raise
            delay = min(RETRY_MAX_DELAY_S, RETRY_FIRST_DELAY_S * 2 ** attempt) * random.uniform(0.5, 1.0)
            _LOG.warning("tokenmill: %s failed (%s: %s); retrying in %.1f s", what, type(e).__name__, e, delay)
            sleep(delay)
    raise AssertionError("unreachable")


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


@contextlib.contextmanager
def local_atomic_path(path: str, durable: bool = False) -> Iterator[str]:
    """A temporary path beside local `path`: renamed to `path` when the block succeeds, else removed.

    `durable`: the file's bytes are fsynced before the rename and the folder
    after it, so that after a power loss `path` is absent or whole (manifests;
    data shards are made durable together at the commit: sync_filesystem).
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)  # fsync through any descriptor flushes the file's dirty pages
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
        if durable:
            _fsync_folder(os.path.dirname(path))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# O_DIRECT needs file offsets, lengths and memory aligned to the device's logical
# block: 4096 covers 512-byte and 4K devices.
DIRECT_ALIGN = 4096
_DIRECT_CHUNK = 64 << 20


class RenderBuffer:
    """Page-aligned memory that a file is rendered into before it is written, reused call after call.

    One per thread (`local_render_buffer`): a shard of patch pixels is tens of
    MB, and fresh memory for each costs a page fault per page. Its spare room
    past the file lets the last O_DIRECT write be padded in place.
    """

    GRANULE = 4 << 20

    def __init__(self):
        self._map: mmap.mmap | None = None

    def reserve(self, nbytes: int) -> memoryview:
        """Writable memory of at least nbytes (contents undefined), valid until the next reserve()."""
        if self._map is None or len(self._map) < nbytes:
            size = -(-nbytes // self.GRANULE) * self.GRANULE
            self._map = mmap.mmap(-1, size)  # the old map goes once nothing refers to it
        return memoryview(self._map)


_RENDER = threading.local()


def local_render_buffer() -> RenderBuffer:
    if not hasattr(_RENDER, "buffer"):
        _RENDER.buffer = RenderBuffer()
    return _RENDER.buffer


def write_file_direct(path: str, view: memoryview, size: int) -> bool:
    """Write the first `size` bytes of page-aligned `view` to a new local file with O_DIRECT.

    Why: shards are written once and not read back by the build, so the page
    cache only costs here: copying into it, and finding a free page for every
    4 KiB (on VMs whose freed memory goes back to the host, each one a
    hypervisor fault; measured on this project's machines: 1.8 GB took 4.4 s
    of system time buffered, 0.23 s direct). `view` must have room for `size`
    rounded up to DIRECT_ALIGN: the tail is zero-padded in place and the file
    truncated back to `size`. Returns False, having written nothing that
    stays, where the platform or filesystem refuses O_DIRECT (tmpfs before
    Linux 6.6, some FUSE and network filesystems); the caller then writes it the usual way.
    """
    flag = getattr(os, "O_DIRECT", 0)
    padded = -(-size // DIRECT_ALIGN) * DIRECT_ALIGN
    if not flag or len(view) < padded:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    try:
        view[size:padded] = bytes(padded - size)
        done = 0
        while done < padded:
            n = os.write(fd, view[done:min(padded, done + _DIRECT_CHUNK)])
            if n <= 0 or n % DIRECT_ALIGN:
                return False  # a short, unaligned write: the caller rewrites the file
            done += n
        os.ftruncate(fd, size)
        return True
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return False  # an alignment the device will not take: the caller rewrites the file
    finally:
        os.close(fd)


def write_bytes_atomic(uri: str, data: bytes | memoryview | Any, durable: bool = True) -> None:
    """Write a whole file so that readers see either nothing or all of it.

    Locally: a temp file in the same folder, then rename. On object stores a
    single PUT already has that property. `durable=False` skips the two fsyncs
    (the rename stays atomic to readers) for files that a crash may lose, such
    as progress records: on this VM an fsynced small file cost 1.7 ms to write
    and 0.3 ms to delete, against 0.07 and 0.02 ms.
    """
    fs, path = fsspec.core.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        # Write, fsync, rename, fsync the folder: after a crash the file is the old one or the whole new one.
        with local_atomic_path(path, durable=durable) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
    else:
        payload = bytes(data)
        with_retries(lambda: fs.pipe_file(path, payload), f"writing {uri}")


def sync_filesystem(uri: str) -> None:
    """Make every file written so far on local `uri`'s filesystem durable, in one call, before a commit names them.

    Data shards are written by workers without an fsync each: on this VM a build
    of 10,000 one-document files took 59-63 s with a file and a folder fsync per
    shard, against 36-40 s without. One syncfs(2) of the dataset's filesystem
    at the commit flushes them all (and their renames): 0.03-0.05 s there.
    Linux has syncfs; elsewhere os.sync() flushes every filesystem. Object
    stores need nothing: a completed PUT is stored.
    """
    fs, path = fsspec.core.url_to_fs(uri)
    if not isinstance(fs, LocalFileSystem):
        return
    syncfs = getattr(_libc(), "syncfs", None)
    if syncfs is None:
        os.sync()
        return
    fd = os.open(path if os.path.isdir(path) else os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            os.sync()  # the call failed (errno in ctypes); the whole-machine sync is the fallback
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library's symbols (the running program's, as dlopen(NULL) gives them), or None where none load."""
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _fsync_folder(folder: str) -> None:
    """Make a rename in `folder` durable, where the filesystem lets a folder be opened and synced."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def read_bytes(uri: str) -> bytes:
    def read() -> bytes:
        with fsspec.open(uri, "rb") as f:
            return f.read()

    return with_retries(read, f"reading {uri}")
