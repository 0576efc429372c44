"""Statistics behind the report: pure functions over numpy arrays and Arrow tables."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pyarrow as pa

LONG_TOKEN_CHARS = 8  # "packs >= 8 characters": where spelling a word from its token gets hard


def token_granularity(counts: np.ndarray, token_bytes: Callable[[int], bytes], top: int = 20) -> dict[str, Any]:
    """How much text each token used packs, weighted by how often it is used.

    counts[i] is how often ID i occurs; `token_bytes` is the tokenizer's (the
    bytes an ID stands for on its own). A token's characters are the whole
    characters in its bytes: a token holding part of a multi-byte character
    does not count it, and shows those bytes as \\xNN.
    """
    used = np.flatnonzero(counts)
    weights = counts[used].astype(np.float64)
    raw = [token_bytes(int(i)) for i in used]
    nbytes = np.array([len(b) for b in raw], np.int64)
    chars = np.array([len(b.decode("utf-8", errors="ignore")) for b in raw], np.int64)
    text = [b.decode("utf-8", errors="backslashreplace") for b in raw]  # part of a character as \xNN
    total = weights.sum() or 1.0
    order = sorted(range(len(used)), key=lambda k: (-chars[k], -weights[k], int(used[k])))[:top]
    return {
        "distinct_tokens": int(len(used)),
        "tokens": int(weights.sum()),
        "chars_per_token": float((chars * weights).sum() / total),
        "bytes_per_token": float((nbytes * weights).sum() / total),
        "share_long": float(weights[chars >= LONG_TOKEN_CHARS].sum() / total),
        "chars_hist": _weighted_hist(chars, weights),
        "bytes_hist": _weighted_hist(nbytes, weights),
        "longest": [{"id": int(used[k]), "text": text[k], "chars": int(chars[k]), "bytes": int(nbytes[k]),
                     "count": int(weights[k])} for k in order],
    }


def _weighted_hist(values: np.ndarray, weights: np.ndarray) -> dict[int, int]:
    """{value: total weight}, for small non-negative integer values."""
    if not len(values):
        return {}
    sums = np.bincount(values, weights=weights)
    return {int(v): int(sums[v]) for v in np.flatnonzero(sums)}


def codebook_usage(counts: np.ndarray, vocab_size: int) -> dict[str, Any]:
    """Which codes a hard visual tokenizer uses: perplexity exp(H) of the usage and the dead codes.

    Perplexity is the effective number of codes: vocab_size when all are used
    equally, 1 when one code does everything.
    """
    counts = np.pad(np.asarray(counts, np.int64), (0, max(0, vocab_size - len(counts))))[:vocab_size]
    total = counts.sum()
    p = counts[counts > 0] / total if total else np.zeros(0)
    dead = np.flatnonzero(counts == 0)
    return {"vocab_size": int(vocab_size), "used": int((counts > 0).sum()), "dead": int(len(dead)),
            "dead_codes": [int(c) for c in dead[:64]], "perplexity": float(np.exp(-(p * np.log(p)).sum())),
            "counts": counts}


def error_summary(errors: pa.Table, examples: int = 3) -> list[dict[str, Any]]:
    """Error rows grouped by (stage, error_type), most frequent first, with a few examples each."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for e in errors.to_pylist():
        groups.setdefault((e["stage"], e["error_type"]), []).append(e)
    out = [{"stage": s, "error_type": t, "count": len(rows),
            "examples": [{k: r[k] for k in ("source", "locator", "message")} for r in rows[:examples]]}
           for (s, t), rows in groups.items()]
    return sorted(out, key=lambda g: (-g["count"], g["stage"], g["error_type"]))


