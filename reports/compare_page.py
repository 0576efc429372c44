"""The `tokenmill compare` page: compare.json drawn as one self-contained HTML page (no CDN, images inline)."""
from __future__ import annotations

import html
from typing import Any

from tokenmill.reports.boundaries import CSS as BOUNDARY_CSS
from tokenmill.reports.boundaries import boundary_html, visible_cell

PAGE_CSS = """*{box-sizing:border-box}body{font-family:system-ui,sans-serif;max-width:1160px;margin:0 auto;padding:1em;
color:#222;line-height:1.45;overflow-wrap:break-word}h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #eee}
.scroll{overflow-x:auto;max-width:100%;margin:.5em 0}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:.25em .55em;text-align:left;vertical-align:top}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f6f6f6}
.best{background:#e3f4e1;font-weight:600}.note{color:#666}code{background:#f3f3f3;padding:0 .2em;overflow-wrap:anywhere}
img{max-width:100%;height:auto}.plot{max-width:760px;width:100%}
.tokname{font-weight:600;font-size:.9em;margin-top:.6em}.ex{margin:1.2em 0 1.6em}
.pieces{display:inline;padding:.1em .2em;line-height:2.1}td.word .bv{white-space:pre}.bv{unicode-bidi:isolate}
.grid{display:flex;flex-wrap:wrap;gap:10px 14px;align-items:flex-start}
figure{margin:0}figcaption{font-size:.8em;color:#444;max-width:200px;overflow-wrap:anywhere}
.pix{image-rendering:pixelated}.sheets figure{margin:.3em 0}.sheets figcaption{max-width:none}""" + "\n" + BOUNDARY_CSS


