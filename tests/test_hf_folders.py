"""hf: on every folder transformers.AutoTokenizer loads offline, and sentencepiece: on raw .model files.

The references are the libraries themselves: AutoTokenizer.from_pretrained and
SentencePieceProcessor, on tokenizers trained here (conftest: sp_models,
hf_folders). Builds run for real and are read back from disk.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import MULTILINGUAL, read_rows, run_build, write_jsonl
from tokenmill.schemas.manifest import read_manifest
from tokenmill.transforms.tokenizers.base import TokenizerSpecError
from tokenmill.transforms.tokenizers.spec import load_text_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TRANSFORMERS_WAY = ["llama", "gemma", "t5", "gpt2", "llama-json"]
TOKENIZERS_WAY = ["byte-level", "wordpiece", "unigram"]


def auto(folder, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), **kwargs)


def ids(tok, text: str) -> list[int]:
    return tok.encode(text).tolist()


@pytest.mark.parametrize("name", TRANSFORMERS_WAY + TOKENIZERS_WAY)
def test_ids_equal_autotokenizer_on_the_multilingual_corpus(hf_folders, name):
    tok = load_text_tokenizer(f"hf:{hf_folders[name]}")
    plain, split = auto(hf_folders[name]), auto(hf_folders[name], split_special_tokens=True)
    specials = [t.content for t in plain.backend_tokenizer.get_added_tokens_decoder().values() if t.special]
    for text in MULTILINGUAL:
        assert ids(tok, text) == split(text, add_special_tokens=False)["input_ids"], (name, text)
        if not any(s in text for s in specials):  # the plain call reads a literal "<s>" as a control token
            assert ids(tok, text) == plain(text, add_special_tokens=False)["input_ids"], (name, text)
    assert tok.decode(ids(tok, MULTILINGUAL[1])) == plain.decode(ids(tok, MULTILINGUAL[1]))


@pytest.mark.parametrize("name", TRANSFORMERS_WAY + TOKENIZERS_WAY)
def test_a_block_encodes_to_each_documents_own_ids(hf_folders, name):
    """A block goes through one batch call without offsets (encode_batch_fast); each row must hold what
    the library's plain encode (with offsets) gives that document alone."""
    tok = load_text_tokenizer(f"hf:{hf_folders[name]}")
    column, failures = tok.encode_batch(MULTILINGUAL)
    assert not failures
    alone = [tok._tok.encode(text, add_special_tokens=False).ids for text in MULTILINGUAL]
    assert column.to_pylist() == alone
    assert sum(map(len, alone)) > len(MULTILINGUAL)


