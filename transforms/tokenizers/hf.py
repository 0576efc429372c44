"""Hugging Face `tokenizers` vocabularies: a tokenizer.json, or a save_pretrained folder.

Needs the optional extra `tokenmill[hf]`. Added special tokens that appear
literally in a document are encoded as text (`encode_special_tokens`), and no
template tokens are added; BOS/EOS come only from the --bos/--eos policy, using
the tokenizer's bos_token/eos_token from tokenizer_config.json or
special_tokens_map.json.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import numpy as np

from tokenmill.schemas.storage import join, read_bytes
from tokenmill.transforms.tokenizers.base import TextTokenizer, TokenizerSpecError

_EOS_GUESSES = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")
_BOS_GUESSES = ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]", "<|endoftext|>")


def _token_name(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_optional_json(uri: str) -> dict[str, Any]:
    try:
        return json.loads(read_bytes(uri))
    except (FileNotFoundError, ValueError):
        return {}


class HFTokenizer(TextTokenizer):
    def __init__(self, spec: str, source: str, *, bos: bool = False, eos: bool = False):
        super().__init__(spec, bos=bos, eos=eos)
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise TokenizerSpecError("hf: tokenizers need the extra: pip install 'tokenmill[hf]'") from e
        folder = None if source.endswith(".json") else source.rstrip("/")
        path = join(folder, "tokenizer.json") if folder else source
        try:
            contents = read_bytes(path)
            self._tok = Tokenizer.from_str(contents.decode("utf-8"))
        except Exception as e:
            raise TokenizerSpecError(f"cannot load Hugging Face tokenizer {path}: {e}") from e
        self._tok.encode_special_tokens = True  # a literal "<|endoftext|>" is text
        self._sha256 = hashlib.sha256(contents).hexdigest()
        config = {}
        if folder:
            config = {**_read_optional_json(join(folder, "special_tokens_map.json")),
                      **_read_optional_json(join(folder, "tokenizer_config.json"))}
        self.name = (folder or source).rstrip("/").rsplit("/", 1)[-1]
        # The width of the stored IDs comes from the largest ID the tokenizer can
        # emit, not from get_vocab_size() (a count): a vocabulary with gaps, or an
        # added token at 70000 beside 100 entries, would otherwise wrap in uint16.
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self.special_tokens = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()
                               if t.special}
        self.bos_token = _token_name(config.get("bos_token")) or next(
            (t for t in _BOS_GUESSES if t in self.special_tokens), None)
        self.eos_token = _token_name(config.get("eos_token")) or next(
            (t for t in _EOS_GUESSES if t in self.special_tokens), None)
        _ = self.bos_id, self.eos_id  # fail at load time if the policy cannot be met

    def _identity(self) -> dict[str, Any]:
        return {"family": "hf-tokenizers", "tokenizer_json_sha256": self._sha256,
                "encode_special_tokens": True}

    def _encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        return self.decode([token_id]).encode("utf-8")


def load(spec: str, arg: str, modality: str, *, bos: bool = False, eos: bool = False) -> HFTokenizer:
    return HFTokenizer(spec, arg, bos=bos, eos=eos)


def _family():
    from tokenmill.transforms.registry import TokenizerFamily
    from tokenmill.transforms.tokenizers.base import text_policy_options

    return TokenizerFamily("hf", ("text",), ("hf:PATH_OR_URI",), loader=f"{__name__}:load",
                           options=text_policy_options(), extra="hf", requires=("tokenizers",))


FAMILY = _family()
