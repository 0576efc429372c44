"""`tokenmill compare` on real tokenizers and a real Beam runner, and every HTML page in headless Chromium."""
from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from bench.corpus import multilingual_documents
from tests.conftest import MULTILINGUAL, ONE_WORKER, run_build, write_jsonl
from tokenmill.pipelines import commands, compare
from tokenmill.reports.compare import sample_key, ssim
from tokenmill.transforms.tokenizers.spec import load_image_tokenizer
from tokenmill.transforms.tokenizers.spec import shared_text_tokenizer

LANGUAGES = ("english", "russian", "greek", "arabic", "hindi", "chinese", "code")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """MULTILINGUAL (with one line that is not JSON) and a few KB of generated text per language."""
    folder = tmp_path_factory.mktemp("compare-corpus")
    write_jsonl(folder / "docs.jsonl", [{"text": t} for t in MULTILINGUAL] + ["{not json"])
    for lang in LANGUAGES:
        write_jsonl(folder / f"{lang}.jsonl", [{"text": t} for t in multilingual_documents(lang, 1, 6000)])
    return folder


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory, corpus) -> Path:
    """A byte-level BPE tokenizer.json (400 tokens) trained here on the corpus, for hf:."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [json.loads(line)["text"] for f in sorted(corpus.glob("*.jsonl")) for line in f.open()
             if line.startswith("{\"")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|end|>"], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path_factory.mktemp("bpe")
    tok.save(str(folder / "tokenizer.json"))
    return folder


def documents(folder: Path) -> list[tuple[str, str, str]]:
    """(file, locator, text) of every JSON line, as the reader locates them (offset:N of the line's start)."""
    out = []
    for f in sorted(folder.glob("*.jsonl")):
        pos = 0
        for line in f.read_bytes().split(b"\n"):
            if line.strip():
                try:
                    out.append((str(f), f"offset:{pos}", json.loads(line)["text"]))
                except json.JSONDecodeError:
                    pass
            pos += len(line) + 1
    return out


def run_compare(capsys, *argv: str) -> dict:
    assert compare.run([*argv, *ONE_WORKER]) == 0
    out = capsys.readouterr().out
    assert "tokenmill compare:" in out and "index.html" in out
    folder = Path(argv[list(argv).index("--out") + 1])
    return json.loads((folder / "compare.json").read_text())


@pytest.fixture(scope="module")
def text_specs(bpe_folder, sp_models) -> list[str]:
    return ["tiktoken:cl100k_base", "tiktoken:o200k_base", "bytes", f"hf:{bpe_folder}",
            f"sentencepiece:{sp_models['bpe']}"]


@pytest.fixture(scope="module")
def text_result(corpus, text_specs, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("compare-text")
    argv = ["--input", str(corpus / "*.jsonl"), "--out", str(out)]
    for s in text_specs:
        argv += ["--tokenizer", s]
    assert compare.run([*argv, *ONE_WORKER]) == 0
    return json.loads((out / "compare.json").read_text()), out


def test_text_figures_are_every_tokenizers_own_counts(text_result, corpus, text_specs, reference_cl100k):
    result, _ = text_result
    docs = documents(corpus)
    texts = [t for _, _, t in docs]
    assert result["documents"] == len(docs) and result["chars"] == sum(map(len, texts))
    by_spec = {t["spec"]: t for t in result["tokenizers"]}
    assert by_spec["tiktoken:cl100k_base"]["tokens"] == sum(len(reference_cl100k.encode_ordinary(t)) for t in texts)
    for spec in text_specs[1:]:
        tok = shared_text_tokenizer(spec)
        assert by_spec[spec]["tokens"] == sum(len(tok.encode(t)) for t in texts)
    # bytes: one token per UTF-8 byte, so tokens per character is bytes per character, exactly
    nbytes = sum(len(t.encode()) for t in texts)
    assert by_spec["bytes"]["tokens"] == nbytes == result["bytes"]
    assert by_spec["bytes"]["tokens_per_char"] == nbytes / result["chars"]
    assert by_spec["bytes"]["tokens_per_byte"] == 1.0
    for group in result["by_script"] + result["by_source"]:
        assert group["tokenizers"]["bytes"]["tokens"] == group["bytes"]
    assert by_spec["bytes"]["share_long"] == 0.0 and by_spec["bytes"]["vocab_size"] == 258
    assert result["errors"]["count"] == 1 and result["errors"]["by_type"][0]["error_type"] == "JSONDecodeError"


def test_documents_are_grouped_by_script_and_source(text_result, corpus):
    result, _ = text_result
    scripts = {s["name"]: s for s in result["by_script"]}
    generated = {lang: len(list(multilingual_documents(lang, 1, 6000))) for lang in LANGUAGES}
    # each generated shard is one script; MULTILINGUAL adds one document of each of these
    assert scripts["Cyrillic"]["documents"] == generated["russian"] + 1
    assert scripts["Arabic"]["documents"] == generated["arabic"] + 1
    assert scripts["Devanagari"]["documents"] == generated["hindi"] + 1
    assert scripts["Han"]["documents"] == generated["chinese"] + 1
    assert {"Greek", "Japanese", "Hangul", "Latin", "no letters"} <= set(scripts)
    sources = {Path(s["name"]).name: s for s in result["by_source"]}
    assert sources["russian.jsonl"]["documents"] == generated["russian"]
    russian = sources["russian.jsonl"]["tokenizers"]
    # o200k's larger vocabulary packs Cyrillic tighter than cl100k; both far below one token per byte
    assert russian["tiktoken:o200k_base"]["tokens_per_char"] < russian["tiktoken:cl100k_base"]["tokens_per_char"] < 1


def test_spelling_risk_lists_packed_words_with_the_other_splits(text_result):
    result, _ = text_result
    risk = {w["text"]: w for w in result["spelling_risk"]["tiktoken:cl100k_base"]}
    packed = risk[".DefaultCellStyle"]
    assert packed["chars"] == 17 and packed["uses"] >= 10
    assert packed["others"]["bytes"]["tokens"] == 17
    assert "".join(packed["others"]["tiktoken:o200k_base"]["pieces"]) == ".DefaultCellStyle"
    assert result["spelling_risk"]["bytes"] == []  # one byte per token packs no word
    for words in result["spelling_risk"].values():
        assert all(len(w["text"].strip()) >= 8 and " " not in w["text"].strip() for w in words)


def test_boundary_views_tile_each_excerpt_for_every_tokenizer(text_result, text_specs):
    result, _ = text_result
    examples = result["examples"]
    assert len(examples) == 6 and len({e["script"] for e in examples}) == 6  # one per script first
    for ex in examples:
        data = ex["text"].encode()
        for spec in text_specs:
            view = ex["views"][spec]
            spans = [tuple(s) for s in view["spans"]]
            assert b"".join(data[s:e] for s, e in spans) == data and spans[0][0] == 0
            assert view["ids"] == shared_text_tokenizer(spec).encode(ex["text"]).tolist()


def test_vocabulary_usage_counts_distinct_tokens(text_result, corpus):
    result, _ = text_result
    texts = [t for _, _, t in documents(corpus)]
    by_spec = {t["spec"]: t for t in result["tokenizers"]}
    o200k = shared_text_tokenizer("tiktoken:o200k_base")
    ids = np.concatenate([o200k.encode(t) for t in texts])
    used = by_spec["tiktoken:o200k_base"]
    assert used["distinct_tokens"] == len(np.unique(ids))
    assert used["vocab_used"] == pytest.approx(len(np.unique(ids)) / o200k.vocab_size)
    top = np.bincount(ids).argmax()
    assert used["top_tokens"][0]["id"] == top and used["top_tokens"][0]["uses"] == np.bincount(ids).max()


def test_sample_takes_the_records_with_the_smallest_keys(corpus, tmp_path, capsys):
    result = run_compare(capsys, "--input", str(corpus / "*.jsonl"), "--out", str(tmp_path), "--sample", "25",
                         "--tokenizer", "bytes", "--tokenizer", "tiktoken:cl100k_base")
    docs = sorted(documents(corpus), key=lambda d: sample_key(d[0], d[1]))[:25]
    assert result["documents"] == 25 and result["sample"] == 25
    assert result["chars"] == sum(len(t) for _, _, t in docs)
    assert result["bytes"] == sum(len(t.encode()) for _, _, t in docs)
    assert result["errors"]["count"] == 1  # the bad line is not sampled away: it is reported


def test_a_plugin_family_compares_and_documents_it_refuses_are_left_out_of_every_figure(tmp_path, capsys,
                                                                                          monkeypatch):
    from tokenmill.transforms import registry

    monkeypatch.setitem(registry.FAMILIES, "picky", "tests.plugins.codepoints:PICKY_FAMILY")
    texts = ["plain text", "a skull ☠ here", "Гранулярность"]
    write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    result = run_compare(capsys, "--input", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "out"),
                         "--tokenizer", "picky", "--tokenizer", "bytes")
    by_spec = {t["spec"]: t for t in result["tokenizers"]}
    assert by_spec["picky"]["refused"] == 1 and by_spec["bytes"]["refused"] == 0
    kept = [texts[0], texts[2]]
    assert result["documents"] == 2 and result["chars"] == sum(map(len, kept))
    assert by_spec["picky"]["tokens"] == result["chars"] and by_spec["bytes"]["tokens"] == result["bytes"]




def test_a_compare_where_every_record_fails_exits_1_naming_the_first_error_and_writes_nothing(tmp_path, capsys):
    """It exited 0 with a page of nothing; now it fails in one line, as a build that commits nothing does."""
    write_jsonl(tmp_path / "bad.jsonl", ["{not json", "[1, 2"])
    out = tmp_path / "out"
    assert compare.run(["--input", str(tmp_path / "bad.jsonl"), "--out", str(out), "--tokenizer", "bytes",
                        "--tokenizer", "tiktoken:cl100k_base", *ONE_WORKER]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1, err
    assert "no document could be measured: 2 record(s) failed" in err[0]
    assert f"{tmp_path / 'bad.jsonl'} offset:0: JSONDecodeError" in err[0]
    assert sorted(p.name for p in out.iterdir()) == []  # no page, no compare.json, no staging file


def test_a_compare_of_images_that_all_fail_exits_1(image_datasets, tmp_path, capsys):
    out = tmp_path / "out"
    assert compare.run(["--input", str(image_datasets["images"] / "broken.png"), "--out", str(out),
                        "--tokenizer", "patch:16", "--tokenizer", "patch:8", *ONE_WORKER]) == 1
    err = capsys.readouterr().err
    assert "no image could be measured: 1 record(s) failed; the first: " in err and "broken.png" in err
    assert not (out / "index.html").exists() and not (out / "compare.json").exists()


def test_a_tokenizer_that_refuses_every_document_is_set_aside_and_the_others_are_compared(tmp_path, capsys,
                                                                                         monkeypatch):
    """picky refuses every document (each holds a skull): the page compares the others over all the text and
    says picky refused them all, with its first refusal."""
    from tokenmill.transforms import registry

    monkeypatch.setitem(registry.FAMILIES, "picky", "tests.plugins.codepoints:PICKY_FAMILY")
    texts = ["a skull ☠ here", "☠ Гранулярность ☠", "another ☠"]
    write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    out = tmp_path / "out"
    result = run_compare(capsys, "--input", str(tmp_path / "docs.jsonl"), "--out", str(out),
                         "--tokenizer", "picky", "--tokenizer", "bytes", "--tokenizer", "tiktoken:cl100k_base")
    by_spec = {t["spec"]: t for t in result["tokenizers"]}
    assert result["documents"] == result["read"] == 3 and result["chars"] == sum(map(len, texts))
    picky = by_spec["picky"]
    assert picky["refused_all"] and picky["refused"] == 3 and picky["tokens"] == 0
    assert picky["first_refusal"] == {"source": str(tmp_path / "docs.jsonl"), "locator": "offset:0",
                                      "message": "ValueError: no skulls"}
    assert by_spec["bytes"]["tokens"] == sum(len(t.encode()) for t in texts) and not by_spec["bytes"]["refused_all"]
    assert all("picky" not in ex["views"] and "bytes" in ex["views"] for ex in result["examples"])
    page = (out / "index.html").read_text()
    assert "refused every document" in page and "ValueError: no skulls" in page


def test_why_nothing_was_measured_names_the_first_error_and_the_refusals():
    errors = {"count": 2, "examples": [{"source": "a.png", "locator": "file", "error_type": "UnidentifiedImageError",
                                        "message": "cannot identify"}]}
    toks = [{"spec": "patch:16", "refused": 0}, {"spec": "picky", "refused": 3}]
    none = {"count": 0, "examples": []}
    assert compare.nothing_measured({"kind": "image", "errors": errors, "tokenizers": toks}) == (
        "no image could be measured: 2 record(s) failed; the first: a.png file: UnidentifiedImageError: cannot "
        "identify; every image left was refused by a tokenizer: picky refused 3")
    assert compare.nothing_measured({"kind": "video", "errors": none, "tokenizers": toks[:1]}) == \
        "the inputs hold no clips"
    toks[1]["first_refusal"] = {"source": "d.jsonl", "locator": "offset:0", "message": "ValueError: no skulls"}
    assert compare.nothing_measured({"kind": "text", "errors": none, "tokenizers": toks}) == (
        "no document could be measured: every document was refused by a tokenizer: picky refused 3 (the first: "
        "d.jsonl offset:0: ValueError: no skulls)")


def test_refusals_set_aside_only_for_a_tokenizer_that_refused_every_document_of_every_batch():
    """Batch 1: picky refuses both documents; batch 2: only the one with a skull. picky encoded something, so
    every document it refused is left out of everyone's figures (it is not set aside)."""
    from tests.plugins.codepoints import CodepointTokenizer, PickyCodepointTokenizer
    from tokenmill.reports.compare import measure_texts, summarize_text

    toks = {"picky": PickyCodepointTokenizer("picky"), "codepoints": CodepointTokenizer("codepoints")}
    first = measure_texts(toks, ["a", "a"], ["offset:0", "offset:9"], ["☠ one", "two ☠"])
    second = measure_texts(toks, ["b", "b"], ["offset:0", "offset:5"], ["three", "four ☠"])
    result = summarize_text(first.merge(second), toks)
    by_spec = {t["spec"]: t for t in result["tokenizers"]}
    assert result["read"] == 4 and result["documents"] == 1 and result["chars"] == len("three")
    assert by_spec["picky"]["refused"] == 3 and not by_spec["picky"]["refused_all"]
    assert by_spec["picky"]["first_refusal"]["source"] == "a" and by_spec["codepoints"]["tokens"] == 5
    # the same batches with picky refusing everywhere: set aside, codepoints counts all four documents
    third = measure_texts(toks, ["b", "b"], ["offset:0", "offset:5"], ["three ☠", "four ☠"])
    again = measure_texts(toks, ["a", "a"], ["offset:0", "offset:9"], ["☠ one", "two ☠"])
    result = summarize_text(again.merge(third), toks)
    by_spec = {t["spec"]: t for t in result["tokenizers"]}
    assert by_spec["picky"]["refused_all"] and result["documents"] == 4
    assert by_spec["codepoints"]["tokens"] == len("☠ one" "two ☠" "three ☠" "four ☠")


def test_show_draws_n_documents_from_a_corpus_of_one_script(tmp_path, capsys):
    """--show 4 on English alone draws 4 excerpts (it drew 2: two candidates were kept per script)."""
    texts = [f"document number {i} in plain English" for i in range(7)]
    write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    result = run_compare(capsys, "--input", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "out"),
                         "--show", "4", "--tokenizer", "bytes", "--tokenizer", "tiktoken:cl100k_base")
    docs = sorted(documents(tmp_path), key=lambda d: sample_key(d[0], d[1]))[:4]
    assert [(ex["locator"], ex["text"]) for ex in result["examples"]] == [(loc, t) for _, loc, t in docs]

def test_misuse_is_one_line_and_exit_2(corpus, tmp_path, capsys):
    for argv, message in (
            (["--tokenizer", "bytes"], "two or more"),
            (["--tokenizer", "bytes", "--tokenizer", "patch:16"], "not a text tokenizer"),
            (["--tokenizer", "bytes", "--tokenizer", "tiktoken:nope"], "nope"),
            (["--tokenizer", "bytes", "--tokenizer", "tiktoken:cl100k_base", "--sample", "0"], "--sample")):
        with pytest.raises(SystemExit) as e:
            compare.run(["--input", str(corpus / "*.jsonl"), "--out", str(tmp_path / "x"), *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_spelling_risk_takes_whole_words_only():
    from tokenmill.reports.compare import is_word_token

    assert all(map(is_word_token, [" environment", ".DefaultCellStyle", "Gesellschaft", " правительство"]))
    # pieces that continue a word, short tokens, separators, digits, and text with a space inside
    assert not any(map(is_word_token, ["issenschaft", "ительство", " short", "########", " 12345678",
                                       "DefaultCell Style"]))


def test_an_image_tokenizer_that_cannot_decode_gets_tokens_and_bytes_but_no_fidelity():
    from tokenmill.reports.compare import measure_images, summarize_images
    from tokenmill.transforms.tokenizers.patches import PatchTokenizer

    class EncodeOnly(PatchTokenizer):
        def decode_image(self, tokens, grid, height, width):
            raise NotImplementedError("an encoder without a decoder")

    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (32, 48, 3), dtype=np.uint8) for _ in range(3)]
    toks = {"patch:16": load_image_tokenizer("patch:16"), "encode-only": EncodeOnly("encode-only", 16)}
    tally = measure_images(toks, ["a.png", "b.png", "c.png"], ["file"] * 3, images)
    result = summarize_images(tally, toks)
    patch, only = result["tokenizers"]
    assert (only["tokens_per_image"], only["bytes_per_image"]) == (6, 32 * 48 * 3) and only["decoded"] == 0
    assert only["psnr_mean"] is None and only["ssim_mean"] is None
    assert patch["lossless"] == 3 and patch["ssim_mean"] == pytest.approx(1.0)
    assert all("png" not in s["reconstructions"]["encode-only"] for s in result["shown"])


def test_an_image_tokenizer_that_refuses_every_image_is_set_aside_and_one_refusal_is_left_out_of_every_figure():
    from tokenmill.reports.compare import measure_images, summarize_images
    from tokenmill.reports.compare_page import compare_html
    from tokenmill.transforms.tokenizers.base import ImageTokenizer
    from tokenmill.transforms.tokenizers.patches import PatchTokenizer

    class Refuses(PatchTokenizer):
        """Refuses images whose first pixel is dark; `every` refuses all."""

        def __init__(self, spec, patch, every):
            super().__init__(spec, patch)
            self.every = every

        encode_images = ImageTokenizer.encode_images  # one image at a time, through encode_image

        def encode_image(self, image):
            if self.every or image[0, 0, 0] < 128:
                raise ValueError("too dark")
            return super().encode_image(image)

    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (32, 48, 3), dtype=np.uint8) for _ in range(4)]
    images[1][0, 0, 0], images[0][0, 0, 0], images[2][0, 0, 0], images[3][0, 0, 0] = 10, 200, 200, 200
    sources = [f"{c}.png" for c in "abcd"]
    toks = {"patch:16": load_image_tokenizer("patch:16"), "all": Refuses("all", 16, True),
            "dark": Refuses("dark", 8, False)}
    first = measure_images(toks, sources[:2], ["file"] * 2, images[:2])
    result = summarize_images(first.merge(measure_images(toks, sources[2:], ["file"] * 2, images[2:])), toks)
    by_spec = {t["spec"]: t for t in result["tokenizers"]}
    assert result["read"] == 4 and result["images"] == 3  # b.png, refused by "dark", is left out of every figure
    assert by_spec["all"]["refused_all"] and by_spec["all"]["refused"] == 4 and by_spec["all"]["images"] == 0
    assert by_spec["all"]["first_refusal"] == {"source": "a.png", "locator": "file", "message": "ValueError: too dark"}
    assert by_spec["dark"]["refused"] == 1 and not by_spec["dark"]["refused_all"]
    assert by_spec["patch:16"]["images"] == by_spec["dark"]["images"] == 3 and by_spec["patch:16"]["lossless"] == 3
    assert by_spec["dark"]["tokens_per_image"] == 24
    assert {s["source"] for s in result["shown"]} == {"a.png", "c.png", "d.png"}
    assert all(s["reconstructions"]["all"] == {"refused": True} for s in result["shown"])
    page = compare_html(result)
    assert "<b><code>all</code> refused every image</b> (4)" in page and "1 by <code>dark</code>" in page


