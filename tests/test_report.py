"""`tokenmill report`: the statistics, the page, and the page rendered in headless Chromium."""
from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from tokenmill.pipelines import commands
from tokenmill.reports.stats import codebook_usage, error_summary, throughput, token_granularity
from tests.conftest import read_rows

IMG = re.compile(r'<img alt="([^"]*)"[^>]*? src="data:image/png;base64,([^"]+)">')


def make_report(root: Path, out: Path, capsys) -> str:
    assert commands.report([str(root), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith(str(out / "index.html"))
    return (out / "index.html").read_text()


def images_of(page: str) -> list[tuple[str, np.ndarray]]:
    return [(alt, np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))) for alt, data in IMG.findall(page)]


def test_granularity_counts_characters_bytes_and_long_tokens():
    vocab = {0: b"a", 1: b".DefaultCellStyle", 2: b"\xe5\x88", 3: b"\x86"}
    g = token_granularity(np.array([3, 1, 2, 0]), vocab.__getitem__, top=2)
    assert g["tokens"] == 6 and g["distinct_tokens"] == 3
    assert g["share_long"] == pytest.approx(1 / 6)
    assert g["chars_per_token"] == pytest.approx((3 * 1 + 17 + 0) / 6)
    assert g["bytes_per_token"] == pytest.approx((3 + 17 + 2 * 2) / 6)
    assert g["longest"][0] == {"id": 1, "text": ".DefaultCellStyle", "chars": 17, "bytes": 17, "count": 1}
    assert g["chars_hist"] == {0: 2, 1: 3, 17: 1}


def test_codebook_perplexity_and_dead_codes():
    u = codebook_usage(np.array([5, 5, 5, 5, 0, 0]), 8)
    assert u["perplexity"] == pytest.approx(4.0) and u["used"] == 4 and u["dead_codes"] == [4, 5, 6, 7]
    assert codebook_usage(np.array([9, 0]), 2)["perplexity"] == pytest.approx(1.0)


def test_errors_group_by_stage_and_type_and_throughput_accumulates():
    t = pa.table({"source": ["a", "a", "b"], "locator": ["1", "2", "3"], "stage": ["decode", "decode", "read"],
                  "error_type": ["X", "X", "Y"], "message": ["m1", "m2", "m3"]})
    groups = error_summary(t, examples=1)
    assert [(g["stage"], g["error_type"], g["count"]) for g in groups] == [("decode", "X", 2), ("read", "Y", 1)]
    assert groups[0]["examples"] == [{"source": "a", "locator": "1", "message": "m1"}]
    tp = throughput({"started_at": 100.0, "finished_at": 104.0, "blocks": [[101.0, 2, 10, 0], [103.0, 3, 5, 1]]})
    assert tp["seconds"].tolist() == [0, 1, 3] and tp["tokens"].tolist() == [0, 10, 15]
    assert tp["total_seconds"] == 4 and throughput({}) is None


def test_text_report_shows_granularity_errors_and_throughput(text_dataset, tmp_path, capsys):
    page = make_report(text_dataset, tmp_path / "report", capsys)
    assert "Tokens per document" in page and "Granularity" in page
    assert "<code>.DefaultCellStyle</code></td><td class=\"n\">17</td>" in page
    granularity = page.split("<h2>Granularity")[1]
    assert "(16 special tokens such as BOS/EOS left out)" in page and "endoftext" not in granularity
    errors = re.search(r"<h2>Errors</h2>(.*?)<h2>", page, re.S).group(1)
    assert "<td>decode</td><td>JSONDecodeError</td><td class=\"n\">1</td>" in errors
    assert "docs.jsonl offset:" in errors and "malformed JSON" in errors
    assert "tokens/s overall" in page and "No plot over time: the run was under 10 s" in page
    pictures = images_of(page)
    assert [alt for alt, _ in pictures] == ["tokens per document", "characters per token", "bytes per token"]
    assert all(p.ndim == 3 and p.shape[0] > 100 for _, p in pictures)
    assert "http://" not in page and "https://" not in page  # nothing to fetch: loads offline


