"""`tokenmill compare`: several tokenizers over the same documents or images, measured side by side.

Pure functions, no Beam (pipelines/compare.py runs them on the workers):

- `measure_texts` / `measure_images` turn one batch of documents or images into
  a tally (`TextTally` / `ImageTally`): sums and counts that merge by addition,
  so a batch can be measured on any worker and the tallies combined in any order.
- `summarize_text` / `summarize_images` turn the merged tally into the JSON
  that `compare.json` holds; `compare_html` (reports/compare_page.py) draws it.

Documents (images, clips) a tokenizer refuses are left out of every tokenizer's
figures (and counted), so that all figures cover the same text; but a tokenizer
that refuses every one is set aside instead (its figures empty, its first
refusal kept), so that one unfit tokenizer does not empty the comparison of the
others (`_Refusals`).
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
from typing import Any, Mapping, Sequence

import numpy as np

from tokenmill.reports.stats import LONG_TOKEN_CHARS, dominant_scripts, token_granularity

SHOW = 6  # documents drawn token by token (compare --show); up to this many candidates are kept per script
EXCERPT_CHARS = 320  # a boundary view shows at most this much of a document
MAX_ERROR_EXAMPLES = 10
SPELLING_ROWS = 12
TOP_TOKENS = 15


def sample_key(source: str, locator: str) -> int:
    """A record's place in the deterministic sample: a hash of where it comes from, whatever the runner."""
    return int.from_bytes(hashlib.blake2b(f"{source}\0{locator}".encode(), digest_size=8).digest(), "big")


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """The start of a document, cut after a sentence or at whitespace near `limit` characters."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    for mark in (". ", "。", "\n", "! ", "? ", " "):
        at = cut.rfind(mark)
        if at >= limit // 2:
            return cut[:at + len(mark)].rstrip(" ")
    return cut


def _smallest(items: list[tuple], n: int) -> list[tuple]:
    return sorted(items)[:n]


@dataclasses.dataclass
class ErrorTally:
    """Records that could not be measured: counts by (stage, error_type), and the first examples by place."""

    counts: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    examples: list[tuple[str, str, str, str, str]] = dataclasses.field(default_factory=list)

    def add(self, records: Sequence[Any]) -> None:
        for r in records:
            key = (r.stage, r.error_type)
            self.counts[key] = self.counts.get(key, 0) + 1
            self.examples.append((r.source, r.locator, r.stage, r.error_type, r.message))
        self.examples = sorted(self.examples)[:MAX_ERROR_EXAMPLES]

    def merge(self, other: "ErrorTally") -> None:
        for k, v in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        self.examples = sorted(self.examples + other.examples)[:MAX_ERROR_EXAMPLES]

    def to_json(self) -> dict[str, Any]:
        return {"count": sum(self.counts.values()),
                "by_type": [{"stage": s, "error_type": t, "count": c}
                            for (s, t), c in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))],
                "examples": [dict(zip(("source", "locator", "stage", "error_type", "message"), e, strict=True))
                             for e in self.examples]}


# -- text ------------------------------------------------------------------------------------------------

# Per group (("all", ""), ("source", uri), ("script", name)): documents, characters, bytes, then the
# tokens of each tokenizer, in the order of `specs`.
DOCS, CHARS, BYTES, TOKENS = 0, 1, 2, 3


class _Refusals:
    """What the text and image tallies share about refusals. Items some tokenizers refused are tallied apart
    (`aside`, by who refused them: tokenizer numbers), measured with the others; they join the figures only
    if those tokenizers refused every item (`common`). `refused` counts each tokenizer's refusals and
    `first_refusal` keeps its first by place: (source, locator, "ErrorType: message")."""

    specs: tuple[str, ...]
    refused: list[int]
    aside: dict[tuple[int, ...], Any]
    first_refusal: list[tuple[str, str, str] | None]

    def _count(self) -> int:  # items measured here
        raise NotImplementedError

    def _merge_refusals(self, other: Any) -> Any:
        self.first_refusal = [min((r for r in pair if r is not None), default=None) for pair in
                              zip(self.first_refusal or [None] * len(self.specs),
                                  other.first_refusal or [None] * len(self.specs), strict=True)]
        for mask, part in other.aside.items():
            self.aside[mask] = self.aside[mask].merge(part) if mask in self.aside else part
        return self

    def read(self) -> int:
        """Items read and decoded: measured, or refused by some tokenizer."""
        return self._count() + sum(p._count() for p in self.aside.values())

    def refused_all(self) -> tuple[int, ...]:
        """The tokenizers (numbers) that refused every item, where some item was read."""
        seen = self.read()
        return tuple(k for k, n in enumerate(self.refused or []) if seen and n == seen)

    def common(self) -> Any:
        """The items every tokenizer encoded, each tokenizer's figures over them; a tokenizer that refused
        every item is set aside (its figures are empty) rather than emptying everyone's."""
        whole = set(self.refused_all())
        if len(whole) == len(self.specs):
            return self
        for mask in sorted(self.aside):
            if set(mask) <= whole:
                self.merge(dataclasses.replace(self.aside[mask], refused=[], first_refusal=[], aside={},
                                               errors=ErrorTally()))
        self.aside = {m: p for m, p in self.aside.items() if not set(m) <= whole}
        return self

    def note_refusals(self, k: int, failures: Sequence[tuple[int, BaseException]], sources: Sequence[str],
                      locators: Sequence[str]) -> set[int]:
        """Count tokenizer k's refusals of a batch and keep its first; returns the refused items' numbers."""
        self.refused[k] += len(failures)
        for i, e in failures:
            where = (sources[i], locators[i], f"{type(e).__name__}: {e}")
            self.first_refusal[k] = min(where, self.first_refusal[k] or where)
        return {i for i, _ in failures}


