"""Command-line misuse: one clear line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import argparse
import contextlib
import re
import sys
from typing import Iterator, NoReturn, Sequence


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit code 2."""


class OneLineArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


@contextlib.contextmanager
def usage_errors(prog: str) -> Iterator[None]:
    try:
        yield
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


def verbose() -> bool:
    """--verbose (or TOKENMILL_DEBUG=1): show tracebacks and worker logs, not only the one line."""
    import os

    return bool(os.environ.get("TOKENMILL_VERBOSE") or os.environ.get("TOKENMILL_DEBUG"))


_EXCEPTION_LINE = re.compile(r"^(?P<cls>[A-Za-z_][\w.]*?(?:Error|Exception|Exit|Interrupt|Panic\w*|Failure|Timeout)): "
                             r"(?P<msg>.+)$")
_WHILE_RUNNING = re.compile(r"( \[while running '[^']*'\])+$")


def failure_line(exc: BaseException, job_messages: Sequence[str] = ()) -> str:
    """The one line that names why a command failed.

    Runners wrap a step's failure in their own exceptions whose text holds the
    worker's traceback. The cause is the innermost tokenmill error in that text
    (tokenmill raises what it means to say), else the innermost exception of
    any kind (a storage client's error, for example). Python prints a chain
    innermost first, so "innermost" is the first such line. A portable runner's
    exception holds no traceback: its job's error messages (`job_messages`) do,
    and are searched first.
    """
    import traceback

    text = "\n".join([*job_messages, "".join(traceback.format_exception(exc))])
    # A runner's wrapper whose message is the worker's traceback ("RuntimeError: Traceback (most recent call
    # last):", from worker processes) names nothing: the worker's own error follows in its text.
    found = [m for m in (_EXCEPTION_LINE.match(line.strip()) for line in text.splitlines())
             if m and not m["msg"].startswith("Traceback (most recent call last)")]
    ours = [m for m in found if m["cls"].startswith("tokenmill.")]
    if not ours and not found:
        first = (str(exc) or type(exc).__name__).strip().splitlines()
        return first[0][:500] if first else type(exc).__name__
    m = (ours or found)[0]
    message = _WHILE_RUNNING.sub("", m["msg"].strip())
    line = message if ours else f"{m['cls'].rsplit('.', 1)[-1]}: {message}"
    return line[:500]
