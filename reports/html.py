"""`tokenmill report`: one self-contained HTML page with PNG plots embedded (no CDN, loads offline).

It teaches what the tokens are: sample rows drawn token by token, how much text
a token packs, the longest tokens (separator runs grouped), figures per source;
for images and clips the originals beside their reconstructions at one scale;
codebook usage; errors; throughput when the run was long enough to say anything.
"""
from __future__ import annotations

import base64
import html
import io
import os
from typing import Any

import numpy as np

from tokenmill.reports.boundaries import boundary_html, spans_of, visible_cell
from tokenmill.reports.compare_page import PAGE_CSS, Raw, table
from tokenmill.reports.dataset import DatasetView, NotLocalError, png_bytes
from tokenmill.reports.stats import (LONG_TOKEN_CHARS, codebook_usage, error_summary, is_separator_run,
                                     log_scale_wanted, throughput, token_granularity)

UNIT = {"text": "document", "image": "image", "video": "clip"}
STYLE = PAGE_CSS
SAMPLE_TEXT_ROWS = 5
SAMPLE_TOKENS = 400  # a sample row is drawn up to this many tokens
PICTURE_BOX = 240  # the largest sample picture is drawn this many screen pixels across (or 4x, if smaller)
# Throughput over time means something only for a run long enough to have a shape: at least this many
# seconds and blocks written. A shorter run gets its overall rate in one line instead of a plot.
THROUGHPUT_MIN_SECONDS = 10.0
THROUGHPUT_MIN_BLOCKS = 4


def plot(draw, *, size=(6.4, 3.2), alt: str = "plot") -> str:
    """An <img> of a matplotlib figure drawn by draw(ax), as an embedded PNG that scales down on a narrow screen."""
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
    return _img(buf.getvalue(), alt, css="plot")