def test_ssim_known_values():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    assert ssim(a, a) == pytest.approx(1.0)
    # two flat images: only the luminance term is left, (2xy + C1) / (x^2 + y^2 + C1)
    c1 = (0.01 * 255) ** 2
    flat = ssim(np.full((16, 16, 3), 100, np.uint8), np.full((16, 16, 3), 150, np.uint8))
    assert flat == pytest.approx((2 * 100 * 150 + c1) / (100 ** 2 + 150 ** 2 + c1))
    assert ssim(a, 255 - a) < 0.1


@pytest.fixture(scope="module")
def image_result(image_datasets, tmp_path_factory) -> tuple[dict, Path]:
    from tokenmill.pipelines import fit

    folder = tmp_path_factory.mktemp("compare-images")
    pca = folder / "pca.npz"
    assert fit.run(["--kind", "pca", "--input", str(image_datasets["images"] / "im*.png"), "--output", str(pca),
                    "--patch", "8", "--dim", "8", *ONE_WORKER]) == 0
    out = folder / "page"
    assert compare.run(["--input", str(image_datasets["images"] / "*.png"), "--out", str(out),
                        "--tokenizer", "patch:16", "--tokenizer", "patch:8", "--tokenizer",
                        f"vq:{image_datasets['vq_file']}", "--tokenizer", f"pca:{pca}", *ONE_WORKER]) == 0
    return json.loads((out / "compare.json").read_text()), out