def throughput(timing: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """Seconds since the start, and cumulative rows and tokens, at each written block; None if not recorded."""
    blocks = timing.get("blocks") if timing else None
    if not blocks or not timing.get("started_at"):
        return None
    fields = timing.get("block_fields", ["written_at", "rows", "tokens", "errors"])
    arr = np.array(blocks, np.float64)
    col = {name: arr[:, i] for i, name in enumerate(fields)}
    return {"seconds": np.concatenate([[0.0], col["written_at"] - timing["started_at"]]),
            "rows": np.concatenate([[0], np.cumsum(col["rows"])]),
            "tokens": np.concatenate([[0], np.cumsum(col["tokens"])]),
            "total_seconds": float(timing.get("finished_at", col["written_at"][-1]) - timing["started_at"])}


# Unicode scripts of letters, by code point range (a light detector: enough to group documents by the
# writing system a tokenizer sees; not a language identifier). Ranges not listed are not letters here.
_SCRIPT_RANGES = (
    (0x0041, 0x005A, "Latin"), (0x0061, 0x007A, "Latin"), (0x00C0, 0x024F, "Latin"), (0x1E00, 0x1EFF, "Latin"),
    (0x0370, 0x03FF, "Greek"), (0x1F00, 0x1FFF, "Greek"), (0x0400, 0x052F, "Cyrillic"),
    (0x0590, 0x05FF, "Hebrew"), (0x0600, 0x06FF, "Arabic"), (0x0750, 0x077F, "Arabic"),
    (0x0900, 0x097F, "Devanagari"), (0x0980, 0x0DFF, "Indic (other)"), (0x0E00, 0x0E7F, "Thai"),
    (0x1100, 0x11FF, "Hangul"), (0x3040, 0x30FF, "Kana"), (0x3400, 0x4DBF, "Han"), (0x4E00, 0x9FFF, "Han"),
    (0xAC00, 0xD7AF, "Hangul"), (0xF900, 0xFAFF, "Han"), (0x20000, 0x2FA1F, "Han"),
)
SCRIPTS = tuple(dict.fromkeys(name for _, _, name in _SCRIPT_RANGES))
NO_LETTERS = "no letters"
_NO_SCRIPT = 255
_TABLE = np.full(max(hi for _, hi, _ in _SCRIPT_RANGES) + 2, _NO_SCRIPT, np.uint8)  # code point -> script
for _lo, _hi, _name in _SCRIPT_RANGES:
    _TABLE[_lo:_hi + 1] = SCRIPTS.index(_name)


def dominant_script(text: str) -> str:
    """The script most of a document's letters are written in ("Japanese" where kana make up a tenth of
    them: Japanese mixes kana and Han), or NO_LETTERS. Digits, punctuation and symbols do not count."""
    return dominant_scripts([text])[0]


def dominant_scripts(texts: list[str]) -> list[str]:
    """dominant_script of each document, for a batch at once: one table lookup per character over all of
    them (a per-document search cost 7% of a compare's measuring, measured on 10 MB; this costs about 1%)."""
    if not texts:
        return []
    code = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), np.uint32)
    script = _TABLE[np.minimum(code, len(_TABLE) - 1)]  # the table's last entry is no script
    doc = np.repeat(np.arange(len(texts), dtype=np.int64), [len(t) for t in texts])
    inside = script != _NO_SCRIPT
    k = len(SCRIPTS)
    counts = np.bincount(doc[inside] * k + script[inside], minlength=len(texts) * k).reshape(len(texts), k)
    letters = counts.sum(axis=1)
    best = counts.argmax(axis=1)
    kana = counts[:, SCRIPTS.index("Kana")] * 10 >= letters
    return [NO_LETTERS if n == 0 else "Japanese" if j else SCRIPTS[b] for n, j, b in zip(letters, kana, best)]


def is_separator_run(text: str) -> bool:
    """A token that is one character repeated (`####`, `----`, `====`, runs of spaces or newlines):
    the longest-tokens table groups these, as they pack many characters but spell nothing."""
    return len(text) >= 2 and len(set(text)) == 1 and not text[0].isalnum()


def log_scale_wanted(values: np.ndarray) -> bool:
    """Whether a histogram of positive values is skewed enough for a log axis: the largest is at least
    ten times the median (token counts of documents, uses of tokens)."""
    values = np.asarray(values, np.float64)
    values = values[values > 0]
    return len(values) > 1 and float(values.max()) >= 10 * float(np.median(values))