def _img(png: bytes, alt: str, css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    return f'<img alt="{html.escape(alt)}"{cls} src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def image_tag(png_b64: str, alt: str, width: int, height: int) -> str:
    """An <img> of base64 PNG data drawn at width x height CSS pixels (pixelated when enlarged)."""
    return (f'<img alt="{html.escape(alt)}" class="pix" width="{width}" height="{height}" '
            f'src="data:image/png;base64,{png_b64}">')


def _picture(image: np.ndarray, alt: str, scale: float) -> str:
    return image_tag(base64.b64encode(png_bytes(image)).decode(), alt, round(image.shape[1] * scale),
                     round(image.shape[0] * scale))


def _scale(shapes: list[tuple[int, int]]) -> float:
    """One scale for every picture of a section: the largest fits PICTURE_BOX, small ones at most 4x."""
    largest = max((max(h, w) for h, w in shapes), default=1)
    return min(4.0, PICTURE_BOX / max(1, largest))


def _token_counts(view: DatasetView) -> np.ndarray:
    counts = np.zeros(int(view.manifest.tokenizer.get("vocab_size") or 1), np.int64)
    for t in view.tables(["tokens"]):
        values = t.column("tokens").combine_chunks().flatten().to_numpy().astype(np.int64)
        counts += np.bincount(values, minlength=len(counts))[:len(counts)]
    return counts


def _bars(hist: dict[int, int], xlabel: str, title: str, mark: float | None = None):
    log = log_scale_wanted(np.array(list(hist.values())))

    def draw(ax):
        ax.bar(list(hist), list(hist.values()), color="#4c72b0")
        if mark is not None:
            ax.axvline(mark - 0.5, color="#c44e52", linestyle="--", label=f">= {LONG_TOKEN_CHARS} characters")
            ax.legend()
        ax.set(xlabel=xlabel, ylabel="tokens used" + (" (log scale)" if log else ""), title=title)
        if log:
            ax.set_yscale("log")
    return draw


def _where(row: dict[str, Any]) -> str:
    """The source file's name, and the locator within it where that says more."""
    name = row["source"].rstrip("/").rsplit("/", 1)[-1]
    return name if row["locator"] == "file" else f"{name} {row['locator']}"


def _sample_rows_section(view: DatasetView, n: int) -> str:
    """The first rows drawn token by token: the boundaries a model sees, whitespace visible."""
    try:
        tok = view.tokenizer
    except ValueError as e:
        return f"<h2>Sample rows</h2><p class=note>not available: {html.escape(str(e))}</p>"
    parts = ["<h2>Sample rows, token by token</h2>",
             "<p>Tokens alternate blue and orange; hover for a token's ID. Whitespace is drawn: space ·, tab →, "
             "newline ↵, no-break space ⍽; other invisible characters as a grey pill with their name (CR, NUL, "
             "ESC, NEL, ZWSP, ZWJ, BOM, RLO, IDSP, U+XXXX). A character split across tokens has a dashed red "
             "outline (drawn in the token that completes it; the tokens holding only some of its bytes show them "
             "as \\xNN). Special tokens such as EOS show as their names.</p>"]
    for row in view.rows(n):
        ids = [int(i) for i in row["tokens"]]
        shown = ids[:SAMPLE_TOKENS]
        pieces = tok.token_pieces(shown)
        data = b"".join(pieces)
        more = f", the first {SAMPLE_TOKENS} drawn" if len(ids) > SAMPLE_TOKENS else ""
        parts.append(f'<h3>{html.escape(_where(row))} <span class=note>{len(ids)} tokens{more}</span></h3>'
                     f'<div class="bv" data-row="{html.escape(row["id"])}">'
                     f'{boundary_html(data, spans_of(pieces), shown)}</div>')
    return "".join(parts)


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
    g = token_granularity(counts, token_bytes, top=int((counts > 0).sum()))
    runs: dict[str, dict[str, int]] = {}
    words = []
    for t in g["longest"]:
        if is_separator_run(t["text"]):
            r = runs.setdefault(t["text"][0], {"tokens": 0, "shortest": t["chars"], "longest": t["chars"], "uses": 0})
            r["tokens"] += 1
            r["uses"] += t["count"]
            r["shortest"], r["longest"] = min(r["shortest"], t["chars"]), max(r["longest"], t["chars"])
        elif len(words) < 20:
            words.append(t)
    longest = [[t["id"], Raw(f"<code>{visible_cell(t['text'])}</code>"), t["chars"], t["bytes"], t["count"]]
               for t in words]
    run_rows = [[Raw(f"<code>{visible_cell(ch)}</code>"), r["tokens"], f"{r['shortest']}–{r['longest']}", r["uses"]]
                for ch, r in sorted(runs.items(), key=lambda kv: (-kv[1]["longest"], kv[0]))]
    return "".join([
        "<h2>Granularity: characters and bytes per token</h2>",
        f"<p>{g['tokens']} text tokens used, {g['distinct_tokens']} distinct"
        f"{f' ({markers} special tokens such as BOS/EOS left out)' if markers else ''}. On average a token packs "
        f"<b>{g['chars_per_token']:.2f} characters</b> ({g['bytes_per_token']:.2f} bytes); "
        f"<b>{g['share_long']:.1%}</b> of tokens pack {LONG_TOKEN_CHARS} or more characters, "
        "which a model must spell out from one ID.</p>",
        plot(_bars(g["chars_hist"], "characters per token", "characters per token (by use)", LONG_TOKEN_CHARS),
             alt="characters per token"),
        plot(_bars(g["bytes_hist"], "bytes per token", "bytes per token (by use)"), alt="bytes per token"),
        "<h3>Longest tokens used</h3>",
        "<p>Whitespace drawn as in the sample rows. Runs of one repeated symbol are grouped below.</p>",
        table(["id", "token", "characters", "bytes", "uses"], longest, {0, 2, 3, 4}),
        "<h3>Separator runs</h3>" + (
            "<p>Tokens that are one character repeated (<code>####</code>, <code>----</code>, runs of spaces or "
            "newlines): they pack many characters but spell nothing.</p>"
            + table(["repeated character", "distinct tokens", "lengths", "uses"], run_rows, {1, 3})
            if run_rows else "<p class=note>None used.</p>")])


def _per_source_section(view: DatasetView, unit: str) -> str:
    totals: dict[str, list[int]] = {}
    for t in view.tables(["source", "num_tokens"]):
        for source, n in zip(t.column("source").to_pylist(), t.column("num_tokens").to_pylist(), strict=True):
            acc = totals.setdefault(source, [0, 0])
            acc[0] += 1
            acc[1] += int(n)
    all_tokens = sum(v[1] for v in totals.values()) or 1
    rows = [[source.rstrip("/").rsplit("/", 1)[-1], n, tokens, f"{tokens / n:,.1f}", f"{tokens / all_tokens:.1%}"]
            for source, (n, tokens) in sorted(totals.items(), key=lambda kv: (-kv[1][1], kv[0]))[:50]]
    note = f"<p class=note>The 50 largest of {len(totals)} sources.</p>" if len(totals) > 50 else ""
    return ("<h2>By source</h2>" + table(["source", f"{unit}s", "tokens", f"tokens per {unit}", "share of tokens"],
                                         rows, {1, 2, 3, 4}) + note)


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
        plot(draw, alt="codebook usage")])