def test_images_compare_tokens_bytes_psnr_and_ssim(image_result, image_datasets):
    from tokenmill.transforms.decoders.images import decode_image
    from tokenmill.transforms.tokenizers.codebook import psnr

    result, _ = image_result
    by_spec = {t["spec"]: t for t in result["tokenizers"]}
    assert result["images"] == 12 and result["raw_bytes_per_image"] == 64 * 48 * 3
    assert result["errors"]["count"] == 1 and result["errors"]["examples"][0]["source"].endswith("broken.png")
    patch16, patch8 = by_spec["patch:16"], by_spec["patch:8"]
    assert (patch16["tokens_per_image"], patch16["bytes_per_image"]) == (12, 64 * 48 * 3)
    assert (patch8["tokens_per_image"], patch8["bytes_per_image"]) == (48, 64 * 48 * 3)
    assert patch16["lossless"] == 12 and patch16["psnr_mean"] is None and patch16["ssim_mean"] == pytest.approx(1.0)
    vq_spec = f"vq:{image_datasets['vq_file']}"
    vq = by_spec[vq_spec]
    assert (vq["tokens_per_image"], vq["bytes_per_image"]) == (48, 48)  # 32 codes: one uint8 each
    tok = load_image_tokenizer(vq_spec)
    scores = []
    for path in sorted(image_datasets["images"].glob("im*.png")):
        image = decode_image(path.read_bytes())[0]
        codes, grid = tok.encode_image(image)
        scores.append(psnr(tok.decode_image(codes, grid, 48, 64), image))
    assert vq["psnr_mean"] == pytest.approx(np.mean(scores))
    assert 0 < vq["ssim_mean"] < 1
    pca_spec = next(s for s in by_spec if s.startswith("pca:"))
    assert by_spec[pca_spec]["tokens_per_image"] == 48 and by_spec[pca_spec]["bytes_per_image"] == 48 * 8 * 4
    shown = result["shown"]
    assert len(shown) == 6 and all(Path(s["source"]).name.startswith("im") for s in shown)
    assert all(set(s["reconstructions"]) == set(by_spec) for s in shown)