def test_the_converted_tokenizer_has_one_fingerprint_in_every_process(hf_folders):
    """Workers load the spec again: the conversion must give the launcher's fingerprint."""
    code = ("from tokenmill.transforms.tokenizers.spec import load_text_tokenizer as load; "
            f"print(load('hf:{hf_folders['llama']}', eos=True).fingerprint())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == load_text_tokenizer(f"hf:{hf_folders['llama']}", eos=True).fingerprint()


@pytest.mark.parametrize("name", TRANSFORMERS_WAY)
def test_transformers_way_records_its_version_and_the_converted_tokenizer(hf_folders, name):
    import transformers

    tok = load_text_tokenizer(f"hf:{hf_folders[name]}")
    identity = tok.identity()
    assert identity["family"] == "hf-transformers" and identity["transformers"] == transformers.__version__
    converted = auto(hf_folders[name]).backend_tokenizer.to_str()
    assert identity["converted_tokenizer_json_sha256"] == hashlib.sha256(converted.encode()).hexdigest()
    assert load_text_tokenizer(f"hf:{hf_folders[name]}").fingerprint() == tok.fingerprint()


def test_a_plain_tokenizer_json_folder_loads_without_importing_transformers(hf_folders):
    code = ("import sys, json; from tokenmill.transforms.tokenizers.spec import load_text_tokenizer as load; "
            f"toks = [load('hf:' + p) for p in {[str(hf_folders[n]) for n in TOKENIZERS_WAY]!r}]; "
            "print(json.dumps([[t.identity() for t in toks], 'transformers' in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    identities, imported = json.loads(proc.stdout)
    assert imported is False
    for name, identity in zip(TOKENIZERS_WAY, identities, strict=True):
        contents = (hf_folders[name] / "tokenizer.json").read_bytes()
        assert identity["family"] == "hf-tokenizers" and "transformers" not in identity
        assert identity["tokenizer_json_sha256"] == hashlib.sha256(contents).hexdigest()


def test_bos_and_eos_follow_the_tokenizer_config(hf_folders):
    tok = load_text_tokenizer(f"hf:{hf_folders['llama']}", bos=True, eos=True)
    ref = auto(hf_folders["llama"])
    body = ref("Hello, world!", add_special_tokens=False)["input_ids"]
    assert ids(tok, "Hello, world!") == [ref.bos_token_id, *body, ref.eos_token_id]
    assert (tok.bos_token, tok.eos_token, ref.bos_token_id) == ("<s>", "</s>", 1)
    gpt2 = load_text_tokenizer(f"hf:{hf_folders['gpt2']}", eos=True)
    assert ids(gpt2, "x")[-1] == auto(hf_folders["gpt2"]).convert_tokens_to_ids("<|endoftext|>")
    with pytest.raises(TokenizerSpecError, match="has no BOS token"):
        load_text_tokenizer(f"hf:{hf_folders['t5']}", bos=True)  # T5 has none


def test_saved_truncation_and_padding_do_not_cut_or_pad_documents(hf_folders, tmp_path):
    from tokenizers import Tokenizer

    saved = Tokenizer.from_file(str(hf_folders["byte-level"] / "tokenizer.json"))
    saved.enable_truncation(4)
    saved.enable_padding(length=64, pad_id=0)
    saved.save(str(tmp_path / "tokenizer.json"))
    text = MULTILINGUAL[0]
    got = ids(load_text_tokenizer(f"hf:{tmp_path}"), text)
    assert got == Tokenizer.from_file(str(hf_folders["byte-level"] / "tokenizer.json")).encode(text).ids
    assert len(got) == 26


def test_a_document_the_library_refuses_fails_alone_and_the_block_is_kept(hf_folders):
    """Blocks are encoded with one encode_batch call; a document it cannot take is then found one by one."""
    tok = load_text_tokenizer(f"hf:{hf_folders['byte-level']}")
    column, failures = tok.encode_batch(["fine", "a lone \ud800 surrogate", "more fine"])
    assert [i for i, _ in failures] == [1]
    assert column.to_pylist() == [ids(tok, "fine"), ids(tok, "more fine")]


def test_bpe_dropout_is_refused(hf_folders, tmp_path):
    data = json.loads((hf_folders["byte-level"] / "tokenizer.json").read_text())
    data["model"]["dropout"] = 0.1
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerSpecError, match="dropout"):
        load_text_tokenizer(f"hf:{tmp_path}")


def test_messages_name_the_problem_in_one_line(hf_folders, sp_models, tmp_path, monkeypatch):
    import importlib.util

    cases = [(f"hf:{sp_models['bpe']}", f"is a file, not a tokenizer.json or a tokenizer folder; for a raw "
                                        f"SentencePiece model use sentencepiece:{sp_models['bpe']}"),
             (f"hf:{tmp_path / 'missing'}", "no such tokenizer file or folder")]
    (tmp_path / "readme").mkdir()
    (tmp_path / "readme" / "README.md").write_text("hi")
    cases.append((f"hf:{tmp_path / 'readme'}", "no tokenizer files in the folder"))
    (tmp_path / "bare").mkdir()
    for f in ("vocab.json", "merges.txt"):
        (tmp_path / "bare" / f).write_bytes((hf_folders["gpt2"] / f).read_bytes())
    cases.append((f"hf:{tmp_path / 'bare'}", "needs a tokenizer_config.json naming its tokenizer_class"))
    for spec, message in cases:
        with pytest.raises(TokenizerSpecError) as e:
            load_text_tokenizer(spec)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "transformers" else real(m, *a))
    with pytest.raises(TokenizerSpecError) as e:
        load_text_tokenizer(f"hf:{hf_folders['llama']}")
    assert str(e.value) == (f"hf:{hf_folders['llama']}: a folder without tokenizer.json (converted by "
                            "transformers) needs transformers, which is not installed: pip install 'tokenmill[hf]'")
    with pytest.raises(TokenizerSpecError, match=r"a tokenizer.json under tokenizer_class LlamaTokenizer \(rebuilt"):
        load_text_tokenizer(f"hf:{hf_folders['llama-json']}")


def test_build_on_a_sentencepiece_only_folder_reads_back_autotokenizer_ids(hf_folders, tmp_path):
    """The folder that used to fail with 'tokenizer.model/tokenizer.json: Not a directory'."""
    texts = [t for t in MULTILINGUAL if t]
    write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    out = tmp_path / "ds"
    assert run_build(["--input", str(tmp_path / "docs.jsonl"), "--output", str(out), "--tokenizer",
                      f"hf:{hf_folders['llama']}", "--eos", "--progress", "none"]) == 0
    ref = auto(hf_folders["llama"], split_special_tokens=True)
    expected = sorted(ref(t, add_special_tokens=False)["input_ids"] + [ref.eos_token_id] for t in texts)
    assert sorted(read_rows(out).column("tokens").to_pylist()) == expected
    m = read_manifest(str(out))
    assert m.tokenizer["fingerprint"] == load_text_tokenizer(f"hf:{hf_folders['llama']}", eos=True).fingerprint()


def test_a_spec_that_cannot_load_is_a_usage_error(sp_models, tmp_path, capsys):
    write_jsonl(tmp_path / "docs.jsonl", [{"text": "x"}])
    with pytest.raises(SystemExit) as e:
        run_build(["--input", str(tmp_path / "docs.jsonl"), "--output", str(tmp_path / "ds"),
                   "--tokenizer", f"hf:{sp_models['bpe']}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "use sentencepiece:" in err and err.count("\n") == 1
