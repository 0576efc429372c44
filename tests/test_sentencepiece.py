"""sentencepiece: on raw .model files: IDs, BOS/EOS and fingerprint as SentencePieceProcessor gives them.

The models are trained here (conftest: sp_models); builds run for real and are read back from disk.
"""
from __future__ import annotations

import hashlib

import pytest

from tests.conftest import MULTILINGUAL, read_rows, run_build, write_jsonl
from tokenmill.schemas.manifest import read_manifest
from tokenmill.transforms.tokenizers.base import TokenizerSpecError
from tokenmill.transforms.tokenizers.spec import load_text_tokenizer


def ids(tok, text: str) -> list[int]:
    return tok.encode(text).tolist()


@pytest.mark.parametrize("name", ["bpe", "unigram"])
def test_sentencepiece_ids_equal_the_processor(sp_models, name):
    import sentencepiece

    ref = sentencepiece.SentencePieceProcessor(model_file=str(sp_models[name]))
    tok = load_text_tokenizer(f"sentencepiece:{sp_models[name]}")
    for text in MULTILINGUAL + ["a literal <s> and </s> and <unk> are text"]:
        assert ids(tok, text) == ref.encode(text), text
    assert tok.vocab_size == ref.get_piece_size() and tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    assert tok.identity()["model_sha256"] == hashlib.sha256(sp_models[name].read_bytes()).hexdigest()
    assert tok.decode(ref.encode("Hello, world!")) == "Hello, world!"


def test_sentencepiece_bos_and_eos_are_the_model_s_own(sp_models):
    import sentencepiece

    ref = sentencepiece.SentencePieceProcessor(model_file=str(sp_models["bpe"]))
    tok = load_text_tokenizer(f"sentencepiece:{sp_models['bpe']}", bos=True, eos=True)
    assert ids(tok, "Hello") == ref.encode("Hello", add_bos=True, add_eos=True)
    assert tok.decode(ids(tok, "Hello")) == "<s>Hello</s>"
    assert load_text_tokenizer(f"sentencepiece:{sp_models['no-bos']}", eos=True).eos_id == 1
    with pytest.raises(TokenizerSpecError, match="has no BOS token"):
        load_text_tokenizer(f"sentencepiece:{sp_models['no-bos']}", bos=True)


def test_sentencepiece_refuses_what_is_not_a_model(tmp_path):
    (tmp_path / "x.model").write_bytes(b"not a model")
    for spec, message in ((f"sentencepiece:{tmp_path / 'x.model'}", "not a SentencePiece model"),
                          (f"sentencepiece:{tmp_path / 'missing.model'}", "no such file"),
                          ("sentencepiece", "needs an argument")):
        with pytest.raises(TokenizerSpecError, match=message):
            load_text_tokenizer(spec)


def test_sentencepiece_build_with_bos_reads_back_processor_ids(sp_models, tmp_path):
    import sentencepiece

    ref = sentencepiece.SentencePieceProcessor(model_file=str(sp_models["unigram"]))
    texts = [t for t in MULTILINGUAL if t]
    write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    out = tmp_path / "ds"
    assert run_build(["--input", str(tmp_path / "docs.jsonl"), "--output", str(out), "--tokenizer",
                      f"sentencepiece:{sp_models['unigram']}", "--bos", "--progress", "none"]) == 0
    assert sorted(read_rows(out).column("tokens").to_pylist()) == sorted(ref.encode(t, add_bos=True) for t in texts)
    assert read_manifest(str(out)).tokenizer["special_token_policy"]["bos_id"] == 1