@pytest.fixture(scope="module")
def video_result(tmp_path_factory) -> tuple[dict, Path, dict]:
    """Three small videos (8, 12 and 16 frames of 32 x 24, a moving bar) and one that is not a video, compared in
    4-frame clips with spacetime patches, a fitted video codebook (vq:), a fitted video PCA (pca:), and a
    TorchScript and a torch.export encoder (Cosmos-like) that cannot decode."""
    import torch

    from tests.test_exported import export_video
    from tests.test_video import ContinuousVideoEncoder, PlainVideoEncoder, make_video
    from tokenmill.pipelines import fit

    folder = tmp_path_factory.mktemp("compare-video")
    videos = folder / "in"
    videos.mkdir()
    for i in range(3):
        make_video(videos / f"v{i}.mp4", n=8 + 4 * i, w=32, h=24)
    (videos / "bad.mp4").write_bytes(b"not a video")
    vq, pca = folder / "vq.npz", folder / "pca.npz"
    common = ["--input", str(videos / "v*.mp4"), "--patch", "8", "--frames", "2", "--clip-frames", "4",
              "--samples-per-image", "8", "--holdout", "0.3", *ONE_WORKER]
    assert fit.run(["--kind", "vq", "--output", str(vq), "--codes", "8", "--iterations", "3", *common]) == 0
    assert fit.run(["--kind", "pca", "--output", str(pca), "--dim", "8", *common]) == 0
    model = folder / "plain.pt"
    torch.jit.script(PlainVideoEncoder()).save(str(model))
    program = export_video(ContinuousVideoEncoder(), folder / "cv.pt2")
    specs = {"patch": "patch:2,8", "patch16": "patch:2,16", "vq": f"vq:{vq}", "pca": f"pca:{pca}",
             "torchscript": f"torchscript:{model}", "export": f"export:{program}"}
    out = folder / "page"
    argv = ["--input", str(videos / "*.mp4"), "--out", str(out), "--clip-frames", "4"]
    for spec in specs.values():
        argv += ["--tokenizer", spec]
    assert compare.run([*argv, *ONE_WORKER]) == 0
    return json.loads((out / "compare.json").read_text()), out, {**specs, "videos": videos}