def _reconstructions(view: DatasetView, rows: list[dict[str, Any]], what: str
                     ) -> tuple[list[tuple[np.ndarray | None, str | None]], str | None]:
    """Each row's reconstruction as `tokenmill decode` makes it (view.reconstruction), or None and why; and, where
    the section can show none at all, the plain reason: the tokenizer cannot be loaded, or it has no decoder."""
    try:
        spec = getattr(view.tokenizer, "spec", None) or view.manifest.tokenizer.get("spec")
    except ValueError as e:  # a tokenizer file that moved or is not local (never fetched), or a new fingerprint
        return [(None, None)] * len(rows), f"No reconstructions: the tokenizer is not available: {e}"
    except Exception as e:  # noqa: BLE001 - it cannot load here (a model built for a device this machine lacks)
        return [(None, None)] * len(rows), (f"No reconstructions: the tokenizer cannot be loaded here: "
                                            f"{type(e).__name__}: {e}")
    out: list[tuple[np.ndarray | None, str | None]] = []
    for row in rows:
        try:
            out.append((view.reconstruction(row), None))
        except NotImplementedError as e:  # an encoder without a decoder (TorchScript, torch.export)
            return [(None, None)] * len(rows), (f"No reconstructions: {spec} has no decoder, so its tokens cannot be "
                                                f"turned back into {what}; only the originals are shown ({e}).")
        except Exception as e:  # noqa: BLE001 - one row's tokens that do not decode: say so under it
            out.append((None, f"no reconstruction: {type(e).__name__}: {e}"))
    return out, None


def _fidelity_text(score: tuple[float, float] | None) -> str:
    if score is None:
        return ""
    p, s = score
    return "lossless" if np.isinf(p) else f"PSNR {p:.1f} dB, SSIM {s:.3f}"


def _reconstruction_section(view: DatasetView, samples: int) -> str:
    """Original and reconstruction side by side, at one scale, labelled by file, with PSNR and SSIM."""
    from tokenmill.reports.compare import fidelity

    rows = view.rows(samples)
    decoded, missing = _reconstructions(view, rows, "pixels")
    shown = []
    for row, (recon, failed) in zip(rows, decoded, strict=True):
        try:
            original, why = view.original_image(row), None
        except NotLocalError as e:  # a URL, say: never fetched; say why instead
            original, why = None, f"original not shown: {e}"
        except Exception as e:  # the source moved or is unreadable: show the reconstruction alone
            original, why = None, f"original unavailable: {type(e).__name__}"
        score = fidelity(recon, original) if recon is not None and original is not None else None
        shown.append((row, recon, original, why, failed, score))
    scale = _scale([(r["height"], r["width"]) for r in rows])
    pairs = []
    for row, recon, original, why, failed, score in shown:
        label = _where(row)
        figures = [f"<figure>{_picture(original, f'original {label}', scale)}<figcaption>original</figcaption></figure>"
                   if original is not None else f"<span class=note>{html.escape(why)}</span>"]
        if recon is not None:
            figures.append(f'<figure>{_picture(recon, f"reconstruction {label}", scale)}'
                           f'<figcaption>reconstruction {html.escape(_fidelity_text(score))}</figcaption></figure>')
        elif failed:
            figures.append(f"<span class=note>{html.escape(failed)}</span>")
        pairs.append(f'<h3>{html.escape(label)} <span class=note>{row["width"]}×{row["height"]}</span></h3>'
                     f'<div class="grid">{"".join(figures)}</div>')
    finite = [(_where(r[0]), r[5][0]) for r in shown if r[5] is not None and np.isfinite(r[5][0])]
    parts = ["<h2>Reconstructions</h2>"]
    if missing:
        parts.append(f"<p class=note>{html.escape(missing)}</p>")
    parts += [f"<p>Each file as tokenized (left) and decoded from its tokens (right), as <code>tokenmill decode</code> "
              f"decodes them, all at one scale ({scale:.2g} screen pixels per image pixel).</p>", *pairs]
    if finite:
        def draw(ax):
            names = [n for n, _ in finite]
            ax.bar(range(len(finite)), [s for _, s in finite], color="#8172b2")
            mean = float(np.mean([s for _, s in finite]))
            ax.axhline(mean, color="#999", linestyle="--", label=f"mean {mean:.1f} dB")
            ax.set_xticks(range(len(finite)), names, rotation=30, ha="right", fontsize=7)
            ax.set(ylabel="PSNR (dB)", title="reconstruction PSNR by file")
            ax.legend()
        parts.append(plot(draw, alt="reconstruction PSNR by file"))
    elif shown and all(r[5] is not None for r in shown):
        parts.append(f"<p>All {len(shown)} samples reconstruct exactly (PSNR infinite).</p>")
    return "".join(parts)


