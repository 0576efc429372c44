"""Differential suite: every BPE engine against tiktoken, and o200k_base offline."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tests.conftest import MULTILINGUAL, read_rows, run_build, write_jsonl
from tokenmill.transforms.tokenizers import engines
from tokenmill.transforms.tokenizers.base import TokenizerSpecError
from tokenmill.transforms.tokenizers.engines import DIFFERENTIAL_CORPUS, EngineMismatchError
from tokenmill.transforms.tokenizers.spec import load_text_tokenizer

O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"


@pytest.fixture(scope="session")
def reference_o200k(tmp_path_factory):
    """tiktoken's own o200k_base, from tokenmill's bundled ranks placed in tiktoken's cache.

    tiktoken checks them against OpenAI's published sha256 before use.
    """
    import gzip
    from importlib import resources

    import tiktoken

    cache = tmp_path_factory.mktemp("tiktoken-o200k")
    data = gzip.decompress(resources.files("tokenmill.transforms.tokenizers.data").joinpath(
        "o200k_base.tiktoken.gz").read_bytes())
    (cache / hashlib.sha1(O200K_URL.encode()).hexdigest()).write_bytes(data)
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        return tiktoken.get_encoding("o200k_base")
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR")
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


@pytest.fixture(scope="module", params=["cl100k_base", "o200k_base"])
def pair(request, reference_cl100k, reference_o200k):
    """(fast engine tokenizer, tiktoken's own encoding) for one vocabulary."""
    ref = reference_cl100k if request.param == "cl100k_base" else reference_o200k
    return load_text_tokenizer(f"tiktoken:{request.param}", engine="bpe-openai"), ref


def ids(tok, text):
    return tok.encode(text).tolist()


def test_published_cl100k_vectors_on_every_engine():
    vectors = {"hello world": [15339, 1917], "rer": [38149], "'rer": [2351, 81],
               "today\n ": [31213, 198, 220], "today\n \n": [31213, 27907], "today\n  \n": [31213, 14211],
               " \x850": [220, 126, 227, 15], "👍": [9468, 239, 235], "\ud83d\udc4d": [9468, 239, 235]}
    for engine in engines.engine_names():
        tok = load_text_tokenizer("tiktoken:cl100k_base", engine=engine)
        for text, want in vectors.items():
            assert ids(tok, text) == want, (engine, text)
        assert ids(tok, "\ud83d") == ids(tok, "\ufffd")


def test_engine_equals_tiktoken_on_corpora_and_repetitive_strings(pair):
    tok, ref = pair
    corpus = DIFFERENTIAL_CORPUS + MULTILINGUAL + [p.read_text(encoding="utf-8")
                                                   for p in sorted(Path("samples/text").glob("*"))]
    for text in corpus:
        assert ids(tok, text) == ref.encode_ordinary(text)


def test_riptoken_style_whitespace_divergence_does_not_happen(pair):
    tok, ref = pair
    for text in [" " * 50_000 + "x", "\n" * 50_000 + "x", " " * 49_999 + "\tx", "x" + " " * 50_000]:
        assert ids(tok, text) == ref.encode_ordinary(text)


def test_engine_equals_tiktoken_on_documents_of_several_megabytes(pair):
    tok, ref = pair
    source = "".join(p.read_text(encoding="utf-8") for p in sorted(Path("transforms").rglob("*.py")))
    big = (source * (3_000_000 // len(source) + 1))[:3_000_000]
    assert np.array_equal(tok.encode(big), np.asarray(ref.encode_ordinary(big), np.uint32))
    assert ids(tok, "a" * 2_000_000) == ref.encode_ordinary("a" * 2_000_000)


TEXT = st.one_of(
    st.text(max_size=400),
    st.text(alphabet=st.sampled_from(" \t\n\r0123456789"), max_size=400),
    st.text(alphabet=st.characters(whitelist_categories=("Lu", "Ll", "Lo", "Nd", "Zs", "Po", "Mn")), max_size=300),
    st.lists(st.sampled_from(["hello", " world", "分词", "'s", "  ", "\n", "123456", "🚀", "Ωμέγα",
                              ".DefaultCellStyle", "\u200d", "é"]), max_size=80).map("".join),
)


@settings(max_examples=300, deadline=None)
@given(text=TEXT)
def test_engine_equals_tiktoken_on_random_text(pair, text):
    tok, ref = pair
    assert ids(tok, text) == ref.encode_ordinary(text)


def test_o200k_offline_equals_tiktoken_and_has_its_own_fingerprint(reference_o200k):
    tok = load_text_tokenizer("tiktoken:o200k_base", eos=True)
    assert tok.vocab_size == reference_o200k.n_vocab == 200019
    for text in MULTILINGUAL + DIFFERENTIAL_CORPUS[:20]:
        assert ids(tok, text) == reference_o200k.encode_ordinary(text) + [199999]
    assert tok.fingerprint() != load_text_tokenizer("tiktoken:cl100k_base", eos=True).fingerprint()


def test_engine_does_not_change_the_fingerprint_but_is_recorded():
    ref = load_text_tokenizer("tiktoken:cl100k_base", eos=True)
    fast = load_text_tokenizer("tiktoken:cl100k_base", eos=True, engine="bpe-openai")
    assert fast.fingerprint() == ref.fingerprint()
    assert ref.metadata()["engine"] == "tiktoken" and fast.metadata()["engine"] == "bpe-openai"


class _Skewed:
    """A deliberately wrong engine: it drops the last token of inputs containing `trigger`."""

    trigger = ""

    def __init__(self, encoding_name: str):
        self._fast = engines.BpeOpenAIEngine(encoding_name)

    def encode(self, text: str) -> np.ndarray:
        ids = self._fast.encode(text)
        return ids[:-1] if self.trigger in text and len(ids) else ids


def test_an_engine_that_differs_on_the_differential_corpus_is_refused(monkeypatch):
    class Wrong(_Skewed):
        trigger = " " * 50_000  # the riptoken case
    monkeypatch.setitem(engines.ENGINE_FACTORIES, "wrong", Wrong)
    with pytest.raises(TokenizerSpecError, match="differs from tiktoken and is refused"):
        load_text_tokenizer("tiktoken:cl100k_base", engine="wrong")


def test_a_difference_found_during_the_build_stops_it_without_a_manifest(monkeypatch, tmp_path, capsys):
    class Sneaky(_Skewed):
        trigger = "tokenmill-break"
    monkeypatch.setitem(engines.ENGINE_FACTORIES, "sneaky", Sneaky)
    tok = load_text_tokenizer("tiktoken:cl100k_base", engine="sneaky")  # passes the corpus check
    with pytest.raises(EngineMismatchError):
        tok.encode_batch(["tokenmill-break here"])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "tokenmill-break first"}, {"text": "fine"}])
    out = tmp_path / "out"
    assert run_build(["--input", str(tmp_path / "a.jsonl"), "--output", str(out),
                      "--tokenizer", "tiktoken:cl100k_base", "--engine", "sneaky"]) == 1
    assert not (out / "_manifest.json").exists()
    assert "tokenmill build: failed: engine sneaky differs from tiktoken" in capsys.readouterr().err


def test_build_with_the_fast_engine_writes_the_same_rows(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in MULTILINGUAL * 10])
    outs = []
    for engine in ("tiktoken", "bpe-openai"):
        out = tmp_path / engine
        assert run_build(["--input", str(tmp_path / "a.jsonl"), "--output", str(out),
                          "--tokenizer", "tiktoken:o200k_base", "--eos", "--engine", engine]) == 0
        outs.append(read_rows(out))
    assert outs[0].equals(outs[1])


def test_engine_flag_is_rejected_for_other_tokenizers(tmp_path):
    from tests.conftest import run_cli

    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    proc = run_cli("tokenmill.pipelines.build", "--input", str(tmp_path / "a.jsonl"), "--output", str(tmp_path / "o"),
                   "--tokenizer", "bytes", "--engine", "bpe-openai")
    assert proc.returncode == 2 and "--engine does not apply to 'bytes'" in proc.stderr