def page(title: str, body: list[str]) -> str:
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{PAGE_CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>")


def table(header: list[str], rows: list[list[Any]], numeric: set[int] = frozenset()) -> str:
    """A table that scrolls sideways on a narrow screen; cells are escaped unless they are Raw."""
    def cell(tag: str, i: int, c: Any) -> str:
        cls = ' class="n"' if i in numeric else ""
        if isinstance(c, Raw):
            return f"<{tag}{cls if not c.cls else f' class={chr(34)}{c.cls}{chr(34)}'}>{c}</{tag}>"
        return f"<{tag}{cls}>{html.escape(str(c))}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


class Raw(str):
    """Cell HTML that is already escaped, with an optional class."""

    cls = ""

    def __new__(cls, value: str, css: str = "") -> "Raw":
        out = super().__new__(cls, value)
        out.cls = css
        return out


def short(spec: str, limit: int = 24) -> str:
    """A spec short enough for a column header: a long path keeps its family and last part (hf:…/bpe0)."""
    if len(spec) <= limit or "/" not in spec:
        return spec
    family, _, arg = spec.partition(":")
    return f"{family}:…/{arg.rstrip('/').rsplit('/', 1)[-1]}"


def _spec_cell(spec: str) -> Raw:
    return Raw(f'<code title="{html.escape(spec)}">{html.escape(short(spec))}</code>')


def _num(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"


def _plot_tokens_per_char(result: dict[str, Any]) -> str:
    """Grouped horizontal bars: tokens per character of each tokenizer for each script (and overall)."""
    from tokenmill.reports.html import plot

    specs = [t["spec"] for t in result["tokenizers"]]
    groups = [("all text", {t["spec"]: t["tokens_per_char"] for t in result["tokenizers"]})]
    groups += [(s["name"], {spec: v["tokens_per_char"] for spec, v in s["tokenizers"].items()})
               for s in result["by_script"]]
    if not result["documents"]:
        return ""

    def draw(ax):
        import numpy as np

        height = 0.8 / len(specs)
        y = np.arange(len(groups))
        for k, spec in enumerate(specs):
            ax.barh(y + k * height, [g[1][spec] for g in groups], height=height, label=short(spec))
        ax.set_yticks(y + height * (len(specs) - 1) / 2, [g[0] for g in groups])
        ax.invert_yaxis()
        ax.set(xlabel="tokens per character (fewer: more text per token)")
        ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(3, len(specs)), frameon=False)

    return plot(draw, size=(7.2, 1.6 + 0.16 * len(groups) * max(2, len(specs))), alt="tokens per character")


def text_page(result: dict[str, Any], title: str) -> str:
    toks = result["tokenizers"]
    specs = [t["spec"] for t in toks]
    long_chars = result["long_token_chars"]
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p>{result['documents']:,} documents, {result['chars']:,} characters ({result['bytes']:,} UTF-8 bytes), "
            f"each tokenized by {len(toks)} tokenizers. A tokenizer decides what a model can see: text packed into "
            "one token is one ID to the model, which must learn that ID's spelling by heart; text split into "
            "bytes costs sequence length. The figures below cover the same text for every tokenizer.</p>"]
    if result["errors"]["count"]:
        body.append(f"<p class=note>{result['errors']['count']} record(s) could not be measured (see Errors).</p>")
    body += _refusal_notes(toks, "document")

    best_tpc = min((t["tokens_per_char"] for t in toks if t["tokens"]), default=None)
    rows = [[_spec_cell(t["spec"]), f"{t['vocab_size']:,}",
             "refused every document" if t.get("refused_all") else f"{t['tokens']:,}",
             Raw(_num(t["tokens_per_char"]), "n best" if t["tokens_per_char"] == best_tpc else "n"),
             _num(t["tokens_per_byte"]), _num(t["chars_per_token"], 2), f"{t['share_long']:.1%}",
             f"{t['vocab_used']:.1%} ({t['distinct_tokens']:,})"] for t in toks]
    body += ["<h2>Tokens per character</h2>",
             "<p>Tokens per character is what a context window costs: 0.25 means four characters per token. "
             "Tokens per byte compares scripts fairly (a Cyrillic or Devanagari letter is 2 or 3 UTF-8 bytes; "
             f"the <code>bytes</code> tokenizer is exactly 1). <b>Long tokens</b> pack {long_chars} or more "
             "characters: words a model sees whole and cannot easily spell. The best tokens per character is "
             "shaded.</p>",
             table(["tokenizer", "vocabulary", "tokens", "tokens/char", "tokens/byte", "chars/token",
                    f"tokens ≥ {long_chars} chars", "vocabulary used"], rows, {1, 2, 3, 4, 5, 6, 7}),
             _plot_tokens_per_char(result)]

    def by_group(groups: list[dict[str, Any]], what: str) -> str:
        rows = []
        for g in groups:
            values = [g["tokenizers"][s]["tokens_per_char"] for s in specs]
            measured = [v for v, t in zip(values, toks, strict=True) if not t.get("refused_all")]
            best = min(measured) if g["chars"] and measured else None
            name = g["name"].rstrip("/").rsplit("/", 1)[-1] if what == "source" else g["name"]
            rows.append([name, f"{g['documents']:,}", f"{g['chars']:,}", _num(g["bytes"] / max(1, g["chars"]), 2)]
                        + [Raw(_num(v), "n best" if v == best else "n") for v in values])
        return table([what, "documents", "characters", "bytes/char"] + [f"{short(s)} tokens/char" for s in specs], rows,
                     set(range(1, 4 + len(specs))))

    body += ["<h2>By script</h2>",
             "<p>Each document counts under the script most of its letters are written in (Unicode ranges of "
             "letters; digits and punctuation do not count, so code and numbers fall under Latin or "
             "<i>no letters</i>). Byte-level tokenizers pay most where a script takes several bytes per "
             "letter and their vocabulary saw little of it.</p>", by_group(result["by_script"], "script"),
             "<h2>By source</h2>", by_group(result["by_source"], "source")]

    body += ["<h2>Spelling risk: frequent words packed into one token</h2>",
             f"<p>The most used tokens of each tokenizer that are one word of {long_chars} or more characters, "
             "and how the other tokenizers split the same text (boundaries drawn as in the views below). Where "
             "one tokenizer has one ID and another several, only the second lets a model see the letters.</p>"]
    for spec in specs:
        words = result["spelling_risk"].get(spec, [])
        body.append(f"<h3><code>{html.escape(spec)}</code></h3>")
        if not words:
            body.append(f"<p class=note>No word of {long_chars} or more characters is one token here.</p>")
            continue
        others = [s for s in specs if s != spec]
        rows = []
        for w in words:
            data = w["text"].encode("utf-8", "surrogatepass")
            cells = [Raw(f'<span class="bv pieces">{boundary_html(data, [(0, len(data))], [w["id"]])}</span>',
                         "word"), w["chars"], f"{w['uses']:,}"]
            for o in others:
                split = w["others"][o]
                if "refused" in split:
                    cells.append(Raw(f'<span class=note>refused: {html.escape(split["refused"])}</span>'))
                    continue
                spans = [tuple(x) for x in split["spans"]]
                cells.append(Raw(f'<span class="bv pieces">{boundary_html(data, spans, split["ids"])}</span> '
                                 f'<span class=note>{split["tokens"]}</span>'))
            rows.append(cells)
        body.append(table(["token", "chars", "uses"] + [f"{short(o)} splits it" for o in others], rows, {1, 2}))

    body += ["<h2>The same text, token by token</h2>",
             "<p>Each excerpt once per tokenizer. Tokens alternate blue and orange; hover for the token's ID. "
             "Whitespace is drawn: space ·, tab →, newline ↵, no-break space ⍽; a character that would show as "
             "nothing or as something else is a grey pill with its name: controls (CR, NUL, ESC, NEL), "
             "zero-width and bidi marks (ZWSP, ZWJ, BOM, RLO), odd spaces (IDSP, U+2009). A character split "
             "across tokens (a byte-level tokenizer cutting a multi-byte character) has a dashed red outline: it "
             "is drawn in the token that completes it, and the tokens holding only some of its bytes show them "
             "as \\xNN.</p>"]
    for k, ex in enumerate(result["examples"]):
        where = ex["source"].rstrip("/").rsplit("/", 1)[-1]
        body.append(f'<div class="ex" data-example="{k}"><h3>{html.escape(ex["script"])}: '
                    f'{html.escape(where)} <span class=note>{html.escape(ex["locator"])}, '
                    f'{len(ex["text"])} characters</span></h3>')
        data = ex["text"].encode("utf-8", "surrogatepass")
        for spec in specs:
            if spec not in ex["views"]:
                body.append(f'<div class="tokname">{html.escape(spec)}: refused every document</div>')
                continue
            v = ex["views"][spec]
            body.append(f'<div class="tokname">{html.escape(spec)}: {len(v["ids"])} tokens</div>'
                        f'<div class="bv" data-spec="{html.escape(spec)}">'
                        f'{boundary_html(data, [tuple(s) for s in v["spans"]], v["ids"])}</div>')
        body.append("</div>")

    body += ["<h2>Vocabulary usage</h2>",
             "<p>How much of each vocabulary this text used, and its most used tokens. A vocabulary trained on "
             "other text leaves much of itself unused here; its most used tokens show what it spends IDs on.</p>"]
    for t in toks:
        rows = [[i + 1, Raw(f"<code>{visible_cell(tt['text'])}</code>"), tt["id"], f"{tt['uses']:,}",
                 f"{tt['share']:.2%}"] for i, tt in enumerate(t["top_tokens"])]
        body += [f"<h3><code>{html.escape(t['spec'])}</code>: {t['distinct_tokens']:,} of {t['vocab_size']:,} "
                 f"tokens used ({t['vocab_used']:.1%})</h3>",
                 table(["rank", "token", "id", "uses", "share"], rows, {0, 2, 3, 4})]
    body.append(errors_html(result["errors"]))
    return page(title, body)