def _clips_section(view: DatasetView, samples: int) -> str:
    """Contact sheets of each sample clip's frames as the build decoded them and as its tokens decode (as
    `tokenmill decode` draws them), at one scale, with PSNR and SSIM over the frames."""
    from tokenmill.reports.compare import fidelity
    from tokenmill.reports.render import contact_sheet

    rows = view.rows(max(1, min(samples, 4)))
    decoded, missing = _reconstructions(view, rows, "frames")
    sheets = []
    for row, (recon, failed) in zip(rows, decoded, strict=True):
        try:
            original, why = view.original_clip(row), None
        except NotLocalError as e:
            original, why = None, f"original not shown: {e}"
        except Exception as e:
            original, why = None, f"original unavailable: {type(e).__name__}: {e}"
        score = (fidelity(recon, original) if recon is not None and original is not None
                 and recon.shape == original.shape else None)
        sheets.append((row, None if recon is None else contact_sheet(recon),
                       None if original is None else contact_sheet(original), why, failed, score))
    scale = min(2.0, _scale([p.shape[:2] for s in sheets for p in s[1:3] if p is not None]) * 2)
    parts = ["<h2>Clips: frames as decoded and from the tokens</h2>"]
    if missing:
        parts.append(f"<p class=note>{html.escape(missing)}</p>")
    parts.append("<p>Each clip's frames left to right, top to bottom: as the build decoded them (top) and "
                 "reconstructed from the tokens as <code>tokenmill decode</code> draws them (below), at one scale; "
                 "PSNR and SSIM over the frames.</p>")
    for row, recon, original, why, failed, score in sheets:
        label = f"{_where(row)}, {row.get('clip_start')}–{row.get('clip_end')} s"
        parts.append(f"<h3>{html.escape(label)}</h3><div class=sheets>")
        if original is not None:
            parts.append(f"<figure>{_picture(original, f'original frames {label}', scale)}"
                         "<figcaption>original frames</figcaption></figure>")
        else:
            parts.append(f"<p class=note>{html.escape(why or '')}</p>")
        if recon is not None:
            text = _fidelity_text(score)
            parts.append(f"<figure>{_picture(recon, f'reconstructed frames {label}', scale)}"
                         f"<figcaption>reconstructed frames{f' ({html.escape(text)})' if text else ''}"
                         "</figcaption></figure>")
        elif failed:
            parts.append(f"<p class=note>{html.escape(failed)}</p>")
        parts.append("</div>")
    return "".join(parts)


def _errors_section(view: DatasetView) -> str:
    groups = error_summary(view.errors())
    if not groups:
        return "<h2>Errors</h2><p>No errors: every input record became a row.</p>"
    rows = [[g["stage"], g["error_type"], g["count"],
             Raw("<br>".join(html.escape(f"{e['source']} {e['locator']}: {e['message']}") for e in g["examples"]))]
            for g in groups]
    return "<h2>Errors</h2>" + table(["stage", "type", "count", "examples"], rows, {2})