def test_text_report_draws_sample_rows_token_by_token_with_whitespace_visible(text_dataset, tmp_path, capsys):
    page = make_report(text_dataset, tmp_path / "report", capsys)
    rows = re.findall(r'<div class="bv" data-row="([0-9a-f]+)">(.*?)</div>', page, re.S)
    assert len(rows) == 5
    # every token is a span with its ID on hover; the EOS marker is the last token of each row
    assert all('<span class="tk a" title="id ' in body and body.endswith("&lt;|endoftext|&gt;</span>")
               for _, body in rows)
    assert '<i class="ws" data-cp="20" data-raw=" ">·</i>' in page  # spaces drawn, never a blank cell
    assert all('<span class="tk b" title="id ' in body for _, body in rows)  # alternating backgrounds
    assert "<h2>By source</h2>" in page and "<td>docs.jsonl</td><td class=\"n\">16</td>" in page


def test_vq_report_shows_codebook_usage_and_psnr(image_datasets, tmp_path, capsys):
    root = image_datasets["vq"]
    page = make_report(root, tmp_path / "report", capsys)
    codes = np.concatenate([np.asarray(t) for t in read_rows(root).column("tokens").to_pylist()])
    used = len(np.unique(codes))
    assert f"{used} of 32 codes used" in page and f"{32 - used} dead codes" in page
    p = np.bincount(codes, minlength=32) / len(codes)
    perplexity = np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())
    assert f"perplexity <b>{perplexity:.1f}</b>" in page
    scores = [float(s) for s in re.findall(r"reconstruction PSNR ([\d.]+) dB", page)]
    assert len(scores) == 8 and all(15 < s < 60 for s in scores)
    alts = [alt for alt, _ in images_of(page)]
    # labelled by file, every picture at one scale (64 x 48 images, the largest side drawn 240 px wide)
    assert [a for a in alts if a.startswith("original")] == [f"original im{i:02d}.png" for i in range(8)]
    assert len([a for a in alts if a.startswith("reconstruction im")]) == 8
    assert page.count('class="pix" width="240" height="180"') == 16
    assert "reconstruction PSNR by file" in alts


def test_patch_report_reconstructs_losslessly(image_datasets, tmp_path, capsys):
    page = make_report(image_datasets["patch"], tmp_path / "report", capsys)
    assert page.count("lossless") == 8 and "Codebook usage" not in page
    assert "<td>decode</td><td>NotAnImage</td><td class=\"n\">1</td>" in page and "broken.png file:" in page


def test_video_report_counts_tokens_per_clip_and_shows_its_frames(video_dataset, tmp_path, capsys):
    from tests.conftest import video_frames_fixture
    from tokenmill.reports.render import contact_sheet

    page = make_report(video_dataset, tmp_path / "report", capsys)
    assert "Tokens per clip" in page and "not recorded" in page
    assert "original unavailable" in page  # the fixture's source is not a real file
    pictures = dict(images_of(page))
    sheet = pictures["reconstructed frames a.mp4 clip:0, 0.0–0.5 s"]
    assert np.array_equal(sheet, contact_sheet(video_frames_fixture()))


@pytest.fixture(scope="module")
def video_codebooks(tmp_path_factory) -> dict[str, Path]:
    """Two small videos (8 and 12 frames of 32 x 24) built in 4-frame clips with a fitted video codebook (vq:),
    a fitted video PCA (pca:), and a TorchScript encoder that has no decoder."""
    import torch

    from tests.conftest import ONE_WORKER, run_build
    from tests.test_video import PlainVideoEncoder, make_video
    from tokenmill.pipelines import fit

    folder = tmp_path_factory.mktemp("report-video")
    videos = folder / "in"
    videos.mkdir()
    for i in range(2):
        make_video(videos / f"v{i}.mp4", n=8 + 4 * i, w=32, h=24)
    vq, pca, model = folder / "vq.npz", folder / "pca.npz", folder / "plain.pt"
    common = ["--input", str(videos / "v*.mp4"), "--patch", "8", "--frames", "2", "--clip-frames", "4",
              "--samples-per-image", "8", "--holdout", "0.3", *ONE_WORKER]
    assert fit.run(["--kind", "vq", "--output", str(vq), "--codes", "8", "--iterations", "3", *common]) == 0
    assert fit.run(["--kind", "pca", "--output", str(pca), "--dim", "8", *common]) == 0
    torch.jit.script(PlainVideoEncoder()).save(str(model))
    out = {"videos": videos}
    for name, spec in (("vq", f"vq:{vq}"), ("pca", f"pca:{pca}"), ("torchscript", f"torchscript:{model}")):
        out[name] = folder / name
        assert run_build(["--input", str(videos / "*.mp4"), "--output", str(out[name]), "--tokenizer", spec,
                          "--clip-frames", "4", "--progress", "none"]) == 0
    return out