def _refusal_masks(failed: Sequence[set[int]], n: int) -> dict[tuple[int, ...], list[int]]:
    """Items (numbers, in order) grouped by the tokenizers that refused them."""
    masks: dict[tuple[int, ...], list[int]] = {}
    for i in range(n):
        masks.setdefault(tuple(k for k, f in enumerate(failed) if i in f), []).append(i)
    return masks


@dataclasses.dataclass
class TextTally(_Refusals):
    specs: tuple[str, ...]
    groups: dict[tuple[str, str], np.ndarray] = dataclasses.field(default_factory=dict)
    counts: list[np.ndarray] = dataclasses.field(default_factory=list)  # uses of each ID, per tokenizer
    refused: list[int] = dataclasses.field(default_factory=list)  # documents each tokenizer refused
    errors: ErrorTally = dataclasses.field(default_factory=ErrorTally)
    # script -> the `show` smallest (sample key, source, locator, excerpt): enough for `show` views of one script
    examples: dict[str, list[tuple[int, str, str, str]]] = dataclasses.field(default_factory=dict)
    show: int = SHOW
    # Documents some tokenizers refused, measured with the others, by who refused them (tokenizer numbers):
    # they join the figures only if those tokenizers refused every document (see `common`).
    aside: dict[tuple[int, ...], "TextTally"] = dataclasses.field(default_factory=dict)
    # per tokenizer, its first refusal by place: (source, locator, "ErrorType: message"), or None
    first_refusal: list[tuple[str, str, str] | None] = dataclasses.field(default_factory=list)

    def merge(self, other: "TextTally") -> "TextTally":
        for k, v in other.groups.items():
            self.groups[k] = self.groups[k] + v if k in self.groups else v.copy()
        if not self.counts:
            self.counts = [c.copy() for c in other.counts]
        elif other.counts:
            self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.refused = [a + b for a, b in zip(self.refused or [0] * len(self.specs),
                                              other.refused or [0] * len(self.specs), strict=True)]
        self.errors.merge(other.errors)
        for script, items in other.examples.items():
            self.examples[script] = _smallest(self.examples.get(script, []) + items, self.show)
        return self._merge_refusals(other)

    def _count(self) -> int:
        return int(self.groups[("all", "")][DOCS]) if ("all", "") in self.groups else 0


