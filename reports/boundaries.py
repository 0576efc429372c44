"""A document drawn with every token boundary visible, as HTML: the view `compare` and `report` share.

Pure functions over a document's bytes and its tokens' byte spans (a text
tokenizer's `token_spans`, or the cumulative lengths of its `token_pieces`).

- Each token is one `<span class="tk">`, backgrounds alternating (`tk a` / `tk b`),
  with its ID and byte count in the title (shown on hover).
- Whitespace is drawn as a glyph (space ·, tab →, newline ↵ then a line break,
  carriage return ␍) inside `<i class="ws" data-raw="...">`: data-raw holds the
  character it stands for, so a reader (and the browser test) can map the
  glyphs back to the document exactly, even one that holds a literal ·.
- A character split across tokens (byte-level BPE, byte fallback) is drawn
  once, in the token that completes it; a token holding only part of it shows
  those bytes as \\xNN in `<i class="pb" data-raw="">`, and every token touching
  a split character has the class `split` (a dashed red outline).
- An empty token (a span of no bytes) shows ∅ the same way.
"""
from __future__ import annotations

import html
from typing import Sequence

import numpy as np

WHITESPACE_GLYPHS = {" ": "·", "\t": "→", "\n": "↵", "\r": "␍", "\u00a0": "⍽"}

CSS = """.bv{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.9em;line-height:1.9;
white-space:pre-wrap;overflow-wrap:anywhere;word-break:break-word;margin:.3em 0;padding:.3em .4em;
border:1px solid #ddd;border-radius:4px;background:#fff}
.tk{border-radius:3px;padding:1px 0}.tk.a{background:#dbe9f6}.tk.b{background:#fde3c8}
.tk.split{outline:1px dashed #c44e52;outline-offset:-1px}
.ws{color:#8a8a8a;font-style:normal}.pb{color:#c44e52;font-style:normal;font-size:.85em}"""


def _glyphs(text: str) -> str:
    """Escaped text with each whitespace character drawn as its glyph (newline glyph followed by a break)."""
    out = []
    for ch in text:
        glyph = WHITESPACE_GLYPHS.get(ch)
        if 0xDC80 <= ord(ch) <= 0xDCFF:  # a byte that is not UTF-8 (surrogateescape): its hex, as bytes are
            out.append(f'<i class="pb" data-raw="">\\x{ord(ch) - 0xDC00:02x}</i>')
        elif glyph is None:
            out.append(html.escape(ch))
        else:
            raw = html.escape(ch, quote=True).replace("\n", "&#10;").replace("\r", "&#13;").replace("\t", "&#9;")
            out.append(f'<i class="ws" data-raw="{raw}">{glyph}</i>' + ("<br>" if ch == "\n" else ""))
    return "".join(out)


def boundary_html(data: bytes, spans: Sequence[tuple[int, int]], ids: Sequence[int] | None = None) -> str:
    """The document `data` (UTF-8) drawn token by token; spans tile it (see transforms/tokenizers/spans.py).

    Returns the inner HTML of a `<div class="bv">`. Joined, the tokens' text
    with each `.ws` replaced by its data-raw and each `.pb` removed is the
    document, character for character.
    """
    text = data.decode("utf-8", "surrogateescape")
    sizes = np.fromiter((len(c.encode("utf-8", "surrogateescape")) for c in text), np.int64, len(text))
    ends = np.cumsum(sizes)  # byte offset where each character ends
    starts = ends - sizes
    out = []
    for k, (s, e) in enumerate(spans):
        first = int(np.searchsorted(ends, s, side="right"))  # the first character ending after s
        last = int(np.searchsorted(ends, e, side="right"))  # characters [first, last) end inside (s, e]
        whole = text[first:last]
        starts_inside = first < last and starts[first] < s
        tail = (int(starts[last]) if last < len(text) else e)
        partial = data[max(s, tail):e] if tail < e else b""
        if first == last and s < e:  # only part of one character: its bytes
            partial = data[s:e]
        ends_inside = bool(partial)
        classes = "tk " + ("a" if k % 2 == 0 else "b") + (" split" if starts_inside or ends_inside else "")
        title = (f"id {int(ids[k])} · " if ids is not None else "") + f"{e - s} byte{'s' if e - s != 1 else ''}"
        if starts_inside:
            title += " · completes a character split across tokens"
        body = _glyphs(whole)
        if partial:
            body += '<i class="pb" data-raw="">' + "".join(f"\\x{b:02x}" for b in partial) + "</i>"
            title += " · holds part of a character: " + " ".join(f"{b:02x}" for b in partial)
        if s == e:
            body += '<i class="pb" data-raw="">∅</i>'
            title += " · no bytes of its own"
        out.append(f'<span class="{classes}" title="{html.escape(title)}">{body}</span>')
    return "".join(out)


def spans_of(pieces: Sequence[bytes]) -> list[tuple[int, int]]:
    """Consecutive spans of token pieces (a tokenizer's `token_pieces`), which join to the document."""
    out, pos = [], 0
    for p in pieces:
        out.append((pos, pos + len(p)))
        pos += len(p)
    return out


def visible_cell(text: str) -> str:
    """Escaped text for a table cell, whitespace drawn as glyphs (never a blank cell); empty shows ∅."""
    return _glyphs(text).replace("<br>", "") if text else '<i class="pb">∅</i>'
