"""token_spans and token_pieces: the exact bytes each token of every text family stands for.

Spans come from the tokenizers' own offsets (Hugging Face, SentencePiece) or
byte mappings (tiktoken, bytes, byte-level BPE); inspect shows them.
"""
from __future__ import annotations

import json
import os
import re
import unicodedata

import pytest

from tests.conftest import MULTILINGUAL, run_build, write_jsonl
from tokenmill.pipelines import commands
from tokenmill.transforms.tokenizers.spans import refine, tile
from tokenmill.transforms.tokenizers.spec import load_text_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# name -> spec (filled in from the fixtures) and whether IDs stand for fixed bytes
FAMILIES = {"cl100k": True, "o200k": True, "bytes": True, "hf byte-level": True, "hf wordpiece": False,
            "hf unigram": False, "sentencepiece bpe": False, "sentencepiece unigram": False,
            "hf llama (transformers)": False}
# families that cut characters into byte tokens (byte-level, or SentencePiece byte fallback)
CUTS_CHARACTERS = ["cl100k", "o200k", "bytes", "hf byte-level", "sentencepiece bpe", "sentencepiece unigram",
                   "hf llama (transformers)"]


@pytest.fixture(scope="module")
def tokenizers(hf_folders, sp_models):
    specs = {"cl100k": "tiktoken:cl100k_base", "o200k": "tiktoken:o200k_base", "bytes": "bytes",
             "hf byte-level": f"hf:{hf_folders['byte-level']}", "hf wordpiece": f"hf:{hf_folders['wordpiece']}",
             "hf unigram": f"hf:{hf_folders['unigram']}", "sentencepiece bpe": f"sentencepiece:{sp_models['bpe']}",
             "sentencepiece unigram": f"sentencepiece:{sp_models['unigram']}",
             "hf llama (transformers)": f"hf:{hf_folders['llama']}"}
    return {name: load_text_tokenizer(spec) for name, spec in specs.items()}


def same_text(span: bytes, token: bytes) -> bool:
    """The span holds the token's text, up to what tokenizers normalise: case, accents and marks, NFKC,
    whitespace, ▁."""
    def norm(b: bytes) -> str:
        t = unicodedata.normalize("NFKD", b.decode("utf-8", "ignore")).casefold()
        return "".join(c for c in t if not c.isspace() and not unicodedata.category(c).startswith("M") and c != "▁")

    return span == token or norm(span) == norm(token)


def test_skipped_text_goes_to_the_next_token_and_a_shared_character_is_cut_into_its_bytes():
    data = "a  bß".encode()  # offsets: "a"; "b" after two skipped spaces; ß claimed by two byte tokens
    raw, pieces = [(0, 1), (3, 4), (4, 6), (4, 6)], [b"a", b"b", b"\xc3", b"\x9f"]
    assert refine(tile(raw, len(data)), pieces, data) == [(0, 1), (1, 4), (4, 5), (5, 6)]
    # a prepended word mark offset onto the first character yields it to the token that holds it
    assert tile([(0, 1), (0, 3)], 5) == [(0, 0), (0, 5)]


@pytest.mark.parametrize("name", FAMILIES)
def test_spans_tile_the_document_byte_for_byte_and_hold_their_tokens(tokenizers, name):
    tok = tokenizers[name]
    for text in MULTILINGUAL:
        data, ids = text.encode(), tok.encode(text).tolist()
        spans = tok.token_spans(text)
        assert len(spans) == len(ids)
        assert b"".join(data[s:e] for s, e in spans) == data, text
        if spans:
            assert spans[0][0] == 0 and spans[-1][1] == len(data)
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
        if name == "hf wordpiece":  # NFD: a token may hold part of a character (한 → ᄒ ##ᅡ ##ᆫ...)
            assert_aligned(tok, data, spans, ids)
            continue
        group = b""  # tokens with an empty span share the next one's (one character, several tokens)
        for (s, e), i in zip(spans, ids, strict=True):
            token = tok.token_bytes(i)
            if FAMILIES[name]:
                assert data[s:e] == token, (text, i)
            elif s == e:
                group += token
            elif token not in (b"[UNK]", b"<unk>"):
                assert same_text(data[s:e], group + token), (text, data[s:e], group + token)
                group = b""