def _tally_of(tokenizers: Mapping[str, Any], columns: Sequence[Any], rows: Sequence[np.ndarray | None],
              sources: Sequence[str], locators: Sequence[str], texts: Sequence[str], show: int) -> TextTally:
    """The tally of some documents: each tokenizer's tokens of them are rows[k] of its column (None: refused)."""
    import pyarrow as pa

    specs = tuple(tokenizers)
    tally = TextTally(specs, refused=[0] * len(specs), show=show)
    n = len(texts)
    per_doc = np.zeros((n, TOKENS + len(specs)), np.int64)
    per_doc[:, DOCS] = 1
    per_doc[:, CHARS] = [len(t) for t in texts]
    per_doc[:, BYTES] = [len(t.encode("utf-8", "surrogatepass")) for t in texts]
    for k, (tok, column, take) in enumerate(zip(tokenizers.values(), columns, rows, strict=True)):
        vocab = int(tok.vocab_size)
        if take is None:
            tally.counts.append(np.zeros(vocab, np.int64))
            continue
        if len(take) != len(column):  # positions ascend: the same length is the whole column
            column = column.take(pa.array(take))
        per_doc[:, TOKENS + k] = column.value_lengths().to_numpy(zero_copy_only=False)
        values = column.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        tally.counts.append(np.bincount(values, minlength=vocab)[:vocab])
    scripts = dominant_scripts(list(texts))
    tally.groups[("all", "")] = per_doc.sum(axis=0)
    for kind, names in (("source", sources), ("script", scripts)):
        names_arr = np.array(names, dtype=object)
        for name in dict.fromkeys(names):
            tally.groups[(kind, name)] = per_doc[names_arr == name].sum(axis=0)
    for i, script in enumerate(scripts):
        if texts[i].strip() and show:
            item = (sample_key(sources[i], locators[i]), sources[i], locators[i], excerpt(texts[i]))
            tally.examples[script] = _smallest(tally.examples.get(script, []) + [item], show)
    return tally


def measure_texts(tokenizers: Mapping[str, Any], sources: Sequence[str], locators: Sequence[str],
                  texts: Sequence[str], show: int = SHOW) -> TextTally:
    """One batch of documents through every tokenizer (without BOS/EOS): a tally to merge, keeping up to
    `show` excerpts per script to draw. Documents some tokenizer refused are tallied apart, by who refused
    them (`TextTally.aside`)."""
    specs = tuple(tokenizers)
    tally = TextTally(specs, refused=[0] * len(specs), show=show, first_refusal=[None] * len(specs))
    if not texts:
        return tally
    columns, failed = [], []
    for k, tok in enumerate(tokenizers.values()):
        column, failures = tok.encode_batch(texts)
        failed.append(tally.note_refusals(k, failures, sources, locators))
        columns.append(column)
    # where each document's tokens sit in each column (refused documents are left out of it)
    refused = [np.isin(np.arange(len(texts)), sorted(f)) for f in failed]
    position = [np.arange(len(texts)) - np.cumsum(f) + f for f in refused]
    for mask, idx in _refusal_masks(failed, len(texts)).items():
        rows = [None if k in mask else position[k][idx] for k in range(len(specs))]
        part = _tally_of(tokenizers, columns, rows, [sources[i] for i in idx], [locators[i] for i in idx],
                         [texts[i] for i in idx], show)
        if mask:
            tally.aside[mask] = part
        else:
            tally.merge(part)
    return tally


def _ratios(row: np.ndarray, k: int) -> dict[str, float]:
    tokens, chars, nbytes = float(row[TOKENS + k]), float(row[CHARS]), float(row[BYTES])
    return {"tokens": int(tokens), "tokens_per_char": tokens / chars if chars else 0.0,
            "tokens_per_byte": tokens / nbytes if nbytes else 0.0,
            "chars_per_token": chars / tokens if tokens else 0.0}


def _piece_texts(data: bytes, spans: Sequence[tuple[int, int]]) -> list[str]:
    from tokenmill.reports.render import token_pieces

    return token_pieces([data[s:e] for s, e in spans])