def _throughput_section(view: DatasetView) -> str:
    t = throughput(view.manifest.timing)
    if t is None:
        return "<h2>Throughput</h2><p class=note>not recorded by the build that wrote this dataset.</p>"
    rate = t["tokens"][-1] / t["total_seconds"] if t["total_seconds"] > 0 else float("nan")
    blocks = len(t["seconds"]) - 1
    line = (f"<h2>Throughput</h2><p>{int(t['tokens'][-1])} tokens in {t['total_seconds']:.1f} s: "
            f"{rate:,.0f} tokens/s overall, {blocks} blocks written.")
    if t["total_seconds"] < THROUGHPUT_MIN_SECONDS or blocks < THROUGHPUT_MIN_BLOCKS:
        return (line + f" <span class=note>No plot over time: the run was under {THROUGHPUT_MIN_SECONDS:g} s or "
                f"wrote fewer than {THROUGHPUT_MIN_BLOCKS} blocks, too short for its shape to mean anything "
                "(start-up dominates).</span></p>")

    def draw(ax):
        ax.step(t["seconds"], t["tokens"], where="post", color="#dd8452")
        ax.set(xlabel="seconds since the build started", ylabel="tokens written", title="throughput over the run")

    return line + "</p>" + plot(draw, alt="throughput over the run")


def _lengths_section(lengths: np.ndarray, unit: str) -> str:
    if not len(lengths):
        return "<p>No rows.</p>"
    log = log_scale_wanted(lengths) and lengths.min() > 0

    def hist(ax):
        if log:
            bins = np.geomspace(max(1, lengths.min()), lengths.max() + 1, 40)
            ax.hist(lengths, bins=bins, color="#4c72b0")
            ax.set_xscale("log")
        else:
            ax.hist(lengths, bins=min(50, max(1, len(np.unique(lengths)))), color="#4c72b0")
        ax.set(xlabel=f"tokens per {unit}" + (" (log scale)" if log else ""), ylabel=f"{unit}s",
               title=f"tokens per {unit}")

    return (f"<p>mean {lengths.mean():.1f}, median {np.median(lengths):.0f}, max {lengths.max()}"
            + (" (a skewed spread: log scale)" if log else "") + "</p>" + plot(hist, alt=f"tokens per {unit}"))


def report_html(root: str, *, samples: int = 8) -> str:
    """The report page for the dataset at `root`."""
    view = DatasetView(root)
    m = view.manifest
    unit = UNIT[m.modality]
    lengths = view.column("num_tokens")
    parts = ["<!doctype html><html lang=en><head><meta charset=utf-8>"
             '<meta name="viewport" content="width=device-width,initial-scale=1">'
             f"<title>tokenmill report: {html.escape(root)}</title><style>{STYLE}</style></head><body>",
             f"<h1>tokenmill report</h1><p><code>{html.escape(root)}</code>: {m.modality}, "
             f"{html.escape(str(m.tokenizer.get('spec')))} ({html.escape(view.kind)} tokens), "
             f"built {html.escape(m.created_at)}</p>",
             table(["rows", "tokens", "errors", "inputs", "data files"],
                   [[m.rows, m.tokens, m.errors, len(m.inputs), len(m.files)]], {0, 1, 2, 3, 4}),
             f"<h2>Tokens per {unit}</h2>", _lengths_section(lengths, unit)]
    if m.modality == "text" and len(lengths):
        parts += [_sample_rows_section(view, min(samples, SAMPLE_TEXT_ROWS)), _text_section(view)]
    elif len(lengths):
        if view.kind == "hard":
            parts.append(_codebook_section(view))
        if m.modality == "image":
            parts.append(_reconstruction_section(view, samples))
        else:
            parts.append(_clips_section(view, samples))
    if len(lengths):
        parts.append(_per_source_section(view, unit))
    parts += [_errors_section(view), _throughput_section(view), "</body></html>"]
    return "\n".join(parts)


def write_report(root: str, out_dir: str, *, samples: int = 8) -> str:
    """Write OUT/index.html; returns its path. The page is drawn first and written whole, so a report that
    fails leaves the one already there."""
    from tokenmill.schemas.storage import write_bytes_atomic

    page = report_html(root, samples=samples)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "index.html")
    write_bytes_atomic(path, page.encode("utf-8"))
    return path