def _refusal_notes(toks: list[dict[str, Any]], one: str) -> list[str]:
    """What the tokenizers refused: left out of every figure, or, for one that refused every item, set aside."""
    out = []
    refused = [f"{t['refused']} by <code>{html.escape(t['spec'])}</code>" for t in toks
               if t.get("refused") and not t.get("refused_all")]
    if refused:
        out.append(f"<p class=note>{one.capitalize()}s a tokenizer refused are left out of every tokenizer's "
                   f"figures: {', '.join(refused)}.</p>")
    for t in toks:
        if t.get("refused_all"):
            first = t.get("first_refusal") or {}
            out.append(f"<p class=note><b><code>{html.escape(t['spec'])}</code> refused every {one}</b> "
                       f"({t['refused']:,}), so it is set aside: its figures below are empty and the others' "
                       f"cover every {one}. The first refusal: {html.escape(first.get('message', ''))} "
                       f"({html.escape(first.get('source', '').rsplit('/', 1)[-1])} "
                       f"{html.escape(first.get('locator', ''))}).</p>")
    return out


def errors_html(errors: dict[str, Any]) -> str:
    if not errors["count"]:
        return "<h2>Errors</h2><p>None: every record read was measured.</p>"
    rows = [[e["stage"], e["error_type"], e["count"]] for e in errors["by_type"]]
    examples = [[e["source"].rstrip("/").rsplit("/", 1)[-1], e["locator"], e["error_type"], e["message"]]
                for e in errors["examples"]]
    return ("<h2>Errors</h2>" + table(["stage", "type", "count"], rows, {2})
            + "<p>Examples:</p>" + table(["file", "where", "type", "message"], examples))