def test_video_compare_tokens_per_clip_and_second_bytes_psnr_ssim_and_contact_sheets(video_result):
    """Every figure is the tokenizer's own, on the clips as the build decodes them; fidelity goes through the
    tokenizer's decode_clip, as `tokenmill decode` does."""
    import io

    from PIL import Image

    from tokenmill.reports.compare import sheet_frames
    from tokenmill.reports.render import contact_sheet
    from tokenmill.transforms.decoders.images import SizePolicy
    from tokenmill.transforms.decoders.video import ClipSpec, iter_clips
    from tokenmill.transforms.tokenizers.codebook import psnr
    from tokenmill.transforms.tokenizers.spec import load_video_tokenizer

    result, _, specs = video_result
    clips = {(str(path), f"clip:{c.plan.index}"): c for path in sorted(specs["videos"].glob("v*.mp4"))
             for c in iter_clips(str(path), ClipSpec(frames=4), SizePolicy.parse("native:1024"))}
    assert result["kind"] == "video" and result["clips"] == len(clips) == 2 + 3 + 4
    assert result["frames"] == 4 * 9 and result["seconds"] == pytest.approx(9 * 4 / 25)
    assert result["raw_bytes_per_clip"] == 4 * 24 * 32 * 3
    assert result["errors"]["count"] == 1 and result["errors"]["examples"][0]["source"].endswith("bad.mp4")
    by_spec = {t["spec"]: t for t in result["tokenizers"]}
    patch = by_spec[specs["patch"]]
    assert (patch["tokens_per_clip"], patch["bytes_per_clip"]) == (2 * 3 * 4, 4 * 24 * 32 * 3)
    assert patch["tokens_per_second"] == pytest.approx(24 / (4 / 25)) and patch["tokens_per_frame"] == 6
    assert patch["lossless"] == 9 and patch["ssim_mean"] == pytest.approx(1.0)
    assert by_spec[specs["patch16"]]["tokens_per_clip"] == 2 * 2 * 2  # 24 x 32 padded to 32 x 32
    for name in ("vq", "pca"):
        tok = load_video_tokenizer(specs[name])
        scores, similar = [], []
        for clip in clips.values():
            values, grid = tok.encode_clip(clip.frames)
            back = tok.decode_clip(values, grid, 4, 24, 32)
            scores.append(psnr(back, clip.frames))
            similar.append(np.mean([ssim(b, a) for b, a in zip(back, clip.frames, strict=True)]))
        t = by_spec[specs[name]]
        assert t["tokens_per_clip"] == 24 and t["decoded"] == 9 and t["lossless"] == 0
        assert t["psnr_mean"] == pytest.approx(np.mean(scores)) and t["ssim_mean"] == pytest.approx(np.mean(similar))
        assert 0 < t["ssim_mean"] < 1
    assert by_spec[specs["vq"]]["bytes_per_clip"] == 24  # 8 codes: one uint8 each
    assert by_spec[specs["pca"]]["bytes_per_clip"] == 24 * 8 * 4  # 8 float32 per token
    for name in ("torchscript", "export"):  # encoders without a decoder: tokens and bytes, no fidelity
        encoder = by_spec[specs[name]]
        tok = load_video_tokenizer(specs[name])
        latents, grid = tok.encode_clip(next(iter(clips.values())).frames)
        assert encoder["tokens_per_clip"] == np.prod(grid) and encoder["bytes_per_clip"] == latents.size * 4
        assert encoder["decoded"] == 0 and encoder["ssim_mean"] is None and encoder["psnr_mean"] is None
    assert by_spec[specs["export"]]["tokens_per_clip"] == 3 * 4 * 4  # 9 frames (1 + 8) x 32 x 32 padded
    # the shown clips: contact sheets of the frames as decoded and as each tokenizer's tokens decode to
    shown = result["shown"]
    assert len(shown) == 4 and len({(s["source"], s["locator"]) for s in shown}) == 4
    vq = load_video_tokenizer(specs["vq"])

    def png(data: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))

    for s in shown:
        clip = clips[(s["source"], s["locator"])].frames
        assert s["frames"] == 4 and s["sheet_frames"] == sheet_frames(4) == [0, 1, 2, 3]
        assert np.array_equal(png(s["original_png"]), contact_sheet(clip, columns=8))
        recon = vq.decode_clip(*vq.encode_clip(clip), 4, 24, 32)
        assert np.array_equal(png(s["reconstructions"][specs["vq"]]["png"]), contact_sheet(recon, columns=8))
        assert "png" not in s["reconstructions"][specs["torchscript"]]
        assert "png" not in s["reconstructions"][specs["export"]]
    assert sheet_frames(16) == [0, 2, 4, 6, 9, 11, 13, 15] and sheet_frames(3) == [0, 1, 2]