def is_word_token(text: str) -> bool:
    """A token that is one whole word of LONG_TOKEN_CHARS or more characters: letters in it, no whitespace
    inside, and it starts where a word starts (after its leading whitespace, or with a symbol such as
    `.DefaultCellStyle`, or a capital); a lowercase piece without a leading space (`issenschaft`,
    `ительство`) continues a word and is left out."""
    word = text.lstrip()
    if len(word) < LONG_TOKEN_CHARS or any(c.isspace() for c in word) or not any(c.isalpha() for c in word):
        return False
    return len(word) < len(text) or not word[0].isalpha() or word[0].isupper()


def spelling_risk(tokenizers: Mapping[str, Any], counts: Sequence[np.ndarray], rows: int = SPELLING_ROWS
                  ) -> dict[str, list[dict[str, Any]]]:
    """Per tokenizer: the most used tokens that are one word of LONG_TOKEN_CHARS or more characters
    (`is_word_token`), with how every other tokenizer splits the same text. A model sees such a word as one
    ID and must learn its spelling by heart."""
    from tokenmill.transforms.tokenizers.spans import utf8

    out: dict[str, list[dict[str, Any]]] = {}
    for spec, tok, used in zip(tokenizers, tokenizers.values(), counts, strict=True):
        words = []
        for i in np.argsort(-used, kind="stable"):
            if used[i] == 0 or len(words) >= rows:
                break
            try:
                text = tok.token_bytes(int(i)).decode("utf-8")
            except UnicodeDecodeError:
                continue
            if not is_word_token(text):
                continue
            word = text.lstrip()
            if text in (tok.special_tokens or {}):
                continue
            others = {}
            for other_spec, other in tokenizers.items():
                if other_spec == spec:
                    continue
                try:
                    spans = other.token_spans(text)
                except Exception as e:  # noqa: BLE001 - a tokenizer that refuses the word: say so in its cell
                    others[other_spec] = {"refused": f"{type(e).__name__}: {e}"}
                    continue
                others[other_spec] = {"tokens": len(spans), "ids": [int(i) for i in other._encode(text)],
                                      "spans": [list(s) for s in spans],
                                      "pieces": _piece_texts(utf8(text), spans)}
            words.append({"id": int(i), "text": text, "chars": len(word), "uses": int(used[i]), "others": others})
        out[spec] = words
    return out


