"""Live progress of a build: inputs done out of total, rows, tokens per second, errors and an ETA.

Beam's local runners report metrics only when the pipeline has finished, so
the writers leave one small JSON record per written block under
ROOT/.tokenmill-progress (transforms/write.py) and a thread of the launcher
polls them while the pipeline runs. The same works on any runner whose
workers can write to the output. On a terminal the progress is a tqdm bar;
otherwise (a log file, CI) it is a line every few seconds.

Progress is measured in input bytes. A block's bytes are those it read, after
decompression, so a compressed input runs ahead of its size on disk; each
input is therefore capped at its size, and counts as done only once it is.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, Mapping, TextIO

from tokenmill.schemas.storage import join
from tokenmill.transforms.write import PROGRESS_DIR

MODES = ("auto", "bar", "log", "none")


def human(n: float, unit: str = "B") -> str:
    """1234567 → '1.2 MB' (decimal prefixes)."""
    for prefix in ("", "k", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.1f} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
        n /= 1000
    return f"{n} {unit}"


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes} min {seconds:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class Totals:
    """What the progress records written so far add up to."""

    def __init__(self, inputs: Mapping[str, int]):
        self.sizes = dict(inputs)
        self.records: dict[str, dict[str, Any]] = {}

    def add(self, name: str, record: dict[str, Any]) -> None:
        self.records[name] = record  # a retried block replaces its record

    def _sum(self, key: str) -> int:
        return sum(int(r.get(key, 0)) for r in self.records.values())

    @property
    def rows(self) -> int:
        return self._sum("rows")

    @property
    def tokens(self) -> int:
        return self._sum("tokens")

    @property
    def errors(self) -> int:
        return self._sum("errors")

    def bytes_by_input(self) -> dict[str, int]:
        """Input bytes done per input, each capped at the input's size.

        A block of several small files (images) lists them in "sources": its bytes fill each in turn.
        """
        done: dict[str, int] = {}
        for r in self.records.values():
            left = int(r.get("input_bytes", 0))
            sources = r.get("sources") or [r["source"]]
            for i, uri in enumerate(sources):
                if uri not in self.sizes:
                    continue
                share = left if i == len(sources) - 1 else min(left, self.sizes[uri])
                done[uri] = done.get(uri, 0) + share
                left -= share
        return {uri: min(n, self.sizes[uri]) for uri, n in done.items()}

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())

    @property
    def done_bytes(self) -> int:
        return sum(self.bytes_by_input().values())

    @property
    def inputs_done(self) -> int:
        return sum(1 for uri, n in self.bytes_by_input().items() if n >= self.sizes[uri])

    def line(self, elapsed: float, finished: bool = False) -> str:
        """One progress line, e.g. for a log."""
        total, done = self.total_bytes, self.done_bytes
        if finished:
            done = total
        fraction = done / total if total else 1.0
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        parts = [f"{fraction:4.0%} of {human(total, 'B')}",
                 f"inputs {len(self.sizes) if finished else self.inputs_done}/{len(self.sizes)}",
                 f"rows {self.rows}", f"tokens {self.tokens} ({human(rate, 'tokens/s')})",
                 f"errors {self.errors}"]
        if finished:
            parts.append(f"done in {_duration(elapsed)}")
        elif 0 < fraction < 1:
            parts.append(f"ETA {_duration(elapsed * (1 - fraction) / fraction)}")
        else:
            parts.append("ETA unknown" if fraction == 0 else "finishing")
        return ", ".join(parts)


class BuildProgress:
    """Context manager around a running build: shows progress until the block ends.

    mode: bar (tqdm), log (a line every `every` seconds), none, or auto (bar on
    a terminal, else log).
    """

    def __init__(self, root: str, inputs: Mapping[str, int], *, mode: str = "auto", every: float = 10.0,
                 stream: TextIO | None = None, prog: str = "tokenmill build"):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "log"
        self.root, self.mode, self.every, self.prog = root, mode, every, prog
        self.totals = Totals(inputs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None
        self._start = 0.0
        self.failed_polls = 0  # reads of the output that raised (a storage outage, say); each was skipped
        self.last_failure = ""

    # -- reading records ------------------------------------------------------
    def _fs(self):
        import fsspec

        return fsspec.core.url_to_fs(join(self.root, PROGRESS_DIR))

    def poll(self) -> None:
        """Read progress records not seen yet.

        Never raises: the progress display must not decide a build's outcome.
        A poll that fails in any way (a storage client's own exception types
        during an outage, not only OSError) is counted and skipped; the next
        poll reads what it missed.
        """
        try:
            fsys, path = self._fs()
            fsys.invalidate_cache(path)  # s3fs/gcsfs keep listings: a cached one hides the records written since
            try:
                names = fsys.glob(join(path, "*.json"))
            except FileNotFoundError:
                return
            for name in names:
                if name in self.totals.records:
                    continue
                try:
                    self.totals.add(name, json.loads(fsys.cat_file(name)))
                except (FileNotFoundError, ValueError):  # gone or half-visible: read it on the next poll
                    continue
        except Exception as e:
            self._failed(e)

    def _failed(self, e: Exception) -> None:
        self.failed_polls += 1
        first = (str(e).strip().splitlines() or [""])[0]
        self.last_failure = f"{type(e).__name__}: {first}"[:300]

    def _clear(self) -> None:
        try:
            fsys, path = self._fs()
            if fsys.exists(path):
                fsys.rm(path, recursive=True)
        except Exception as e:  # leftovers are cleared by the next build; never fail this one for them
            self._failed(e)

    # -- showing it -----------------------------------------------------------
    def _show(self, finished: bool = False) -> None:
        elapsed = time.perf_counter() - self._start
        t = self.totals
        if self._bar is not None:
            self._bar.n = t.total_bytes if finished else t.done_bytes
            rate = t.tokens / elapsed if elapsed > 0 else 0.0
            self._bar.set_postfix_str(f"inputs {len(t.sizes) if finished else t.inputs_done}/{len(t.sizes)}, "
                                      f"rows {t.rows}, {human(rate, 'tok/s')}, errors {t.errors}",
                                      refresh=False)
            self._bar.refresh()
        elif self.mode == "log":
            print(f"{self.prog}: progress: {t.line(elapsed, finished)}", file=self.stream, flush=True)

    def _loop(self) -> None:
        interval = min(self.every, 0.5) if self.mode == "bar" else self.every
        while not self._stop.wait(interval):
            self.poll()
            try:
                self._show()
            except Exception as e:  # a closed stream, say: the build goes on without a display
                self._failed(e)

    def __enter__(self) -> "BuildProgress":
        self._start = time.perf_counter()
        self._clear()  # records of an earlier, crashed build
        if self.mode == "none":
            return self
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=self.totals.total_bytes, unit="B", unit_scale=True, desc=self.prog,
                             file=self.stream, dynamic_ncols=True)
        self._thread = threading.Thread(target=self._loop, name="tokenmill-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.mode != "none":
            self.poll()
            try:
                self._show(finished=exc_type is None and self.succeeded)
            except Exception as e:
                self._failed(e)
        if self._bar is not None:
            self._bar.close()
        self._clear()
        # After a failed build its one line names the cause (an outage, often the same one): no second line.
        if self.failed_polls and self.mode != "none" and exc_type is None and self.succeeded:
            print(f"{self.prog}: progress: {self.failed_polls} read(s) of the output for progress failed and were "
                  f"skipped (last: {self.last_failure}); the build's own outcome stands", file=self.stream, flush=True)

    succeeded = True  # the caller sets False when the run failed, so the last line is not "done"