@pytest.mark.parametrize("name", ["vq", "pca"])
def test_a_codebook_video_report_shows_the_frames_tokenmill_decode_draws(video_codebooks, name, tmp_path, capsys):
    """The reconstructed contact sheets are `tokenmill decode`'s, pixel for pixel, beside the frames as tokenized;
    their PSNR and SSIM are those of the tokenizer's decode_clip against the clip as the build decodes it."""
    from tokenmill.reports.compare import ssim
    from tokenmill.reports.dataset import DatasetView
    from tokenmill.reports.render import contact_sheet
    from tokenmill.transforms.decoders.images import SizePolicy
    from tokenmill.transforms.decoders.video import ClipSpec, iter_clips
    from tokenmill.transforms.tokenizers.codebook import psnr
    from tokenmill.transforms.tokenizers.spec import load_video_tokenizer

    root = video_codebooks[name]
    page = make_report(root, tmp_path / "report", capsys)
    pictures = dict(images_of(page))
    view = DatasetView(str(root))
    tok = load_video_tokenizer(view.manifest.tokenizer["spec"])
    rows = view.rows(4)
    assert len(rows) == 4 and "No reconstructions" not in page
    for row in rows:
        label = f"{Path(row['source']).name} {row['locator']}, {row['clip_start']}–{row['clip_end']} s"
        drawn = tmp_path / f"{row['id']}.png"
        assert commands.decode([str(root), "--id", row["id"], "--out", str(drawn)]) == 0
        decoded = np.asarray(Image.open(drawn))
        assert np.array_equal(pictures[f"reconstructed frames {label}"], decoded)
        clip = next(c for c in iter_clips(row["source"], ClipSpec(frames=4), SizePolicy.parse("native:1024"))
                    if f"clip:{c.plan.index}" == row["locator"]).frames
        assert np.array_equal(pictures[f"original frames {label}"], contact_sheet(clip))
        back = tok.decode_clip(view.payload(row), tuple(row["grid"]), 4, 24, 32)
        assert np.array_equal(decoded, contact_sheet(back))
        p = psnr(back, clip)
        assert 10 < p < 60  # lossy, and not noise
        s = np.mean([ssim(b, a) for b, a in zip(back, clip, strict=True)])
        assert f"reconstructed frames (PSNR {p:.1f} dB, SSIM {s:.3f})" in page
    capsys.readouterr()
    if name == "vq":
        assert "Codebook usage" in page and "of 8 codes used" in page