def assert_aligned(tok, data: bytes, spans, ids) -> None:
    """Spans and tokens agree run by run: each run ends where the spans' text and the tokens' text match."""
    span_acc = token_acc = b""
    for (s, e), i in zip(spans, ids, strict=True):
        span_acc += data[s:e]
        token = tok.token_bytes(i)
        if token in (b"[UNK]", b"<unk>"):
            span_acc = token_acc = b""
            continue
        token_acc += token
        if same_text(span_acc, token_acc):
            span_acc = token_acc = b""
    assert same_text(span_acc, token_acc), (data, span_acc, token_acc)


@pytest.mark.parametrize("name", CUTS_CHARACTERS)
def test_a_boundary_inside_a_character_is_kept_where_the_tokens_cut_it(tokenizers, name):
    tok = tokenizers[name]
    text = MULTILINGUAL[9] + " 龘"  # emoji, four bytes each; a character no vocabulary here holds
    data = text.encode()
    inside = [e for _, e in tok.token_spans(text)[:-1] if data[e] & 0xC0 == 0x80]
    assert inside, "no token ends inside a character"


@pytest.mark.parametrize("name", FAMILIES)
def test_pieces_from_ids_join_to_the_decoded_document(tokenizers, name):
    tok = tokenizers[name]
    for text in MULTILINGUAL:
        ids = tok.encode(text).tolist()
        pieces = tok.token_pieces(ids)
        assert len(pieces) == len(ids)
        if FAMILIES[name]:
            assert b"".join(pieces) == text.encode()
        elif tok.encode(tok.decode(ids)).tolist() == ids:  # else pieces are each ID's own bytes
            assert b"".join(pieces).decode("utf-8") == tok.decode(ids), text


@pytest.mark.parametrize("name,doc,expected", [
    ("byte-level", "Die Straßenbahn fährt 🚀.", "Die Straßenbahn fährt 🚀."),
    ("wordpiece", "Der schnelle braune Fuchs.", "der schnelle braune fuchs."),
])
def test_inspect_shows_each_token_s_text_on_hf_datasets(hf_folders, tmp_path, capsys, name, doc, expected):
    """Once mojibake for byte-level BPE (Stra��enbahn) and without spaces for WordPiece (derschnellebraune)."""
    write_jsonl(tmp_path / "docs.jsonl", [{"text": doc}])
    out = tmp_path / "ds"
    assert run_build(["--input", str(tmp_path / "docs.jsonl"), "--output", str(out), "--tokenizer",
                      f"hf:{hf_folders[name]}", "--eos", "--progress", "none"]) == 0
    capsys.readouterr()  # the build's summary
    assert commands.inspect([str(out), "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)["rows"]
    eos = "<|endoftext|>" if name == "byte-level" else "[SEP]"
    assert row["text"] == expected + eos
    assert "\ufffd" not in row["marked"] and sum(t["chars"] for t in row["tokens"]) == len(row["text"])
    # each token shows its own bytes: whole characters as they are, a split character's bytes as \\xNN
    assert b"".join(shown_bytes(t["text"]) for t in row["tokens"]) == row["text"].encode()
    if name == "byte-level":  # the rocket is four byte tokens: three boundaries inside it
        assert "\\xf0¦\\x9f¦\\x9a¦\\x80" in row["marked"] or row["marked"].count("¦") >= 1


def shown_bytes(text: str) -> bytes:
    """A token as inspect shows it, back to bytes (the documents here hold no backslash)."""
    return b"".join(bytes([int(part[2:], 16)]) if part.startswith("\\x") else part.encode()
                    for part in re.split(r"(\\x[0-9a-f]{2})", text) if part)