def image_page(result: dict[str, Any], title: str) -> str:
    """The page of an image compare, or of a video compare (`kind` video: the same figures per clip, tokens per
    second, and contact sheets of each shown clip's frames in place of pictures)."""
    from tokenmill.reports.html import image_tag

    video = result["kind"] == "video"
    one = "clip" if video else "image"
    toks = result["tokenizers"]
    raw = result[f"raw_bytes_per_{one}"]
    if video:
        intro = (f"<p>{result['clips']:,} clips ({result['frames']:,} frames, {result['seconds']:,.1f} s; "
                 f"{result['frames_per_clip']:.1f} frames and {result['seconds_per_clip']:.2f} s per clip on "
                 f"average), each tokenized and decoded again by {len(toks)} tokenizers. Tokens per clip and per "
                 "second are the sequence a model reads; bytes per clip is what the dataset stores; PSNR (over "
                 "every frame) and SSIM (the mean of the frames') say how much of the picture the tokens keep "
                 "(PSNR in dB, higher is closer, infinite when exact; SSIM 1.0 is identical structure).</p>")
    else:
        intro = (f"<p>{result['images']:,} images, each tokenized and decoded again by {len(toks)} tokenizers. "
                 "Tokens per image is the sequence a model reads; bytes per image is what the dataset stores; PSNR "
                 "and SSIM say how much of the picture the tokens keep (PSNR in dB, higher is closer, infinite "
                 "when exact; SSIM 1.0 is identical structure).</p>")
    body = [f"<h1>{html.escape(title)}</h1>", intro]
    body += _refusal_notes(toks, one)
    rows = []
    for t in toks:
        what = (f"hard, {t['vocab_size']:,} codes" if t["kind"] == "hard"
                else f"soft, {t['dim']} × {t['latent_dtype']}")
        if t.get("refused_all"):
            rows.append([_spec_cell(t["spec"]), what, f"refused every {one}"] + ["–"] * (5 + video))
            continue
        psnr = ("cannot decode" if not t["decoded"] else "lossless" if t["lossless"] == t[f"{one}s"] else
                "–" if t["psnr_mean"] is None else f"{t['psnr_mean']:.1f}"
                + (f" ({t['lossless']} lossless)" if t["lossless"] else ""))
        per_item = t[f"bytes_per_{one}"]
        ratio = f"{raw / per_item:.1f}×" if per_item else "–"
        rows.append([_spec_cell(t["spec"]), what, f"{t[f'tokens_per_{one}']:,.1f}"]
                    + ([f"{t['tokens_per_second']:,.1f}"] if video else [])
                    + [f"{per_item:,.0f}", ratio, psnr, "–" if t["ssim_mean"] is None else f"{t['ssim_mean']:.3f}"])
    header = (["tokenizer", "kind", f"tokens/{one}"] + (["tokens/second"] if video else [])
              + [f"bytes/{one}", "vs raw RGB", "PSNR dB (mean)", "SSIM (mean)"])
    body += [f"<h2>Tokens, bytes and fidelity per {one}</h2>",
             table(header, rows, set(range(2, len(header)))),
             f"<p class=note>Raw RGB is {raw:,.0f} bytes per {one} on average (as decoded for tokenizing).</p>"]
    shown = result["shown"]
    if shown and video:
        body += _contact_sheets(shown, image_tag)
    elif shown:
        # one row per file at 1,160 px: the original and each reconstruction side by side
        box = max(96, min(240, (1120 - 14 * len(toks)) // (len(toks) + 1)))
        scale = min(4.0, box / max(max(s["height"], s["width"]) for s in shown))
        body += ["<h2>Originals and reconstructions</h2>",
                 f"<p>All pictures at one scale ({scale:.2g} screen pixels per image pixel), so sizes compare; "
                 "each row is one file.</p>"]
        for s in shown:
            label = _label(s)
            w, h = round(s["width"] * scale), round(s["height"] * scale)
            figures = [f"<figure>{image_tag(s['original_png'], f'original {label}', w, h)}"
                       f"<figcaption>original: {html.escape(label)} ({s['width']}×{s['height']})"
                       "</figcaption></figure>"]
            figures += _reconstructions(s, label, w, h, image_tag)
            body.append(f'<div class="grid">{"".join(figures)}</div><hr>')
    body.append(errors_html(result["errors"]))
    return page(title, body)


def _label(sample: dict[str, Any]) -> str:
    name = sample["source"].rstrip("/").rsplit("/", 1)[-1]
    return name if sample["locator"] == "file" else f"{name} {sample['locator']}"


def _reconstructions(sample: dict[str, Any], label: str, w: int, h: int, image_tag) -> list[str]:
    """A figure per tokenizer: its reconstruction of the sample, with tokens, PSNR and SSIM."""
    figures = []
    for spec, r in sample["reconstructions"].items():
        if r.get("refused"):
            figures.append(f"<figure><figcaption>{html.escape(short(spec))}: refused it</figcaption></figure>")
            continue
        if "png" not in r:
            figures.append(f"<figure><figcaption>{html.escape(short(spec))}: {r['tokens']} tokens; it "
                           "cannot decode, so no reconstruction</figcaption></figure>")
            continue
        score = "lossless" if r["psnr"] in ("inf", None) else f"PSNR {float(r['psnr']):.1f} dB"
        figures.append(f"<figure>{image_tag(r['png'], f'{spec} {label}', w, h)}"
                       f"<figcaption>{html.escape(short(spec))}: {r['tokens']} tokens, {score}, "
                       f"SSIM {r['ssim']:.3f}</figcaption></figure>")
    return figures


def _contact_sheets(shown: list[dict[str, Any]], image_tag) -> list[str]:
    """Each shown clip: a contact sheet of its frames as decoded, then one per tokenizer of the frames its
    tokens decode to, all at one scale, one above the other."""
    def sheet_size(s: dict[str, Any]) -> tuple[int, int]:
        n = len(s["sheet_frames"])
        return n * s["width"] + (n - 1) * 2, s["height"]  # render.contact_sheet: one row, 2-pixel gaps

    scale = min(3.0, 1120 / max(sheet_size(s)[0] for s in shown))
    out = ["<h2>Clips: frames as decoded and from each tokenizer's tokens</h2>",
           f"<p>Each clip's frames left to right (up to {max(len(s['sheet_frames']) for s in shown)}, evenly "
           f"spaced), as decoded for tokenizing (top) and as each tokenizer's tokens decode to (below), all at one "
           f"scale ({scale:.2g} screen pixels per pixel).</p>"]
    for s in shown:
        label = _label(s)
        w, h = (round(v * scale) for v in sheet_size(s))
        frames = ", ".join(map(str, s["sheet_frames"]))
        out.append(f"<h3>{html.escape(label)} <span class=note>{s['width']}×{s['height']}, {s['frames']} frames, "
                   f"{s['clip_start']:g}–{s['clip_end']:g} s at {s['fps']:g} fps; frames {frames} shown</span></h3>")
        figures = [f"<figure>{image_tag(s['original_png'], f'original frames {label}', w, h)}"
                   "<figcaption>original frames</figcaption></figure>"]
        figures += _reconstructions(s, label, w, h, image_tag)
        out.append(f'<div class="sheets">{"".join(figures)}</div><hr>')
    return out


def compare_html(result: dict[str, Any], title: str = "tokenmill compare") -> str:
    return text_page(result, title) if result["kind"] == "text" else image_page(result, title)
