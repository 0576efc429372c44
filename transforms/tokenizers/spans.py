"""Where each token of a document lies: byte spans that tile its UTF-8, from offsets or token bytes.

Pure functions over bytes and integer offsets, shared by the text tokenizers'
`token_spans` (see base.TextTokenizer). A span is (start, end) in bytes of
`utf8(text)`; spans tile the document when the first starts at 0, each starts
where the one before ended and the last ends at the end, so that their bytes
joined are the document, byte for byte.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

Span = tuple[int, int]


def utf8(text: str) -> bytes:
    """The document's bytes, which spans index. Lone surrogates take their 3-byte form (surrogatepass):
    a tokenizer that repairs them to U+FFFD (tiktoken, bytes) also takes 3 bytes."""
    return text.encode("utf-8", "surrogatepass")


def char_offsets(text: str) -> np.ndarray:
    """byte offset of every character index of `text`, and of its end: (len(text) + 1,) int64."""
    code = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    sizes = 1 + (code >= 0x80) + (code >= 0x800) + (code >= 0x10000)
    out = np.zeros(len(code) + 1, dtype=np.int64)
    np.cumsum(sizes, out=out[1:])
    return out


def spans_of_pieces(data: bytes, pieces: Sequence[bytes]) -> list[Span] | None:
    """Consecutive spans of `pieces` when they join to `data` exactly (tiktoken, bytes, byte-level BPE), else None."""
    if sum(map(len, pieces)) != len(data) or b"".join(pieces) != data:
        return None
    ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
    return [(int(e) - len(p), int(e)) for p, e in zip(pieces, ends, strict=True)]


def spans_by_search(data: bytes, pieces: Sequence[bytes]) -> list[Span]:
    """Each piece looked for in `data` from where the one before ended (empty where it is not found), tiled."""
    raw, pos = [], 0
    for p in pieces:
        at = data.find(p, pos) if p else -1
        raw.append((at, at + len(p)) if at >= 0 else (pos, pos))
        pos = raw[-1][1]
    return refine(tile(raw, len(data)), pieces, data)


def tile(raw: Sequence[Span], size: int) -> list[Span]:
    """Spans that tile [0, size), from a tokenizer's own (start, end) per token, in token order.

    Each token starts where the previous ended and ends at its own end, but not
    past where the next token starts: text a tokenizer skipped (whitespace
    between WordPiece words, spaces SentencePiece collapsed) belongs to the
    token after it, text after the last token to the last, and text two tokens
    claim (a prepended ▁ offset onto the first character, one character cut
    into byte tokens) to the later one; `refine` cuts a character back into
    its bytes.
    """
    out: list[Span] = []
    prev = 0
    for k, (_, end) in enumerate(raw):  # a token's own start only matters as the previous one's limit
        if k + 1 < len(raw):
            end = min(end, raw[k + 1][0])
        end = min(max(end, prev), size)
        out.append((prev, end))
        prev = end
    if out:
        out[-1] = (out[-1][0], size)
    return out


def refine(spans: list[Span], pieces: Sequence[bytes], data: bytes) -> list[Span]:
    """Cut a span held by one token for the empty tokens before it, where their bytes spell its end.

    A character split into byte tokens (`<0xE4>` `<0xB8>` `<0xAD>`, or
    byte-level BPE) comes from offsets as one span on the last of them; when
    the last tokens' own bytes join to the end of that span, each gets its bytes
    (the first of them also any skipped text before), so a boundary inside the
    character shows as such.
    """
    out = list(spans)
    k = 0
    while k < len(out):
        if out[k][0] != out[k][1]:
            k += 1
            continue
        j = k
        while j < len(out) and out[j][0] == out[j][1]:
            j += 1
        if j < len(out):
            start, end = out[j]
            for first in range(k, j):  # the longest run of them whose bytes end the span
                joined = b"".join(pieces[first:j + 1])
                if len(joined) <= end - start and data[end - len(joined):end] == joined:
                    pos = end - len(joined)
                    for m in range(first, j + 1):
                        out[m] = (start if m == first else pos, pos + len(pieces[m]))
                        pos = out[m][1]
                    break
        k = j + 1
    return out
