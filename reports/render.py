"""Tokens turned back into what a person reads: text pieces, code grids, images and contact sheets.

Pure functions over numpy arrays and bytes; no I/O.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


SPLIT = "¦"  # a token boundary inside a character


@dataclasses.dataclass(frozen=True)
class Piece:
    """One token's part of a document, as a person reads it."""

    text: str  # its whole characters as they are; bytes of a character it shares with a neighbour as \xNN
    chars: int  # the characters it completes: over a document they add up to the document's length
    nbytes: int
    starts_inside: bool  # it begins inside a character (byte-level BPE, byte fallback)
    ends_inside: bool


def describe_pieces(token_bytes: Sequence[bytes]) -> list[Piece]:
    """Each token's bytes (a tokenizer's `token_pieces`) placed in the document they join to.

    A character split across tokens is shown, in each, as the bytes it holds
    (`\\xe4\\xb8`), and counted once, by the token that completes it; bytes that
    are not UTF-8 at all are shown the same way.
    """
    data = b"".join(token_bytes)
    bounds = [0]  # where each character starts, then the end
    readable: list[str] = []
    for ch in data.decode("utf-8", "surrogateescape"):
        undecodable = 0xDC80 <= ord(ch) <= 0xDCFF
        readable.append(f"\\x{ord(ch) - 0xDC00:02x}" if undecodable else ch)
        bounds.append(bounds[-1] + (1 if undecodable else len(ch.encode("utf-8"))))
    out: list[Piece] = []
    k = 0  # the character holding the token's first byte
    start = 0
    for raw in token_bytes:
        end = start + len(raw)
        text, chars, last = [], 0, k
        for c in range(k, len(readable)):
            if bounds[c] >= end:
                break
            lo, hi = bounds[c], bounds[c + 1]
            whole = lo >= start and hi <= end
            part = data[max(lo, start):min(hi, end)]
            text.append(readable[c] if whole else "".join(f"\\x{b:02x}" for b in part))
            chars += hi <= end
            last = c
        out.append(Piece("".join(text), chars, len(raw), starts_inside=k < len(readable) and bounds[k] < start,
                         ends_inside=bool(raw) and bounds[last] < end < bounds[last + 1]))
        k = last if raw and bounds[last + 1] > end else (last + 1 if raw else k)
        start = end
    return out


def token_pieces(token_bytes: Sequence[bytes]) -> list[str]:
    """The text each token holds, as a person reads it (Piece.text)."""
    return [p.text for p in describe_pieces(token_bytes)]


def visible(piece: str) -> str:
    """A piece for a terminal: newlines, tabs and carriage returns shown as escapes, and so is every other
    character the HTML views draw as a mark (boundaries.invisible_mark: controls, such as ESC, which a
    terminal would obey; zero-width and bidi marks; odd spaces), as \\xNN or \\uNNNN."""
    from tokenmill.reports.boundaries import invisible_mark

    return "".join(_ESCAPES.get(c) or (c if c == " " or invisible_mark(c) is None else
                                       c.encode("unicode_escape").decode("ascii")) for c in piece)


def marked_text(pieces: Sequence[str], mark: str = "|", inside: Sequence[bool] | None = None) -> str:
    """The text with each token boundary shown by `mark`, or by SPLIT after a piece that ends inside a
    character (`inside[i]`)."""
    marks = [SPLIT if inside is not None and inside[i] else mark for i in range(len(pieces))]
    return mark + "".join(visible(p) + m for p, m in zip(pieces, marks, strict=True))


def code_grid_lines(codes: np.ndarray, grid: Sequence[int], max_rows: int = 16, max_cols: int = 16) -> list[str]:
    """An (h, w) grid of integer codes as aligned text lines, cut to max_rows x max_cols."""
    h, w = grid[-2:]
    rows = np.asarray(codes).reshape(-1, h, w)[0]
    width = max(len(str(int(rows.max()))) if rows.size else 1, 1)
    lines = [" ".join(f"{int(c):>{width}}" for c in r[:max_cols]) + (" ..." if w > max_cols else "")
             for r in rows[:max_rows]]
    if h > max_rows:
        lines.append("...")
    return lines


def contact_sheet(frames: np.ndarray, columns: int = 8, gap: int = 2) -> np.ndarray:
    """Frames (F, H, W, 3) tiled left to right, top to bottom, on a white background."""
    n, H, W = frames.shape[:3]
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    sheet = np.full((rows * H + (rows - 1) * gap, columns * W + (columns - 1) * gap, 3), 255, np.uint8)
    for i, frame in enumerate(frames):
        r, c = divmod(i, columns)
        sheet[r * (H + gap):r * (H + gap) + H, c * (W + gap):c * (W + gap) + W] = frame
    return sheet


def reconstruct(tok, values: np.ndarray, grid: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """What the tokens (or latents) of one item decode to: an image (H, W, 3) where `shape` is (height, width),
    a clip (F, H, W, 3) where it is (frames, height, width), through the tokenizer's own decoder (decode_image,
    decode_clip). The one path `tokenmill decode`, `report`, `inspect` and `compare` share; NotImplementedError
    where the tokenizer has no decoder (a TorchScript or torch.export encoder, say)."""
    if tok.modality == "video":
        frames, height, width = shape
        return tok.decode_clip(values, tuple(grid), int(frames), int(height), int(width))
    height, width = shape
    return tok.decode_image(values, tuple(grid), int(height), int(width))
