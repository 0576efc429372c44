"""Command-line misuse: one clear line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Iterator, NoReturn


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
