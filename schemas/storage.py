"""Where datasets live: atomic whole-file writes on local disks and object stores.

Credentials and endpoints come from the standard environment and fsspec's
configuration (AWS_ENDPOINT_URL_S3, STORAGE_EMULATOR_HOST, FSSPEC_S3_*, ...),
never from tokenmill's code. Transient failures are retried here, in one place.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
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
def local_atomic_path(path: str) -> Iterator[str]:
    """A temporary path beside local `path`: renamed to `path` when the block succeeds, else removed."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes_atomic(uri: str, data: bytes | memoryview | Any) -> None:
    """Write a whole file so that readers see either nothing or all of it.

    Locally: a temp file in the same folder, then rename. On object stores a
    single PUT already has that property.
    """
    fs, path = fsspec.core.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        with local_atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(data)
    else:
        payload = bytes(data)
        with_retries(lambda: fs.pipe_file(path, payload), f"writing {uri}")


def read_bytes(uri: str) -> bytes:
    def read() -> bytes:
        with fsspec.open(uri, "rb") as f:
            return f.read()

    return with_retries(read, f"reading {uri}")
