"""Hugging Face tokenizers: a tokenizer.json, or any folder `transformers.AutoTokenizer` loads offline.

`hf:PATH_OR_URI` takes one of two ways in, chosen by the folder's files alone
(never by what is installed, so one spec gives one set of IDs everywhere):

- **tokenizers alone** reads a `tokenizer.json` file, and a folder whose
  tokenizer.json transformers uses as it is: one that names no model-specific
  tokenizer class (tokenizer_config.json `tokenizer_class`, else config.json
  `model_type`), or names the generic PreTrainedTokenizerFast. Fingerprint: the
  file's sha256.
- **transformers** builds the tokenizer for every other folder: SentencePiece
  only (`tokenizer.model` + tokenizer_config.json, as Llama 2, T5 and Gemma
  ship), `vocab.json` + `merges.txt`, `vocab.txt`, or a tokenizer.json under a
  model class that transformers rebuilds its own way (LlamaTokenizer,
  GPT2Tokenizer with add_prefix_space, ...). Its `tokenizers` backend then
  encodes. The conversion is transformers' code, so on this way only the
  fingerprint records the transformers version, beside the converted
  tokenizer's sha256.

Both need the extra `tokenmill[hf]`; transformers is imported only on the
second way (it imports torch when torch is installed, but does not need it).
IDs equal `AutoTokenizer.from_pretrained(PATH, split_special_tokens=True)(text,
add_special_tokens=False)["input_ids"]`: the plain call's IDs, except that a
special token written literally in a document is encoded as text (tokenmill's
policy). No template tokens are added, truncation and padding saved in the
tokenizer are off, and BPE dropout is refused (not deterministic). BOS/EOS come
only from --bos/--eos, as the tokenizer's own bos_token/eos_token
(tokenizer_config.json or special_tokens_map.json; on the transformers way, its
class's defaults too).

On object storage (s3://, gs://) transformers gets a local temporary copy of
the folder's tokenizer files and other small files (up to 64 MiB each; never
model weights).
"""
from __future__ import annotations

import array
import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
import tempfile
from typing import Any, Iterator, Sequence

import numpy as np

from tokenmill.schemas.storage import join, read_bytes, with_retries
from tokenmill.transforms.tokenizers import spans
from tokenmill.transforms.tokenizers.base import _PROCESS_EXCEPTIONS, TextTokenizer, TokenizerSpecError

_EOS_GUESSES = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")
_BOS_GUESSES = ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]", "<|endoftext|>")
# Classes under which transformers takes tokenizer.json as it is (TokenizersBackend's alias).
GENERIC_CLASSES = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend"})
# Files transformers builds a tokenizer from when there is no usable tokenizer.json.
_VOCAB_FILES = re.compile(r"(tokenizer\.json|.*\.model|vocab\.json|vocab\.txt|merges\.txt|tekken\.json|.*\.tiktoken)")
# On object storage, what is copied for transformers: the tokenizer files, and the other files up to
# SMALL_FILE that are not model weights.
SMALL_FILE = 64 << 20
_WEIGHTS = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|gguf|h5|msgpack|onnx|npz|tflite)")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _uint32(ids: list[int]) -> np.ndarray:
    """An encoding's IDs (a list of Python ints) as uint32: through array.array, about 4x faster than
    np.asarray(ids, np.uint32), which inspects every element for its type first (0.14 against 0.03 s for
    7.6 M IDs here)."""
    return np.frombuffer(array.array("I", ids), dtype=np.uint32) if _UINT_IS_32 else np.asarray(ids, np.uint32)


_UINT_IS_32 = array.array("I").itemsize == 4


