"""A tokenizer family in one file: `codepoints`, one token per Unicode code point.

The worked example of docs/architecture.md ("Adding a tokenizer"). Registered
with one line in transforms/registry.py FAMILIES:

    "codepoints": "tests.plugins.codepoints:FAMILY",

(tests register it with monkeypatch instead).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tokenmill.transforms.registry import TokenizerFamily
from tokenmill.transforms.tokenizers.base import TextTokenizer, text_policy_options

EOS = "<|endoftext|>"


class CodepointTokenizer(TextTokenizer):
    name = "codepoints"
    special_tokens = {EOS: 0x110000}
    vocab_size = 0x110001
    eos_token = EOS

    def _identity(self) -> dict[str, Any]:
        return {"family": "codepoints", "version": 1, "special_tokens": self.special_tokens}

    def _encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(EOS if i == 0x110000 else chr(i) for i in map(int, ids))


def load(spec: str, arg: str, modality: str, *, bos: bool = False, eos: bool = False) -> CodepointTokenizer:
    return CodepointTokenizer(spec, bos=bos, eos=eos)


FAMILY = TokenizerFamily("codepoints", ("text",), ("codepoints",), loader=f"{__name__}:load",
                         options=text_policy_options(), bare=True)


class PickyCodepointTokenizer(CodepointTokenizer):
    """codepoints that refuses any document holding a skull (☠): a tokenizer that rejects some records."""

    name = "picky-codepoints"

    def _encode(self, text: str) -> np.ndarray:
        if "☠" in text:
            raise ValueError("no skulls")
        return super()._encode(text)


def load_picky(spec: str, arg: str, modality: str, *, bos: bool = False, eos: bool = False) -> CodepointTokenizer:
    return PickyCodepointTokenizer(spec, bos=bos, eos=eos)


PICKY_FAMILY = TokenizerFamily("picky", ("text",), ("picky",), loader=f"{__name__}:load_picky",
                               options=text_policy_options(), bare=True)
