"""One block in flight: a DoFn's heavy step on a helper thread, overlapping the next element's work.

Why our own: Beam runs a DoFn's elements one after another on one thread, and
a fused stage (decode → tokenize → write) would leave a spare core idle. Work
that releases the GIL (image decoding, Parquet compression and hashing) goes
to a helper thread here while the bundle's thread carries on with the block
before; at most one block waits in the helper, so memory stays bounded by
two blocks. Results come back on the bundle's thread, in order, so Beam's
metrics (kept per thread) and outputs stay where Beam expects them; the last
one at finish_bundle.

Used by WriteTokenShards (transforms/write.py) and DecodeImages
(transforms/decoders/images.py). Video decoding keeps several videos and
clips ahead under a deadline instead (decoders/video.py, ConcurrentVideos).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class OneAhead(Generic[T]):
    """fn(item) on one helper thread, one item ahead: `push` starts an item and yields the one before."""

    def __init__(self, fn: Callable[[Any], T], name: str, *, drain_first: bool = False):
        """`drain_first`: finish the item before starting the next (a writer, so that nothing of a
        failed bundle is still being written when Beam retries it); else start it first (a decoder)."""
        self._fn, self._name, self._drain_first = fn, name, drain_first
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[Any, Future] | None = None

    def start(self) -> None:
        """From DoFn.setup."""
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=self._name)

    def reset(self) -> None:
        """From DoFn.start_bundle: nothing of a failed bundle is handed on."""
        self._pending = None

    def push(self, item: Any) -> Iterator[tuple[Any, T]]:
        """Start `item`; yield (item, result) of the one before it, if any (its exception is raised here)."""
        if self._drain_first:
            yield from self.drain()
        future = self._pool.submit(self._fn, item)
        yield from self.drain()
        self._pending = (item, future)

    def drain(self) -> Iterator[tuple[Any, T]]:
        """(item, result) of the item in flight, if any: from finish_bundle, or before the next push."""
        if self._pending is not None:
            item, future = self._pending
            self._pending = None
            yield item, future.result()

    def stop(self, wait: bool = True) -> None:
        """From DoFn.teardown."""
        if self._pool is not None:
            self._pool.shutdown(wait=wait)