def boundary_examples(tokenizers: Mapping[str, Any], examples: Mapping[str, list[tuple]], show: int,
                      order: Sequence[str], refused_all: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Up to `show` documents (the first of each script, in `order`, then the second ...), each with every
    tokenizer's token IDs and byte spans (which tile the excerpt), but those in `refused_all`."""
    from tokenmill.transforms.tokenizers.spans import utf8

    picked = []
    for rank in range(show):
        for script in order:
            items = examples.get(script, [])
            if rank < len(items) and len(picked) < show:
                picked.append((script, items[rank]))
    out = []
    for script, (_, source, locator, text) in picked:
        views = {}
        for spec, tok in tokenizers.items():
            if spec in refused_all:  # it refused every document: nothing of it to draw
                continue
            ids = [int(i) for i in tok._encode(text)]
            spans = tok.token_spans(text)
            views[spec] = {"ids": ids, "spans": [list(s) for s in spans]}
        out.append({"script": script, "source": source, "locator": locator, "text": text,
                    "bytes": len(utf8(text)), "views": views})
    return out


def _refusal_json(where: tuple[str, str, str] | None) -> dict[str, str] | None:
    return None if where is None else dict(zip(("source", "locator", "message"), where, strict=True))


def summarize_text(tally: TextTally, tokenizers: Mapping[str, Any], *, show: int = SHOW) -> dict[str, Any]:
    """compare.json for text: figures per tokenizer, overall, per source and per script; long tokens;
    vocabulary usage; the spelling-risk list; boundary views of `show` documents."""
    from tokenmill.reports.render import visible

    specs = tally.specs
    tally = tally.common()
    whole = [specs[k] for k in tally.refused_all()]
    empty = np.zeros(TOKENS + len(specs), np.int64)
    total = tally.groups.get(("all", ""), empty)
    counts = tally.counts or [np.zeros(int(t.vocab_size), np.int64) for t in tokenizers.values()]
    per_tok = []
    for k, (spec, tok) in enumerate(tokenizers.items()):
        g = token_granularity(counts[k], tok.token_bytes, top=10)
        used = counts[k]
        top = np.argsort(-used, kind="stable")[:TOP_TOKENS]
        per_tok.append({
            "spec": spec, "name": getattr(tok, "name", spec), "vocab_size": int(tok.vocab_size),
            **_ratios(total, k), "share_long": g["share_long"], "distinct_tokens": g["distinct_tokens"],
            "vocab_used": g["distinct_tokens"] / int(tok.vocab_size),
            "refused": tally.refused[k] if tally.refused else 0, "refused_all": spec in whole,
            "first_refusal": _refusal_json(tally.first_refusal[k] if tally.first_refusal else None),
            "chars_hist": {str(c): n for c, n in g["chars_hist"].items()},
            "longest": [{**t, "text": t["text"]} for t in g["longest"]],
            "top_tokens": [{"id": int(i), "text": tok.token_bytes(int(i)).decode("utf-8", "backslashreplace"),
                            "shown": visible(tok.token_bytes(int(i)).decode("utf-8", "backslashreplace")),
                            "uses": int(used[i]), "share": float(used[i] / max(1, used.sum()))}
                           for i in top if used[i]],
        })

    def grouped(kind: str) -> list[dict[str, Any]]:
        rows = [(name, row) for (k, name), row in tally.groups.items() if k == kind]
        rows.sort(key=lambda nr: (-int(nr[1][CHARS]), nr[0]))
        return [{"name": name, "documents": int(row[DOCS]), "chars": int(row[CHARS]), "bytes": int(row[BYTES]),
                 "tokenizers": {spec: _ratios(row, k) for k, spec in enumerate(specs)}} for name, row in rows]

    scripts = grouped("script")
    return {
        "kind": "text", "tokenizers": per_tok,
        "documents": int(total[DOCS]), "chars": int(total[CHARS]), "bytes": int(total[BYTES]),
        "long_token_chars": LONG_TOKEN_CHARS,
        "by_source": grouped("source"), "by_script": scripts,
        "read": tally.read(),
        "spelling_risk": spelling_risk(tokenizers, counts),
        "examples": boundary_examples(tokenizers, tally.examples, show, [s["name"] for s in scripts], whole),
        "errors": tally.errors.to_json(),
    }


# -- images and video clips ---------------------------------------------------------------------------------
#
# One path for both: a clip is measured as an image is (tokens, stored bytes, the reconstruction's PSNR and
# SSIM through the tokenizer's own decoder, as `tokenmill decode` uses it), with its seconds added for
# tokens per second; a clip is shown as a contact sheet of its frames (render.contact_sheet, as `report`).

SHOWN_IMAGES = 6
SHOWN_CLIPS = 4
SHEET_FRAMES = 8  # a shown clip's contact sheet holds at most this many of its frames, evenly spaced
UNIT = {"image": "image", "video": "clip"}


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> float:
    """Mean structural similarity of two uint8 RGB images (Wang et al. 2004), as scikit-image computes it
    by default: a uniform `window` x `window` filter per channel, K1 = 0.01, K2 = 0.03, sample covariances,
    the border of window // 2 pixels left out, channels averaged. Written here rather than adding
    scikit-image for one function; tests/test_compare.py checks its known values."""
    x, y = a.astype(np.float64), b.astype(np.float64)
    if x.shape != y.shape:
        raise ValueError(f"ssim of images of different shapes {x.shape} and {y.shape}")
    h, w = x.shape[:2]
    if h < window or w < window:  # too small for the window: fall back to the largest odd one that fits
        window = max(1, min(h, w) - (1 - min(h, w) % 2))
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    n = window * window
    cov_norm = n / (n - 1) if n > 1 else 1.0

    def box(v: np.ndarray) -> np.ndarray:  # mean over each full window, (h - window + 1, w - window + 1, c)
        s = np.cumsum(np.cumsum(np.pad(v, ((1, 0), (1, 0), (0, 0))), 0), 1)
        return (s[window:, window:] - s[:-window, window:] - s[window:, :-window] + s[:-window, :-window]) / n

    ux, uy = box(x), box(y)
    vx = cov_norm * (box(x * x) - ux * ux)
    vy = cov_norm * (box(y * y) - uy * uy)
    vxy = cov_norm * (box(x * y) - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


def _png_b64(image: np.ndarray) -> str:
    from tokenmill.reports.dataset import png_bytes

    return base64.b64encode(png_bytes(image)).decode()


# Per tokenizer, summed over images (or clips): tokens, their bytes as stored, items measured, items decoded
# again, PSNR over the decoded ones with a finite PSNR, how many those are, lossless ones, and SSIM.
IMAGE_SUMS = ("tokens", "bytes", "images", "decoded", "psnr", "finite", "lossless", "ssim")


@dataclasses.dataclass
class ImageTally(_Refusals):
    specs: tuple[str, ...]
    images: int = 0  # images, or clips
    pixels: int = 0  # over every frame of a clip
    sums: np.ndarray | None = None  # (tokenizers, len(IMAGE_SUMS)): see IMAGE_SUMS
    psnr: list[list[float]] = dataclasses.field(default_factory=list)  # per tokenizer, per image
    refused: list[int] = dataclasses.field(default_factory=list)
    errors: ErrorTally = dataclasses.field(default_factory=ErrorTally)
    shown: list[tuple[int, dict[str, Any]]] = dataclasses.field(default_factory=list)  # (sample key, sample)
    modality: str = "image"
    seconds: float = 0.0  # clips: their length in time, summed
    frames: int = 0  # clips: their frames, summed
    aside: dict[tuple[int, ...], "ImageTally"] = dataclasses.field(default_factory=dict)  # see _Refusals
    first_refusal: list[tuple[str, str, str] | None] = dataclasses.field(default_factory=list)

    def _count(self) -> int:
        return self.images

    @property
    def show(self) -> int:
        return SHOWN_CLIPS if self.modality == "video" else SHOWN_IMAGES

    def merge(self, other: "ImageTally") -> "ImageTally":
        self.images += other.images
        self.pixels += other.pixels
        self.seconds += other.seconds
        self.frames += other.frames
        if other.sums is not None:
            self.sums = other.sums.copy() if self.sums is None else self.sums + other.sums
        self.psnr = [a + b for a, b in zip(self.psnr or [[] for _ in self.specs], other.psnr or
                                           [[] for _ in self.specs], strict=True)]
        self.refused = [a + b for a, b in zip(self.refused or [0] * len(self.specs),
                                              other.refused or [0] * len(self.specs), strict=True)]
        self.errors.merge(other.errors)
        self.shown = sorted(self.shown + other.shown, key=lambda kv: kv[0])[:self.show]
        return self._merge_refusals(other)


def _items(tok: Any, column: Any, grids: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Each item's tokens (n,) or latents (n, dim) out of an encode_batch column."""
    if tok.kind == "hard":
        return [np.asarray(column[i].values.to_numpy(zero_copy_only=False)) for i in range(len(grids))]
    from tokenmill.schemas.tables import LATENT_NUMPY

    dtype = LATENT_NUMPY[tok.latent_dtype]
    return [np.frombuffer(column[i].as_py(), dtype).reshape(int(np.prod(g)), -1) for i, g in enumerate(grids)]


def token_nbytes(tok: Any, tokens: int) -> int:
    """Bytes the tokens of one item take as stored (IDs at the vocabulary's width, or latent vectors)."""
    from tokenmill.schemas.tables import numpy_dtype

    return tokens * (numpy_dtype(tok.token_type).itemsize * (1 if tok.kind == "hard" else int(tok.dim)))


def sheet_frames(frames: int, most: int = SHEET_FRAMES) -> list[int]:
    """The frames a clip's contact sheet shows: all, or `most` evenly spaced from the first to the last."""
    if frames <= most:
        return list(range(frames))
    return sorted({round(i * (frames - 1) / (most - 1)) for i in range(most)})


def _picture(item: np.ndarray, video: bool) -> str:
    """An image, or a clip's contact sheet (the `sheet_frames` of it), as base64 PNG."""
    if not video:
        return _png_b64(item)
    from tokenmill.reports.render import contact_sheet

    return _png_b64(contact_sheet(item[sheet_frames(len(item))], columns=SHEET_FRAMES))


def decode_item(tok: Any, values: np.ndarray, grid: Sequence[int], item: np.ndarray) -> np.ndarray:
    """What the tokens of one image (H, W, 3) or clip (T, H, W, 3) decode to, at its shape, through the
    tokenizer's decoder (render.reconstruct, as `tokenmill decode` and `report`). NotImplementedError where the
    tokenizer cannot decode."""
    from tokenmill.reports.render import reconstruct

    return reconstruct(tok, values, grid, item.shape[:-1])


def fidelity(back: np.ndarray, item: np.ndarray) -> tuple[float, float]:
    """(PSNR over every pixel, SSIM) of a reconstruction; a clip's SSIM is the mean of its frames'."""
    from tokenmill.transforms.tokenizers.codebook import psnr

    if back.ndim == 4:
        return psnr(back, item), float(np.mean([ssim(b, a) for b, a in zip(back, item, strict=True)]))
    return psnr(back, item), ssim(back, item)


def measure_images(tokenizers: Mapping[str, Any], sources: Sequence[str], locators: Sequence[str],
                   images: Sequence[np.ndarray], infos: Sequence[Mapping[str, Any]] | None = None) -> ImageTally:
    """One batch of images, or of clips (T, H, W, 3) with their timing `infos` (clip_start, clip_end, fps), through
    every tokenizer (all of one modality): tokens, stored bytes, and reconstruction PSNR and SSIM (the tokens
    decoded against the item as tokenized). Items some tokenizer refused are tallied apart, by who refused
    them (`ImageTally.aside`)."""
    specs = tuple(tokenizers)
    video = bool(specs) and next(iter(tokenizers.values())).modality == "video"
    tally = ImageTally(specs, sums=np.zeros((len(specs), len(IMAGE_SUMS))), psnr=[[] for _ in specs],
                       refused=[0] * len(specs), modality="video" if video else "image",
                       first_refusal=[None] * len(specs))
    if not len(images):
        return tally
    encoded, failed = [], []
    for k, tok in enumerate(tokenizers.values()):
        column, grids, failures = tok.encode_batch(list(images))
        failed.append(tally.note_refusals(k, failures, sources, locators))
        kept = [i for i in range(len(images)) if i not in failed[k]]
        encoded.append(dict(zip(kept, zip(_items(tok, column, grids), grids, strict=True), strict=True)))
    for mask, idx in _refusal_masks(failed, len(images)).items():
        part = _image_tally_of(tokenizers, encoded, mask, idx, sources, locators, images, infos, video)
        if mask:
            tally.aside[mask] = part
        else:
            tally.merge(part)
    return tally


def _image_tally_of(tokenizers: Mapping[str, Any], encoded: Sequence[dict[int, tuple]], mask: tuple[int, ...],
                    keep: Sequence[int], sources: Sequence[str], locators: Sequence[str], images: Sequence[np.ndarray],
                    infos: Sequence[Mapping[str, Any]] | None, video: bool) -> ImageTally:
    """The tally of items `keep`, which the tokenizers in `mask` refused (their figures stay empty)."""
    specs = tuple(tokenizers)
    tally = ImageTally(specs, sums=np.zeros((len(specs), len(IMAGE_SUMS))), psnr=[[] for _ in specs],
                       refused=[0] * len(specs), modality="video" if video else "image")
    tally.images = len(keep)
    tally.pixels = sum(int(np.prod(images[i].shape[:-1])) for i in keep)
    if video:
        tally.frames = sum(len(images[i]) for i in keep)
        tally.seconds = float(sum(infos[i]["clip_end"] - infos[i]["clip_start"] for i in keep))
    # Only the batch's smallest keys can be shown: only they are drawn as PNGs.
    keys = {i: sample_key(sources[i], locators[i]) for i in keep}
    shown = sorted(keep, key=keys.__getitem__)[:tally.show]
    recon: dict[int, dict[str, Any]] = {i: {} for i in shown}
    for k, (spec, tok) in enumerate(tokenizers.items()):
        if k in mask:
            for i in shown:
                recon[i][spec] = {"refused": True}
            continue
        for i in keep:
            values, grid = encoded[k][i]
            item, n = images[i], int(np.prod(grid))
            row = dict.fromkeys(IMAGE_SUMS, 0.0)
            row.update(tokens=n, bytes=token_nbytes(tok, n), images=1)
            try:
                back = decode_item(tok, values, grid, item)
            except NotImplementedError:  # an encoder without a decoder: tokens and bytes, no fidelity
                back = None
            if back is not None:
                p, s = fidelity(back, item)
                row.update(decoded=1, psnr=p if np.isfinite(p) else 0.0, finite=np.isfinite(p),
                           lossless=not np.isfinite(p), ssim=s)
                tally.psnr[k].append(float(p))
            tally.sums[k] += [row[name] for name in IMAGE_SUMS]
            if i in recon:
                recon[i][spec] = {"tokens": n, **({"png": _picture(back, video), "psnr": float(p), "ssim": s}
                                                  if back is not None else {})}
    for i in shown:
        item = images[i]
        sample = {"source": sources[i], "locator": locators[i], "height": int(item.shape[-3]),
                  "width": int(item.shape[-2]), "original_png": _picture(item, video), "reconstructions": recon[i]}
        if video:
            sample.update(frames=int(len(item)), sheet_frames=sheet_frames(len(item)),
                          **{k: infos[i][k] for k in ("clip_start", "clip_end", "fps")})
        tally.shown.append((keys[i], sample))
    tally.shown = sorted(tally.shown, key=lambda kv: kv[0])[:tally.show]
    return tally


def summarize_images(tally: ImageTally, tokenizers: Mapping[str, Any]) -> dict[str, Any]:
    """compare.json for images (or clips): per tokenizer, tokens and stored bytes per image (per clip, and
    tokens per second), PSNR and SSIM; the shown images (clips) with each reconstruction."""
    unit = UNIT[tally.modality]
    tally = tally.common()
    whole = [tally.specs[k] for k in tally.refused_all()]
    sums = tally.sums if tally.sums is not None else np.zeros((len(tally.specs), len(IMAGE_SUMS)))
    per_tok = []
    for k, (spec, tok) in enumerate(tokenizers.items()):
        tokens, nbytes, n, decoded, psnr_sum, finite, lossless, ssim_sum = sums[k]
        scores = tally.psnr[k] if tally.psnr else []
        row = {
            "spec": spec, "kind": tok.kind, "vocab_size": getattr(tok, "vocab_size", None),
            "dim": int(getattr(tok, "dim", 0) or 0) or None, "latent_dtype": getattr(tok, "latent_dtype", None),
            f"{unit}s": int(n), f"tokens_per_{unit}": tokens / n if n else 0.0,
            f"bytes_per_{unit}": nbytes / n if n else 0.0,
            "psnr_mean": psnr_sum / finite if finite else None, "lossless": int(lossless),
            "psnr_median": float(np.median(scores)) if scores else None,
            "ssim_mean": ssim_sum / decoded if decoded else None, "decoded": int(decoded),
            "refused": tally.refused[k] if tally.refused else 0, "refused_all": spec in whole,
            "first_refusal": _refusal_json(tally.first_refusal[k] if tally.first_refusal else None)}
        if unit == "clip":
            row["tokens_per_second"] = tokens / tally.seconds if tally.seconds else 0.0
            row["tokens_per_frame"] = tokens / tally.frames if tally.frames else 0.0
        per_tok.append(row)
    out = {"kind": tally.modality, "tokenizers": per_tok, f"{unit}s": tally.images, "read": tally.read(),
           f"raw_bytes_per_{unit}": 3 * tally.pixels / tally.images if tally.images else 0.0,
           "shown": [s for _, s in tally.shown], "errors": tally.errors.to_json()}
    if unit == "clip":
        out.update(seconds=tally.seconds, frames=tally.frames,
                   seconds_per_clip=tally.seconds / tally.images if tally.images else 0.0,
                   frames_per_clip=tally.frames / tally.images if tally.images else 0.0)
    return out