def _token_name(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_optional_json(uri: str) -> dict[str, Any]:
    try:
        value = json.loads(read_bytes(uri))
    except (FileNotFoundError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-character table, reversed: the character byte-level BPE writes for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _components(state: bytes | None) -> list[dict[str, Any]]:
    """A decoder's or pre-tokenizer's parts, Sequences flattened, from its JSON state."""
    if not state:
        return []
    stack, out = [json.loads(state)], []
    while stack:
        node = stack.pop(0)
        inner = node.get("decoders") or node.get("pretokenizers")
        if node.get("type") == "Sequence" and inner is not None:
            stack[:0] = inner
        else:
            out.append(node)
    return out


class HFTokenizer(TextTokenizer):
    """A `tokenizers` Tokenizer that encodes, loaded from tokenizer.json or built by transformers (see module)."""

    def __init__(self, spec: str, backend: Any, *, name: str, identity: dict[str, Any],
                 bos_token: str | None, eos_token: str | None, guess: bool, bos: bool = False, eos: bool = False):
        super().__init__(spec, bos=bos, eos=eos)
        if getattr(backend.model, "dropout", None):
            raise TokenizerSpecError(f"{spec}: BPE dropout {backend.model.dropout} makes IDs random; "
                                     "save the tokenizer without dropout")
        backend.encode_special_tokens = True  # a literal "<|endoftext|>" is text
        backend.no_truncation()
        backend.no_padding()
        self._tok = backend
        self._identity_data = identity
        self.name = name
        # The width of the stored IDs comes from the largest ID the tokenizer can
        # emit, not from get_vocab_size() (a count): a vocabulary with gaps, or an
        # added token at 70000 beside 100 entries, would otherwise wrap in uint16.
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        added = backend.get_added_tokens_decoder()
        self._added = {i: t.content for i, t in added.items()}
        self.special_tokens = {t.content: i for i, t in added.items() if t.special}
        for token in (bos_token, eos_token):  # a class default that is an ordinary vocabulary entry
            if token is not None and token not in self.special_tokens and backend.token_to_id(token) is not None:
                self.special_tokens[token] = backend.token_to_id(token)
        if guess:  # a tokenizer.json without a config naming them: the usual names
            bos_token = bos_token or next((t for t in _BOS_GUESSES if t in self.special_tokens), None)
            eos_token = eos_token or next((t for t in _EOS_GUESSES if t in self.special_tokens), None)
        self.bos_token, self.eos_token = bos_token, eos_token
        _ = self.bos_id, self.eos_id  # fail at load time if the policy cannot be met
        decoder = _components(backend.decoder.__getstate__() if backend.decoder else None)
        pre = _components(backend.pre_tokenizer.__getstate__() if backend.pre_tokenizer else None)
        kinds = {c.get("type") for c in decoder + pre}
        self._byte_level = "ByteLevel" in kinds
        self._byte_fallback = "ByteFallback" in kinds
        # Per-token text rules of the decoder, in order: (old, new) replacements.
        self._replace: list[tuple[str, str]] = []
        for c in decoder:
            if c.get("type") == "Metaspace":
                self._replace.append((c.get("replacement", "▁"), " "))
            elif c.get("type") == "Replace" and "String" in (c.get("pattern") or {}):
                self._replace.append((c["pattern"]["String"], c.get("content", "")))
            elif c.get("type") == "BPEDecoder":
                self._replace.append((c.get("suffix", "</w>"), " "))
        self._prefix = next((c.get("prefix", "##") for c in decoder if c.get("type") == "WordPiece"), None)

    def _identity(self) -> dict[str, Any]:
        return self._identity_data

    def _encode(self, text: str) -> np.ndarray:
        return _uint32(self._tok.encode(text, add_special_tokens=False).ids)

    def _encode_each(self, texts: Sequence[str]) -> list[Any]:
        """One batch call per block (measured about a fifth faster than a call per document, and it may
        use the library's threads); a failing document sends the block back one by one.

        `encode_batch_fast` (tokenizers >= 0.20) gives the same IDs without tracking character offsets,
        which rows do not need: about 20% fewer instructions than `encode_batch` on byte-level BPE
        (callgrind, docs/benchmarks.md). token_spans still uses `encode`, which has them."""
        batch = getattr(self._tok, "encode_batch_fast", None) or self._tok.encode_batch
        try:
            encodings = batch(list(texts), add_special_tokens=False)
        except BaseException as e:  # noqa: BLE001 - a bad document (a lone surrogate, a Rust panic): find it
            if isinstance(e, _PROCESS_EXCEPTIONS):
                raise
            return super()._encode_each(texts)
        return [_uint32(e.ids) for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The token's own bytes: byte-level characters mapped back to bytes, `<0xE4>` byte-fallback
        tokens as that byte, the decoder's word marks (▁, ##, </w>) as the space they stand for."""
        token_id = int(token_id)
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        token = self._tok.id_to_token(token_id)
        if token is None:
            return b""
        if self._byte_fallback and (m := _BYTE_TOKEN.fullmatch(token)):
            return bytes([int(m.group(1), 16)])
        if self._byte_level:
            alphabet = _byte_level_alphabet()
            if all(c in alphabet for c in token):
                return bytes(alphabet[c] for c in token)
        if self._prefix and token.startswith(self._prefix):
            token = token[len(self._prefix):]
        for old, new in self._replace:
            token = token.replace(old, new)
        return token.encode("utf-8")

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """From the tokenizer's character offsets (see TextTokenizer.token_spans), or its tokens' own
        bytes where they join to the document (byte-level BPE without a normaliser)."""
        enc = self._tok.encode(text, add_special_tokens=False)
        data = spans.utf8(text)
        pieces = [self.token_bytes(i) for i in enc.ids]
        exact = spans.spans_of_pieces(data, pieces)
        if exact is not None:
            return exact
        at = spans.char_offsets(text)
        raw = [(int(at[s]), int(at[e])) for s, e in enc.offsets]
        return spans.refine(spans.tile(raw, len(data)), pieces, data)

    def token_pieces(self, ids: Sequence[int]) -> list[bytes]:
        return self._pieces_by_reencoding(ids)


# -- loading -----------------------------------------------------------------

def _listing(uri: str) -> dict[str, int] | None:
    """{file name: size} of a folder's files; None if `uri` is a file. TokenizerSpecError if neither."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    try:
        entries = with_retries(lambda: fs.ls(path, detail=True), f"listing {uri}")
    except (FileNotFoundError, NotADirectoryError):
        entries = None
    except OSError as e:
        raise TokenizerSpecError(f"hf:{uri}: cannot list the folder: {e}") from None
    if not entries or (len(entries) == 1 and entries[0]["type"] == "file"
                       and entries[0]["name"].rstrip("/") == path.rstrip("/")):
        if with_retries(lambda: fs.isfile(path), f"checking {uri}"):
            return None
        raise TokenizerSpecError(f"hf:{uri}: no such tokenizer file or folder")
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
            for e in entries if e["type"] == "file"}


def _named_class(folder: str, files: dict[str, int]) -> tuple[str, str] | None:
    """What names the tokenizer class AutoTokenizer picks: ("tokenizer_class", tokenizer_config.json's
    class) or ("model_type", config.json's), or None."""
    config = _read_optional_json(join(folder, "tokenizer_config.json")) if "tokenizer_config.json" in files else {}
    if config.get("tokenizer_class"):
        return "tokenizer_class", str(config["tokenizer_class"])
    model = _read_optional_json(join(folder, "config.json")) if "config.json" in files else {}
    return ("model_type", str(model["model_type"])) if model.get("model_type") else None


def _from_tokenizer_json(spec: str, path: str, folder: str | None, *, bos: bool, eos: bool) -> HFTokenizer:
    from tokenizers import Tokenizer

    try:
        contents = read_bytes(path)
        backend = Tokenizer.from_str(contents.decode("utf-8"))
    except FileNotFoundError:
        raise TokenizerSpecError(f"hf:{path}: no such file") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise TokenizerSpecError(f"hf:{path}: not a tokenizers tokenizer.json: {first[:200]}") from e
    config = {}
    if folder:
        config = {**_read_optional_json(join(folder, "special_tokens_map.json")),
                  **_read_optional_json(join(folder, "tokenizer_config.json"))}
    identity = {"family": "hf-tokenizers", "tokenizer_json_sha256": hashlib.sha256(contents).hexdigest(),
                "encode_special_tokens": True}
    return HFTokenizer(spec, backend, name=(folder or path).rstrip("/").rsplit("/", 1)[-1], identity=identity,
                       bos_token=_token_name(config.get("bos_token")), eos_token=_token_name(config.get("eos_token")),
                       guess=True, bos=bos, eos=eos)


@contextlib.contextmanager
def _local_folder(uri: str, files: dict[str, int]) -> Iterator[str]:
    """A local path holding the folder's files: itself, or a temporary copy of its tokenizer files and
    other small files (not model weights)."""
    from tokenmill.transforms.fs import canonical, is_local

    if is_local(uri):
        yield canonical(uri)
        return
    with tempfile.TemporaryDirectory(prefix="tokenmill-hf-") as tmp:
        for name, size in files.items():
            if _VOCAB_FILES.fullmatch(name) or (size <= SMALL_FILE and not _WEIGHTS.fullmatch(name)):
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(read_bytes(join(uri, name)))
        yield tmp


def _require_transformers(uri: str, files: dict[str, int], why: str) -> None:
    needed = ["transformers"] + (["sentencepiece"] if any(n.endswith(".model") for n in files) else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise TokenizerSpecError(f"hf:{uri}: {why} needs {' and '.join(missing)}, which "
                                 f"{'is' if len(missing) == 1 else 'are'} not installed: pip install 'tokenmill[hf]'")
    if "sentencepiece" in needed:
        try:  # transformers reads tokenizer.model through this module; it fails on a protobuf mismatch
            from sentencepiece import sentencepiece_model_pb2  # noqa: F401
        except Exception as e:
            raise TokenizerSpecError(
                f"hf:{uri}: transformers reads tokenizer.model with sentencepiece's protobuf module, which fails "
                f"here ({type(e).__name__}: {str(e).splitlines()[0][:160]}); sentencepiece 0.2.3 needs protobuf 7, "
                "which Apache Beam does not allow: pip install 'sentencepiece!=0.2.3'") from None


def _with_transformers(spec: str, uri: str, files: dict[str, int], why: str, *, bos: bool,
                       eos: bool) -> HFTokenizer:
    _require_transformers(uri, files, why)
    import transformers
    from transformers import AutoTokenizer

    with _local_folder(uri, files) as folder:
        try:
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        except Exception as e:
            hint = ""
            if "vocab.json" in files and not ({"tokenizer_config.json", "config.json"} & set(files)):
                hint = " (a vocab.json + merges.txt folder needs a tokenizer_config.json naming its " \
                       "tokenizer_class, such as GPT2Tokenizer)"
            first = (str(e).strip().splitlines() or [""])[0]
            raise TokenizerSpecError(f"hf:{uri}: transformers cannot load this folder{hint}: "
                                     f"{type(e).__name__}: {first[:200]}") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerSpecError(f"hf:{uri}: transformers loads it as {type(tok).__name__}, a Python "
                                 "tokenizer without a tokenizers backend, which tokenmill does not run")
    converted = backend.to_str()
    identity = {"family": "hf-transformers", "tokenizer_class": type(tok).__name__,
                "transformers": transformers.__version__,
                "converted_tokenizer_json_sha256": hashlib.sha256(converted.encode("utf-8")).hexdigest(),
                "encode_special_tokens": True}
    return HFTokenizer(spec, backend, name=uri.rstrip("/").rsplit("/", 1)[-1], identity=identity,
                       bos_token=_token_name(tok.bos_token), eos_token=_token_name(tok.eos_token), guess=False,
                       bos=bos, eos=eos)


def load(spec: str, arg: str, modality: str, *, bos: bool = False, eos: bool = False) -> HFTokenizer:
    uri = arg.rstrip("/")
    if uri.endswith(".json"):
        return _from_tokenizer_json(spec, uri, None, bos=bos, eos=eos)
    files = _listing(uri)
    if files is None:
        hint = f"; for a raw SentencePiece model use sentencepiece:{arg}" if uri.endswith(".model") else ""
        raise TokenizerSpecError(f"hf:{arg} is a file, not a tokenizer.json or a tokenizer folder{hint}")
    if not any(_VOCAB_FILES.fullmatch(n) for n in files):
        raise TokenizerSpecError(f"hf:{arg}: no tokenizer files in the folder (tokenizer.json, tokenizer.model "
                                 f"with tokenizer_config.json, or vocab.json with merges.txt); it holds "
                                 f"{', '.join(sorted(files)[:8]) or 'nothing'}")
    named = _named_class(uri, files)
    if "tokenizer.json" in files and (named is None or named[1] in GENERIC_CLASSES):
        return _from_tokenizer_json(spec, join(uri, "tokenizer.json"), uri, bos=bos, eos=eos)
    why = (f"a tokenizer.json under {named[0]} {named[1]} (rebuilt by transformers)" if "tokenizer.json" in files
           else "a folder without tokenizer.json (converted by transformers)")
    return _with_transformers(spec, uri, files, why, bos=bos, eos=eos)


def _family():
    from tokenmill.transforms.registry import TokenizerFamily
    from tokenmill.transforms.tokenizers.base import text_policy_options

    return TokenizerFamily("hf", ("text",), ("hf:PATH_OR_URI",), loader=f"{__name__}:load",
                           options=text_policy_options(), extra="hf", requires=("tokenizers",))


FAMILY = _family()
