"""BPE engines for tiktoken vocabularies: tiktoken itself (the reference) or a faster one.

An engine must give tiktoken's IDs for every input; speed claims mean nothing
without that. So a non-reference engine is checked twice:

- when it is loaded, on a differential corpus (tiktoken's published cl100k
  vectors, its catastrophically repetitive strings, long whitespace and digit
  runs, mixed scripts); any difference refuses the engine for the build;
- while it runs, every CHECK_EVERY-th document is also encoded by tiktoken; a
  difference raises EngineMismatchError, which stops the build (no manifest is
  written). It never falls back to the reference silently.

The engine does not enter the tokenizer fingerprint (IDs are the same), but
the dataset metadata records which one ran.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from tokenmill.transforms.tokenizers.base import FatalTokenizerError

CHECK_EVERY = 64


class EngineMismatchError(FatalTokenizerError):
    """A BPE engine produced IDs that differ from tiktoken's: the build must stop."""


def _repetitive() -> list[str]:
    out = []
    for c in ["^", "0", "a", "'s", " ", "\n"]:
        big = c * 10_000
        out += [big, " " + big, " " + big + "\n"]
    return out


# Inputs every engine must encode exactly as tiktoken does.
DIFFERENTIAL_CORPUS = [
    "hello world", "rer", "'rer", "today\n ", "today\n \n", "today\n  \n", " \x850", "👍",
    "\ud83d\udc4d", "\ud83d", "", " ", "\n\n\n", "hello <|endoftext|>", "请考试我的软件！12345",
    " " * 50_000 + "x", "x" + " " * 50_000, "1" * 10_000 + "a", "\t" * 5_000 + "\r\n" * 5_000,
    "Ünïcödé mïxed ℕ𝕠𝕥𝕙𝕚𝕟𝕘 ﷽ 𝔸 العربية 한국어 हिन्दी Ελληνικά",
    ".DefaultCellStyle" * 100, "'s'S'll'LL've're" * 500,
    *_repetitive(),
]


class BpeOpenAIEngine:
    """GitHub's `bpe` crate through the bpe-openai bindings (extra: tokenmill[fast])."""

    name = "bpe-openai"
    SUPPORTED = ("cl100k_base", "o200k_base")

    def __init__(self, encoding_name: str):
        if encoding_name not in self.SUPPORTED:
            raise ValueError(f"engine bpe-openai supports {', '.join(self.SUPPORTED)}, not {encoding_name}")
        try:
            # The compiled bindings directly: the Python wrapper refuses inputs
            # of a million characters or more and adds per-call bookkeeping.
            from bpe_openai import _bindings
        except ImportError as e:
            raise ValueError("engine bpe-openai needs the extra: pip install 'tokenmill[fast]'") from e
        self._tok = _bindings.tokenizer_for_encoding(encoding_name)

    def encode(self, text: str) -> np.ndarray:
        try:
            ids = self._tok.encode(text)
        except UnicodeEncodeError:  # lone surrogates: tiktoken's repair
            ids = self._tok.encode(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))
        return np.array(ids, dtype=np.uint32)


# Engines other than the reference, by CLI name: each is a class taking the encoding name.
ENGINE_FACTORIES: dict[str, Callable[[str], object]] = {"bpe-openai": BpeOpenAIEngine}


def engine_names() -> tuple[str, ...]:
    return ("tiktoken", *ENGINE_FACTORIES)


def load_engine(name: str, encoding_name: str):
    if name not in ENGINE_FACTORIES:
        raise ValueError(f"unknown engine {name!r}: choose one of {', '.join(engine_names())}")
    return ENGINE_FACTORIES[name](encoding_name)


def first_difference(encode: Callable[[str], np.ndarray], reference: Callable[[str], np.ndarray],
                     texts: list[str]) -> str | None:
    """A description of the first text on which two encoders differ, or None."""
    for text in texts:
        a, b = encode(text), reference(text)
        if not np.array_equal(a, b):
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return (f"{len(text)}-character input {text[:30]!r}...: {len(a)} tokens vs tiktoken's {len(b)}, "
                    f"first difference at token {at}")
    return None
