"""A document drawn with every token boundary visible, as HTML: the view `compare` and `report` share.

Pure functions over a document's bytes and its tokens' byte spans (a text
tokenizer's `token_spans`, or the cumulative lengths of its `token_pieces`).

- Each token is one `<span class="tk">`, backgrounds alternating (`tk a` / `tk b`),
  with its ID and byte count in the title (shown on hover).
- Whitespace is drawn as a glyph (space ·, tab →, newline ↵ then a line break,
  no-break space ⍽) inside `<i class="ws" data-cp="HEX">`; every other
  character that would draw as nothing, or as something else, is drawn as a
  labelled pill (`<i class="ws cc">`, `invisible_mark`): controls by their
  abbreviations (CR, NUL, VT, FF, ESC, DEL, NEL ...), odd spaces (IDSP for the
  ideographic space ...), zero-width and bidi marks (ZWSP, ZWJ, BOM, RLO ...),
  line and paragraph separators (LS, PS), any other U+XXXX. data-cp holds the
  code point in hex, so a reader (and the browser test) maps each mark back to
  the document exactly, even one that holds a literal · or the text "NUL":
  HTML can hold neither U+0000 nor, written as a character reference, a C1
  control, so the character itself cannot be. The plain whitespace marks keep
  data-raw (the character) as well.
- A character split across tokens (byte-level BPE, byte fallback) is drawn
  once, in the token that completes it; a token holding only part of it shows
  those bytes as \\xNN in `<i class="pb" data-raw="">`, and every token touching
  a split character has the class `split` (a dashed red outline).
- An empty token (a span of no bytes) shows ∅ the same way.
"""
from __future__ import annotations

import functools
import html
import unicodedata
from typing import Sequence

import numpy as np

WHITESPACE_GLYPHS = {" ": "·", "\t": "→", "\n": "↵", "\u00a0": "⍽"}
# Labels of the characters drawn as a pill (standard abbreviations): C0 controls, DEL, C1 controls, then the
# odd spaces, zero-width and bidi marks. Any other control, format character or space gets U+XXXX. A pill
# rather than a control picture (␀): few fonts have those, and a missing glyph draws as an empty box.
C0_LABELS = ("NUL SOH STX ETX EOT ENQ ACK BEL BS HT LF VT FF CR SO SI DLE DC1 DC2 DC3 DC4 NAK SYN ETB CAN EM "
             "SUB ESC FS GS RS US").split()
C1_LABELS = ("PAD HOP BPH NBH IND NEL SSA ESA HTS HTJ VTS PLD PLU RI SS2 SS3 DCS PU1 PU2 STS CCH MW SPA EPA "
             "SOS SGCI SCI CSI ST OSC PM APC").split()
PILL_LABELS = {**{chr(i): name for i, name in enumerate(C0_LABELS)}, "\x7f": "DEL",
               **{chr(0x80 + i): name for i, name in enumerate(C1_LABELS)},
               "\u00ad": "SHY", "\u061c": "ALM", "\u180e": "MVS", "\u200b": "ZWSP", "\u200c": "ZWNJ",
               "\u200d": "ZWJ", "\u200e": "LRM", "\u200f": "RLM", "\u2028": "LS", "\u2029": "PS",
               "\u202a": "LRE", "\u202b": "RLE", "\u202c": "PDF", "\u202d": "LRO", "\u202e": "RLO",
               "\u202f": "NNBSP", "\u205f": "MMSP", "\u2060": "WJ", "\u2066": "LRI", "\u2067": "RLI",
               "\u2068": "FSI", "\u2069": "PDI", "\u3000": "IDSP", "\ufeff": "BOM"}
LINE_BREAKS = {"\n", "\x85", "\u2028", "\u2029"}  # drawn as their mark, then a line break


@functools.lru_cache(maxsize=4096)
def invisible_mark(ch: str) -> str | None:
    """How a character that would draw as nothing, or as something else, is drawn: its glyph or pill label,
    or None for a character that draws as itself. Whitespace, controls (Cc), format characters (Cf: zero-width
    and bidi marks, BOM) and every space and separator (Zs, Zl, Zp) get one."""
    mark = WHITESPACE_GLYPHS.get(ch) or PILL_LABELS.get(ch)
    if mark is None and unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp"):
        return f"U+{ord(ch):04X}"
    return mark


CSS = """.bv{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.9em;line-height:1.9;
white-space:pre-wrap;overflow-wrap:anywhere;word-break:break-word;margin:.3em 0;padding:.3em .4em;
border:1px solid #ddd;border-radius:4px;background:#fff}
.tk{border-radius:3px;padding:1px 0}.tk.a{background:#dbe9f6}.tk.b{background:#fde3c8}
.tk.split{outline:1px dashed #c44e52;outline-offset:-1px}
.ws{color:#8a8a8a;font-style:normal}.pb{color:#c44e52;font-style:normal;font-size:.85em}
.ws.cc{font-size:.62em;vertical-align:.15em;padding:0 .25em;margin:0 .05em;border:1px solid #8a8a8a;
border-radius:.6em;letter-spacing:.02em;white-space:nowrap}"""


def _glyphs(text: str) -> str:
    """Escaped text with each whitespace or invisible character drawn as its mark (`invisible_mark`; a line
    break after the marks of newline, NEL, LS and PS)."""
    out = []
    for ch in text:
        mark = invisible_mark(ch)
        if 0xDC80 <= ord(ch) <= 0xDCFF:  # a byte that is not UTF-8 (surrogateescape): its hex, as bytes are
            out.append(f'<i class="pb" data-raw="">\\x{ord(ch) - 0xDC00:02x}</i>')
        elif mark is None:
            out.append(html.escape(ch))
        else:
            cp = f'data-cp="{ord(ch):x}"'
            if ch in WHITESPACE_GLYPHS:
                raw = ch if ch == " " else f"&#{ord(ch)};"  # a reference: an attribute would fold \r, \n, \t
                out.append(f'<i class="ws" {cp} data-raw="{raw}">{mark}</i>')
            else:
                out.append(f'<i class="ws{" cc" if len(mark) > 1 else ""}" {cp}>{mark}</i>')
            if ch in LINE_BREAKS:
                out.append("<br>")
    return "".join(out)


def boundary_html(data: bytes, spans: Sequence[tuple[int, int]], ids: Sequence[int] | None = None) -> str:
    """The document `data` (UTF-8) drawn token by token; spans tile it (see transforms/tokenizers/spans.py).

    Returns the inner HTML of a `<div class="bv">`. Joined, the tokens' text
    with each `.ws` replaced by the character of its data-cp and each `.pb`
    removed is the document, character for character.
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