def test_a_video_compare_where_every_clip_fails_exits_1(video_result, tmp_path, capsys):
    _, _, specs = video_result
    out = tmp_path / "out"
    assert compare.run(["--input", str(specs["videos"] / "bad.mp4"), "--out", str(out), "--tokenizer",
                        "patch:2,8", "--tokenizer", "patch:2,16", *ONE_WORKER]) == 1
    err = capsys.readouterr().err
    assert "error: no clip could be measured: 1 record(s) failed; the first: " in err and "bad.mp4 file" in err
    assert not (out / "index.html").exists()
    with pytest.raises(SystemExit) as e:  # a text tokenizer among video ones is misuse
        compare.run(["--input", str(specs["videos"] / "v0.mp4"), "--out", str(out), "--tokenizer", "patch:2,8",
                     "--tokenizer", "bytes", *ONE_WORKER])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "'bytes' is not a video tokenizer" in err and err.count("\n") == 1, err


# -- every page in headless Chromium: one browser session for the whole module ----------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--allow-file-access-from-files", "--hide-scrollbars"]
CAPTURE_ERRORS = """<script>window.__errors=[];
window.addEventListener("error",
  e=>window.__errors.push(e.message||("failed to load "+(e.target&&(e.target.src||e.target.href)))),true);
(()=>{const ce=console.error;console.error=(...a)=>{window.__errors.push(a.join(" "));ce.apply(console,a);};})();
</script>"""
HARNESS = """<!doctype html><html><head><meta charset=utf-8></head><body><pre id=out></pre><script>
const pages = PAGES, widths = [1400, 390], results = {};
let pending = pages.length * widths.length;
function check(frame, name, width) {
  const doc = frame.contentDocument, win = frame.contentWindow, imgs = Array.from(doc.images);
  const views = Array.from(doc.querySelectorAll(".ex .bv[data-spec], .bv[data-row]")).map(v => {
    const c = v.cloneNode(true);
    // a mark stands for the character of its data-cp (HTML cannot hold U+0000 itself)
    c.querySelectorAll(".ws").forEach(w => w.replaceWith(doc.createTextNode(String.fromCodePoint(
      parseInt(w.dataset.cp, 16)))));
    c.querySelectorAll(".pb").forEach(p => p.remove());
    const key = v.dataset.spec !== undefined ? v.closest(".ex").dataset.example + "|" + v.dataset.spec : v.dataset.row;
    return [key, c.textContent];
  });
  results[name + "@" + width] = {images: imgs.length, loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    errors: win.__errors === undefined ? ["no error capture"] : win.__errors, views: views,
    scrollWidth: doc.documentElement.scrollWidth, width: win.innerWidth};
  if (--pending === 0) document.getElementById("out").textContent = JSON.stringify(results);
}
for (const p of pages) for (const w of widths) {
  const f = document.createElement("iframe");
  f.style.width = w + "px"; f.style.height = "900px"; f.style.border = "0";
  f.onload = () => check(f, p[0], w); f.src = p[1];
  document.body.appendChild(f);
}
</script></body></html>"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed on CI (run_local.sh test installs Debian's chromium)")
        pytest.skip("no chromium on PATH: install Debian's chromium (run_local.sh test does, as root)")
    return found


def run_chromium(*args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="tokenmill-chromium-") as profile:
        return subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=120)


def make_video(path: Path, n: int = 12, w: int = 64, h: int = 48) -> Path:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt, s.options = w, h, "yuv420p", {"preset": "ultrafast", "crf": "0"}
        for i in range(n + 1):
            y, x = np.mgrid[0:h, 0:w]
            a = np.stack([x * 4, y * 5, np.full_like(x, i * 20)], -1).astype(np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24") if i < n else None):
                c.mux(p)
    return path


def test_every_page_renders_in_chromium_with_images_loaded_no_errors_and_exact_text(
        text_result, image_result, video_result, text_dataset, image_datasets, tmp_path, capsys, cl100k):
    """compare (text, images) and report (text, image, video) pages at 1400 and 390 pixels wide; a compare
    and a report of odd text too (NUL, controls, odd spaces, zero-width and bidi marks), whose views must read
    back as the documents."""
    from tests.test_report import ODD_TEXT

    browser = chromium()
    odd_texts = [ODD_TEXT, "\x00", "a\u2028b\u2029c\x85d", "tab\there\x0b\x0c\x1f\x01", "\u202eRTL override",
                 "zero\u200b\u200c\u200d\ufeffwidth\u3000\xa0", "C1 \x80\x9f\x90 end"]
    odd = tmp_path / "odd"
    odd.mkdir()
    write_jsonl(odd / "odd.jsonl", [{"text": t} for t in odd_texts])
    assert compare.run(["--input", str(odd / "odd.jsonl"), "--out", str(tmp_path / "compare-odd"), "--show", "10",
                        "--tokenizer", "bytes", "--tokenizer", "tiktoken:cl100k_base", *ONE_WORKER]) == 0
    odd_result = json.loads((tmp_path / "compare-odd" / "compare.json").read_text())
    assert sorted(ex["text"] for ex in odd_result["examples"]) == sorted(odd_texts)
    assert run_build(["--input", str(odd / "odd.jsonl"), "--output", str(tmp_path / "odd-ds"), "--tokenizer",
                      "tiktoken:cl100k_base", "--progress", "none"]) == 0
    videos = tmp_path / "videos"
    videos.mkdir()
    make_video(videos / "clip.mp4")
    video_ds = tmp_path / "video-ds"
    assert run_build(["--input", str(videos / "*.mp4"), "--output", str(video_ds), "--tokenizer", "patch:2,8",
                      "--clip-frames", "4", "--max-clips", "2",
                      "--progress", "none"]) == 0
    video_vq = tmp_path / "video-vq-ds"  # a fitted video codebook: clips reconstructed as `tokenmill decode` does
    assert run_build(["--input", str(video_result[2]["videos"] / "v*.mp4"), "--output", str(video_vq), "--tokenizer",
                      video_result[2]["vq"], "--clip-frames", "4", "--max-clips", "1", "--progress", "none"]) == 0
    reports = {}
    for name, root in (("report-text", text_dataset), ("report-image", image_datasets["vq"]),
                       ("report-video", video_ds), ("report-video-vq", video_vq), ("report-odd", tmp_path / "odd-ds")):
        assert commands.report([str(root), "--out", str(tmp_path / name)]) == 0
        reports[name] = tmp_path / name / "index.html"
    capsys.readouterr()
    pages = {"compare-text": text_result[1] / "index.html", "compare-images": image_result[1] / "index.html",
             "compare-odd": tmp_path / "compare-odd" / "index.html", "compare-video": video_result[1] / "index.html",
             **reports}
    checks = []
    for name, page in pages.items():
        check = tmp_path / f"check-{name}.html"
        check.write_text(page.read_text().replace("<head>", "<head>" + CAPTURE_ERRORS, 1))
        checks.append([name, check.as_uri()])
    harness = tmp_path / "harness.html"
    harness.write_text(HARNESS.replace("PAGES", json.dumps(checks)))
    done = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=30000", "--dump-dom",
                           harness.as_uri()], capture_output=True, text=True, timeout=180)
    found = re.search(r'<pre id="out">(.*?)</pre>', done.stdout, re.S)
    assert found and found.group(1), f"chromium rendered no result: {done.stderr[-2000:]}"
    results = json.loads(html.unescape(found.group(1)))
    assert "Uncaught" not in done.stderr
    from tokenmill.reports.dataset import DatasetView

    expected_views = {}  # page -> view -> the text it must read back as
    for name, result in (("compare-text", text_result[0]), ("compare-odd", odd_result)):
        expected_views[name] = {f"{k}|{spec}": ex["text"] for k, ex in enumerate(result["examples"])
                                for spec in ex["views"]}
    for name, root in (("report-text", text_dataset), ("report-odd", tmp_path / "odd-ds")):
        expected_views[name] = {}
        for row in DatasetView(str(root)).rows(5):
            pieces = cl100k.token_pieces([int(i) for i in row["tokens"]][:400])
            expected_views[name][row["id"]] = b"".join(pieces).decode("utf-8", "ignore")
    for page in pages.values():  # self-contained: nothing to fetch
        assert not re.search(r"(src|href)=\"(?!data:)", page.read_text()), page
    for key, r in results.items():
        assert r["errors"] == [], key
        assert r["images"] == r["loaded"] > 0, key
        assert r["scrollWidth"] <= r["width"] + 1, f"{key}: the page is {r['scrollWidth']} px wide"
        for view_key, text in r["views"]:
            assert text == expected_views[key.split("@")[0]][view_key], (key, view_key)
    for name in expected_views:
        assert {k for k, _ in results[f"{name}@390"]["views"]} == set(expected_views[name]), name
    assert len(results["report-text@1400"]["views"]) == 5 and len(results["report-odd@1400"]["views"]) == 5
    assert len(results["compare-odd@1400"]["views"]) == 2 * len(odd_texts)
    # original frames and a sheet from each of the four tokenizers that decode, for each of the four clips
    assert results["compare-video@390"]["images"] == 4 * 5
    assert results["report-video@1400"]["images"] >= 3  # tokens-per-clip plot, original and reconstructed frames
    # tokens-per-clip and codebook plots, then original and reconstructed frames of each of three clips
    assert results["report-video-vq@390"]["images"] == 2 + 3 * 2
    keep = os.environ.get("TOKENMILL_SCREENSHOTS")
    if keep:  # for a person to look at: every page at both widths
        for name, page in pages.items():
            for width in (1400, 390):
                run_chromium(f"--window-size={width},4000", f"--screenshot={Path(keep) / f'{name}-{width}.png'}",
                             page.as_uri())
