"""Tokens turned back into what a person reads: text pieces, code grids, images and contact sheets.

Pure functions over numpy arrays and bytes; no I/O.
"""
from __future__ import annotations

import codecs
from typing import Sequence

import numpy as np

_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def token_pieces(token_bytes: Sequence[bytes]) -> list[str]:
    """The text each token adds, decoding the byte stream incrementally.

    A token ending inside a multi-byte character adds nothing, and the token
    that completes it adds the whole character, so the pieces join to the
    decoded text and their lengths to its length in characters.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = [decoder.decode(b) for b in token_bytes]
    if pieces:
        pieces[-1] += decoder.decode(b"", final=True)
    return pieces


def visible(piece: str) -> str:
    """A piece with newlines, tabs and carriage returns shown as escapes."""
    return "".join(_ESCAPES.get(c, c) for c in piece)


def marked_text(pieces: Sequence[str], mark: str = "|") -> str:
    """The text with each token boundary shown by `mark`."""
    return mark + mark.join(visible(p) for p in pieces) + mark


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


def video_frames(pixels: np.ndarray, grid: Sequence[int], patch: int, height: int, width: int,
                 frames: int | None = None) -> np.ndarray:
    """(F, height, width, 3) frames from spacetime patch pixels (the `patch:T,P` layout, see
    transforms/tokenizers/patches.py), T = values per token / (P * P * 3). Padding past
    height, width and `frames` (when given) is cut off.
    """
    from tokenmill.transforms.tokenizers.patches import patches_to_clip

    t, h, w = grid
    values = np.asarray(pixels, np.uint8).reshape(t * h * w, -1)
    tube = values.shape[1] // (patch * patch * 3)
    return patches_to_clip(values, (t, h, w), tube, patch, frames or t * tube, height, width)


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


def token_pixels(tokenizer, values: np.ndarray) -> np.ndarray:
    """(n, P*P*3 [* T]) uint8 pixels of each token: patches as stored, vq codes and pca latents decoded."""
    from tokenmill.transforms.tokenizers.codebook import PCATokenizer, VQTokenizer, to_pixels

    if isinstance(tokenizer, VQTokenizer):
        return to_pixels(tokenizer.codes[np.asarray(values, np.int64)])
    if isinstance(tokenizer, PCATokenizer):
        return to_pixels(np.asarray(values, np.float32) @ tokenizer.components + tokenizer.mean)
    return np.asarray(values, np.uint8)
