"""`tokenmill report`: one self-contained HTML page with PNG plots embedded (no CDN, loads offline)."""
from __future__ import annotations

import base64
import html
import io
import os
from typing import Any

import numpy as np

from tokenmill.reports.dataset import DatasetView, NotLocalError, png_bytes
from tokenmill.reports.render import visible
from tokenmill.reports.stats import LONG_TOKEN_CHARS, codebook_usage, error_summary, throughput, token_granularity
from tokenmill.transforms.tokenizers.codebook import psnr

UNIT = {"text": "document", "image": "image", "video": "clip"}
STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}
code{background:#f3f3f3;padding:0 .2em}.pair img{image-rendering:pixelated;height:128px;margin-right:4px}
.pair{display:inline-block;margin:0 1.5em 1em 0;font-size:.85em}.note{color:#666}"""


def _plot(draw, *, size=(6.4, 3.2)) -> str:
    """An <img> of a matplotlib figure drawn by draw(ax), as an embedded PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=100)
    try:
        draw(ax)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return _img(buf.getvalue(), "plot")


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else html.escape(str(c))}</td>" for c in r)
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


class _Raw(str):
    """Table cell HTML that is already escaped."""


def _token_counts(view: DatasetView) -> np.ndarray:
    counts = np.zeros(int(view.manifest.tokenizer.get("vocab_size") or 1), np.int64)
    for t in view.tables(["tokens"]):
        values = t.column("tokens").combine_chunks().flatten().to_numpy().astype(np.int64)
        counts += np.bincount(values, minlength=len(counts))[:len(counts)]
    return counts


def _bars(hist: dict[int, int], xlabel: str, title: str, mark: float | None = None):
    def draw(ax):
        ax.bar(list(hist), list(hist.values()), color="#4c72b0")
        if mark is not None:
            ax.axvline(mark - 0.5, color="#c44e52", linestyle="--", label=f">= {LONG_TOKEN_CHARS} characters")
            ax.legend()
        ax.set(xlabel=xlabel, ylabel="tokens used", title=title)
    return draw


def _text_section(view: DatasetView) -> str:
    try:
        token_bytes = view.tokenizer.token_bytes
    except ValueError as e:  # a tokenizer file that moved, or that is not local (never fetched)
        return f"<h2>Granularity</h2><p class=note>not available: {html.escape(str(e))}</p>"
    counts = _token_counts(view)
    # BOS/EOS are markers, not text: they would count as long tokens (<|endoftext|> is 13 characters).
    special = [i for i in (view.manifest.tokenizer.get("special_tokens") or {}).values() if i < len(counts)]
    markers = int(counts[special].sum())
    counts[special] = 0
    g = token_granularity(counts, token_bytes)
    longest = [[t["id"], _Raw(f"<code>{html.escape(visible(t['text']))}</code>"), t["chars"], t["bytes"], t["count"]]
               for t in g["longest"]]
    return "".join([
        "<h2>Granularity: characters and bytes per token</h2>",
        f"<p>{g['tokens']} text tokens used, {g['distinct_tokens']} distinct"
        f"{f' ({markers} special tokens such as BOS/EOS left out)' if markers else ''}. On average a token packs "
        f"<b>{g['chars_per_token']:.2f} characters</b> ({g['bytes_per_token']:.2f} bytes); "
        f"<b>{g['share_long']:.1%}</b> of tokens pack {LONG_TOKEN_CHARS} or more characters, "
        "which a model must spell out from one ID.</p>",
        _plot(_bars(g["chars_hist"], "characters per token", "characters per token (by use)", LONG_TOKEN_CHARS)),
        _plot(_bars(g["bytes_hist"], "bytes per token", "bytes per token (by use)")),
        "<h3>Longest tokens used</h3>", _table(["id", "token", "characters", "bytes", "uses"], longest)])


def _codebook_section(view: DatasetView) -> str:
    u = codebook_usage(_token_counts(view), int(view.manifest.tokenizer["vocab_size"]))

    def draw(ax):
        ax.bar(np.arange(u["vocab_size"]), np.sort(u["counts"])[::-1], width=1.0, color="#55a868")
        ax.set(xlabel="code, by use", ylabel="uses", title="codebook usage", yscale="symlog")

    dead = ", ".join(map(str, u["dead_codes"])) + (" ..." if u["dead"] > len(u["dead_codes"]) else "")
    return "".join([
        "<h2>Codebook usage</h2>",
        f"<p>{u['used']} of {u['vocab_size']} codes used; perplexity <b>{u['perplexity']:.1f}</b> "
        f"(the effective number of codes); <b>{u['dead']} dead codes</b>{': ' + dead if u['dead'] else ''}.</p>",
        _plot(draw)])


def _reconstruction_section(view: DatasetView, samples: int) -> str:
    """Original and reconstruction side by side, and PSNR, for the first `samples` images."""
    try:
        tok = view.tokenizer
    except ValueError as e:
        return f"<h2>Reconstructions</h2><p class=note>not available: {html.escape(str(e))}</p>"
    pairs, scores = [], []
    for row in view.rows(samples):
        recon = tok.decode_image(view.payload(row), tuple(row["grid"]), row["height"], row["width"])
        try:
            original = view.original_image(row)
        except NotLocalError as e:  # a URL, say: never fetched; say why instead
            score, first = None, f"<span class=note>original not shown: {html.escape(str(e))}</span>"
        except Exception as e:  # the source moved or is unreadable: show the reconstruction alone
            score, first = None, f"<span class=note>original unavailable: {html.escape(type(e).__name__)}</span>"
        else:
            score, first = psnr(recon, original), _img(png_bytes(original), "original")
        if score is not None:
            scores.append(score)
        label = "" if score is None else ("lossless" if np.isinf(score) else f"PSNR {score:.1f} dB")
        pairs.append(f"<div class=pair>{first}{_img(png_bytes(recon), 'reconstruction')}<br>"
                     f"{html.escape(_where(row))} {label}</div>")
    finite = [s for s in scores if np.isfinite(s)]
    parts = ["<h2>Reconstructions</h2>",
             "<p>Each pair: the image as tokenized (left) and decoded from its tokens (right).</p>", *pairs]
    if finite:
        def draw(ax):
            ax.plot(range(len(finite)), finite, "o", color="#8172b2")
            ax.axhline(float(np.mean(finite)), color="#999", linestyle="--", label=f"mean {np.mean(finite):.1f} dB")
            ax.set(xlabel="sample", ylabel="PSNR (dB)", title="reconstruction PSNR")
            ax.legend()
        parts.append(_plot(draw))
    elif scores:
        parts.append(f"<p>All {len(scores)} samples reconstruct exactly (PSNR infinite).</p>")
    return "".join(parts)


def _where(row: dict[str, Any]) -> str:
    """The source file's name, and the locator within it where that says more."""
    name = row["source"].rstrip("/").rsplit("/", 1)[-1]
    return name if row["locator"] == "file" else f"{name} {row['locator']}"


def _errors_section(view: DatasetView) -> str:
    groups = error_summary(view.errors())
    if not groups:
        return "<h2>Errors</h2><p>No errors: every input record became a row.</p>"
    rows = [[g["stage"], g["error_type"], g["count"],
             _Raw("<br>".join(html.escape(f"{e['source']} {e['locator']}: {e['message']}") for e in g["examples"]))]
            for g in groups]
    return "<h2>Errors</h2>" + _table(["stage", "type", "count", "examples"], rows)


def _throughput_section(view: DatasetView) -> str:
    t = throughput(view.manifest.timing)
    if t is None:
        return "<h2>Throughput</h2><p class=note>not recorded by the build that wrote this dataset.</p>"

    def draw(ax):
        ax.step(t["seconds"], t["tokens"], where="post", color="#dd8452")
        ax.set(xlabel="seconds since the build started", ylabel="tokens written", title="throughput over the run")

    rate = t["tokens"][-1] / t["total_seconds"] if t["total_seconds"] > 0 else float("nan")
    return (f"<h2>Throughput</h2><p>{int(t['tokens'][-1])} tokens in {t['total_seconds']:.1f} s: "
            f"{rate:,.0f} tokens/s overall, {len(t['seconds']) - 1} blocks written.</p>" + _plot(draw))


def report_html(root: str, *, samples: int = 8) -> str:
    """The report page for the dataset at `root`."""
    view = DatasetView(root)
    m = view.manifest
    unit = UNIT[m.modality]
    lengths = view.column("num_tokens")

    def hist(ax):
        ax.hist(lengths, bins=min(50, max(1, len(np.unique(lengths)))), color="#4c72b0")
        ax.set(xlabel=f"tokens per {unit}", ylabel=f"{unit}s", title=f"tokens per {unit}")

    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>tokenmill report: {html.escape(root)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>tokenmill report</h1><p><code>{html.escape(root)}</code>: {m.modality}, "
             f"{html.escape(str(m.tokenizer.get('spec')))} ({view.kind} tokens), built {html.escape(m.created_at)}</p>",
             _table(["rows", "tokens", "errors", "inputs", "data files"],
                    [[m.rows, m.tokens, m.errors, len(m.inputs), len(m.files)]]),
             f"<h2>Tokens per {unit}</h2>",
             f"<p>mean {lengths.mean():.1f}, median {np.median(lengths):.0f}, max {lengths.max()}</p>" + _plot(hist)
             if len(lengths) else "<p>No rows.</p>"]
    if m.modality == "text" and len(lengths):
        parts.append(_text_section(view))
    elif len(lengths):
        if view.kind == "hard":
            parts.append(_codebook_section(view))
        if m.modality == "image":
            parts.append(_reconstruction_section(view, samples))
    parts += [_errors_section(view), _throughput_section(view), "</body></html>"]
    return "\n".join(parts)


def write_report(root: str, out_dir: str, *, samples: int = 8) -> str:
    """Write OUT/index.html; returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(report_html(root, samples=samples))
    return path