def test_a_video_report_without_a_decoder_says_so_and_shows_the_originals(video_codebooks, tmp_path, capsys):
    root = video_codebooks["torchscript"]
    page = make_report(root, tmp_path / "report", capsys)
    spec = f"torchscript:{video_codebooks['torchscript'].parent / 'plain.pt'}"
    assert (f'<p class=note>No reconstructions: {spec} has no decoder, so its tokens cannot be turned back into '
            "frames; only the originals are shown") in page
    alts = [alt for alt, _ in images_of(page)]
    assert len([a for a in alts if a.startswith("original frames v")]) == 4
    assert not [a for a in alts if a.startswith("reconstructed")]
    row = read_rows(root).to_pylist()[0]  # `tokenmill decode` refuses the same way, in one line
    assert commands.decode([str(root), "--id", row["id"], "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokenmill decode: error: ") and err.count("\n") == 1
    assert err.removeprefix("tokenmill decode: error: ").strip() in page


def test_a_video_report_whose_tokenizer_cannot_load_here_says_why(video_codebooks, tmp_path, capsys, monkeypatch):
    from tokenmill.reports import dataset

    def unloadable(self):
        raise RuntimeError("Found no NVIDIA driver on your system")

    monkeypatch.setattr(dataset.DatasetView, "tokenizer", property(unloadable))
    page = make_report(video_codebooks["vq"], tmp_path / "report", capsys)
    assert ("<p class=note>No reconstructions: the tokenizer cannot be loaded here: RuntimeError: Found no NVIDIA "
            "driver on your system</p>") in page
    alts = [alt for alt, _ in images_of(page)]
    assert len([a for a in alts if a.startswith("original frames")]) == 4
    assert not [a for a in alts if a.startswith("reconstructed")]


def test_image_report_reconstructions_are_tokenmill_decode_s_and_an_encoder_without_a_decoder_is_named(
        image_datasets, tmp_path, capsys):
    from tests.conftest import run_build
    from tests.test_torchscript import ContinuousEncoder, save
    from tokenmill.reports.dataset import DatasetView

    root = image_datasets["vq"]
    pictures = dict(images_of(make_report(root, tmp_path / "report", capsys)))
    rows = DatasetView(str(root)).rows(8)
    for row in rows:
        drawn = tmp_path / f"{row['id']}.png"
        assert commands.decode([str(root), "--id", row["id"], "--out", str(drawn)]) == 0
        assert np.array_equal(pictures[f"reconstruction {Path(row['source']).name}"], np.asarray(Image.open(drawn)))
    capsys.readouterr()
    model = save(ContinuousEncoder(), tmp_path / "enc.pt")
    encoded = tmp_path / "ts"
    assert run_build(["--input", str(image_datasets["images"] / "im0*.png"), "--output", str(encoded), "--tokenizer",
                      f"torchscript:{model}", "--progress", "none"]) == 0
    page = make_report(encoded, tmp_path / "report-ts", capsys)
    assert (f"<p class=note>No reconstructions: torchscript:{model} has no decoder, so its tokens cannot be turned "
            "back into pixels; only the originals are shown") in page
    alts = [alt for alt, _ in images_of(page)]
    assert [a for a in alts if a.startswith("original")] == [f"original im{i:02d}.png" for i in range(8)]
    assert not [a for a in alts if a.startswith("reconstruction")]


def test_longest_tokens_group_separator_runs(tmp_path, capsys):
    from tests.conftest import run_build, write_jsonl

    write_jsonl(tmp_path / "docs.jsonl", [{"text": "#" * 64 + "\n" + "-" * 32 + "\n" + " " * 16 + "x"},
                                          {"text": "information development"}])
    assert run_build(["--input", str(tmp_path / "docs.jsonl"), "--output", str(tmp_path / "ds"),
                      "--tokenizer", "tiktoken:cl100k_base", "--progress", "none"]) == 0
    page = make_report(tmp_path / "ds", tmp_path / "report", capsys)
    longest = re.search(r"<h3>Longest tokens used</h3>(.*?)<h3>", page, re.S).group(1)
    runs = re.search(r"<h3>Separator runs</h3>(.*?)<h2>", page, re.S).group(1)
    assert "####" not in longest and "information" in longest
    assert "<code>#</code>" in runs and "<code>-</code>" in runs
    assert '<code><i class="ws" data-cp="20" data-raw=" ">·</i></code>' in runs  # a run of spaces, drawn


def test_a_missing_shard_fails_naming_it_and_keeps_the_previous_report(text_dataset, tmp_path, capsys):
    """A dataset with a shard gone is a failure naming that shard (not "no _manifest.json", not misuse),
    and the report already in --out is left whole (the page is drawn before index.html is replaced)."""
    import json
    import shutil
    import subprocess
    import sys

    ds, out = tmp_path / "ds", tmp_path / "report"
    shutil.copytree(text_dataset, ds)
    before = make_report(ds, out, capsys)
    shard = json.loads((ds / "_manifest.json").read_text())["files"][0]
    (ds / shard).unlink()
    done = subprocess.run([sys.executable, "-m", "tokenmill.pipelines.cli", "report", str(ds), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokenmill report: failed:") and Path(shard).name in lines[0]
    assert (out / "index.html").read_text() == before


def test_report_out_that_is_a_file_is_misuse(text_dataset, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(SystemExit) as e:
        commands.report([str(text_dataset), "--out", str(tmp_path / "taken")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"tokenmill report: error: output {tmp_path / 'taken'} exists and is not a directory")


# Characters that draw as nothing or as something else, or that HTML cannot hold (NUL), each with its mark.
ODD_MARKS = {"\x00": "NUL", "\x0b": "VT", "\x0c": "FF", "\x1b": "ESC", "\x7f": "DEL", "\x85": "NEL", "\x9b": "CSI",
             "\u2028": "LS", "\u2029": "PS", "\u3000": "IDSP", "\xa0": "⍽", "\u200b": "ZWSP", "\u200c": "ZWNJ",
             "\u200d": "ZWJ", "\ufeff": "BOM", "\u202e": "RLO", "\xad": "SHY", "\u2009": "U+2009",
             "\U000e0001": "U+E0001", "\t": "→", "\r": "CR", "\n": "↵", " ": "·"}
ODD_TEXT = "nul\x00 vt\x0b ff\x0c esc\x1b[31m del\x7f nel\x85 csi\x9b ls\u2028ps\u2029 ideo\u3000graphic " \
           "no\xa0break zw\u200bsp\u200cnj\u200dj \ufeffbom rlo\u202eolr shy\xadphen thin\u2009 tag\U000e0001 " \
           "tab\t cr\r crlf\r\n literal · and ␀ and NUL and \\x00, 分词 ☃"


def boundary_text(markup: str) -> str:
    """What the browser test reads from a boundary view: each mark replaced by the character of its data-cp,
    each .pb dropped, tags dropped, entities unescaped."""
    from html.parser import HTMLParser

    class Reader(HTMLParser):
        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.out, self.skip = [], 0

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if self.skip:
                self.skip += tag == "i"
            elif tag == "i" and "pb" in (a.get("class") or "").split():
                self.skip = 1
            elif tag == "i" and "data-cp" in a:
                self.out.append(chr(int(a["data-cp"], 16)))
                self.skip = 1

        def handle_endtag(self, tag):
            if self.skip and tag == "i":
                self.skip -= 1

        def handle_data(self, data):
            if not self.skip:
                self.out.append(data)

    reader = Reader()
    reader.feed(markup)
    reader.close()
    return "".join(reader.out)


@pytest.mark.parametrize("cut", ["whole", "bytes", "cl100k"])
def test_boundary_view_draws_every_invisible_character_as_a_mark_and_reads_back_exactly(cut):
    """NUL (which HTML cannot hold), C0 and C1 controls, odd spaces, zero-width and bidi marks, line and
    paragraph separators: each drawn as its glyph or labelled pill, none raw, and the view reads back as the
    document, whether a token holds the text whole, one byte, or what cl100k makes of it."""
    from tokenmill.reports.boundaries import boundary_html, invisible_mark
    from tokenmill.transforms.tokenizers.spec import load_text_tokenizer

    data = ODD_TEXT.encode()
    spans = {"whole": [(0, len(data))], "bytes": [(i, i + 1) for i in range(len(data))],
             "cl100k": load_text_tokenizer("tiktoken:cl100k_base").token_spans(ODD_TEXT)}[cut]
    markup = boundary_html(data, spans)
    assert boundary_text(markup) == ODD_TEXT
    for ch, mark in ODD_MARKS.items():
        assert invisible_mark(ch) == mark
        assert f'data-cp="{ord(ch):x}"' in markup and f">{mark}</i>" in markup, (ch, mark)
        if ch not in " \n":  # drawn only as a mark (html.escape leaves the rest as they are)
            assert ch not in markup, repr(ch)
    assert '<i class="ws cc" data-cp="85">NEL</i><br>' in markup  # a line break after NEL, LS and PS
    assert invisible_mark("a") is invisible_mark("分") is invisible_mark("·") is None


def test_inspect_text_escapes_what_a_terminal_would_obey_or_hide():
    from tokenmill.reports.render import visible

    assert visible("a\x1b[31mb\x00\u200b\u3000 c\n") == "a\\x1b[31mb\\x00\\u200b\\u3000 c\\n"
