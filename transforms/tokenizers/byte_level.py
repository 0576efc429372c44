"""UTF-8 byte-level tokens: ID = byte value. The character-precise baseline.

IDs 0-255 are bytes; 256 is `<|endoftext|>` (EOS) and 257 is `<|bos|>`.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tokenmill.transforms.tokenizers.base import TextTokenizer

ENDOFTEXT = "<|endoftext|>"
BOS = "<|bos|>"


class ByteTokenizer(TextTokenizer):
    name = "bytes"
    special_tokens = {ENDOFTEXT: 256, BOS: 257}
    vocab_size = 258
    bos_token = BOS
    eos_token = ENDOFTEXT

    def _identity(self) -> dict[str, Any]:
        return {"family": "bytes", "encoding": "utf-8", "version": 1,
                "special_tokens": self.special_tokens}

    def _encode(self, text: str) -> np.ndarray:
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates become U+FFFD, as tiktoken does
            data = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")
        return np.frombuffer(data, dtype=np.uint8)

    def decode(self, ids: Sequence[int]) -> str:
        names = {v: k for k, v in self.special_tokens.items()}
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", "replace"))
            run = bytearray()
            out.append(names[i])
        out.append(run.decode("utf-8", "replace"))
        return "".join(out)

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id]) if token_id < 256 else self.decode([token_id]).encode()


def load(spec: str, arg: str, modality: str, *, bos: bool = False, eos: bool = False) -> "ByteTokenizer":
    return ByteTokenizer(spec, bos=bos, eos=eos)


def _family():
    from tokenmill.transforms.registry import TokenizerFamily
    from tokenmill.transforms.tokenizers.base import text_policy_options

    return TokenizerFamily("bytes", ("text",), ("bytes",), loader=f"{__name__}:load",
                           options=text_policy_options(), bare=True)


FAMILY = _family()
