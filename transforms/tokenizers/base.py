"""The tokenizer interface shared by every modality, and its text specialisation.

A tokenizer is a plain object, usable without Beam: `encode_batch` turns a batch
of inputs into an Arrow list column, `fingerprint()` identifies everything that
can change its output, and `metadata()` is what a dataset records about it.
"""
from __future__ import annotations

import abc
import hashlib
import json
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from tokenmill.schemas.tables import numpy_dtype, token_type_for_vocab
from tokenmill.transforms.buffers import BufferPool
from tokenmill.transforms.tokenizers import spans


class TokenizerSpecError(ValueError):
    """A tokenizer spec that cannot be parsed or loaded (a CLI usage error)."""


class FatalTokenizerError(RuntimeError):
    """The tokenizer cannot be trusted (for example, an engine disagreeing with its reference), or cannot run.

    Unlike a bad document, this stops the whole build: no manifest is written.
    """


# Not a bad record: the process must stop for these, whatever the record.
_PROCESS_EXCEPTIONS = (KeyboardInterrupt, SystemExit, GeneratorExit)


def record_failure(spec: str, e: BaseException) -> BaseException:
    """What one record's failure to encode is: the exception to keep as its error row, or raise at once.

    A missing module or library (ImportError) says the tokenizer cannot run at
    all, for any record: that fails the build (FatalTokenizerError) rather than
    turning every record into an error row. A Rust tokenizer's panic
    (pyo3's PanicException, a BaseException) is one bad record.
    """
    if isinstance(e, _PROCESS_EXCEPTIONS) or isinstance(e, FatalTokenizerError):
        raise e
    if isinstance(e, ImportError):
        raise FatalTokenizerError(f"{spec} cannot run here: {type(e).__name__}: {e}") from e
    return e


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def text_policy_options():
    """--eos and --bos: the options every text family takes (TextTokenizer applies them)."""
    from tokenmill.transforms.registry import Option

    return (Option("eos", "append the tokenizer's EOS token to every document", type=None, default=False),
            Option("bos", "prepend the tokenizer's BOS token to every document", type=None, default=False))


class Tokenizer(abc.ABC):
    """What every tokenizer provides, whatever its modality."""

    spec: str
    modality: str
    kind: str  # "hard" (integer IDs) or "soft" (vectors)

    @abc.abstractmethod
    def identity(self) -> dict[str, Any]:
        """Everything that can change the output, as JSON-able data."""

    def fingerprint(self) -> str:
        """sha256 over `identity()`: equal fingerprints mean equal outputs."""
        return sha256_json(self.identity())

    @abc.abstractmethod
    def metadata(self) -> dict[str, Any]:
        """What a dataset records about this tokenizer (manifest and Parquet metadata)."""


class TextTokenizer(Tokenizer):
    """Text → token IDs. Literal special-token strings in a document are encoded as text.

    Subclasses implement `_encode` (one document → uint32 IDs, no BOS/EOS) and
    `decode`; BOS/EOS are added here, per document, when the policy asks.
    """

    modality = "text"
    kind = "hard"
    name: str
    vocab_size: int
    special_tokens: dict[str, int]

    def __init__(self, spec: str, *, bos: bool = False, eos: bool = False):
        self.spec = spec
        self.add_bos = bos
        self.add_eos = eos

    # -- to implement -------------------------------------------------------
    @abc.abstractmethod
    def _encode(self, text: str) -> np.ndarray:
        """IDs of one document, as a 1-D unsigned array, without BOS/EOS."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of a sequence of IDs (special tokens rendered as their strings)."""

    @abc.abstractmethod
    def _identity(self) -> dict[str, Any]:
        """Identity of the vocabulary and algorithm, without the BOS/EOS policy."""

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one ID stands for on its own (the report's granularity counts these).

        Where a token holds part of a multi-byte character (byte-level BPE, byte
        fallback), that part: never a decoded replacement character.
        """
        return self.decode([token_id]).encode("utf-8")

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Where each token of `text` lies: (start, end) byte offsets into its UTF-8 (spans.utf8), one per
        ID of `_encode(text)` (no BOS/EOS).

        The spans tile the document (see transforms/tokenizers/spans.py): joined,
        their bytes are the document, byte for byte. Text the tokenizer skips or
        normalises away belongs to the token after it; a span may start or end
        inside a character. This default places each token's `token_bytes`, exact
        for tokenizers whose IDs stand for fixed bytes (tiktoken, bytes); families
        with offsets (hf:, sentencepiece:) override it.
        """
        data = spans.utf8(text)
        pieces = [self.token_bytes(int(i)) for i in self._encode(text)]
        return spans.spans_of_pieces(data, pieces) or spans.spans_by_search(data, pieces)

    def token_pieces(self, ids: Sequence[int]) -> list[bytes]:
        """The bytes each ID stands for in this sequence, for views that have IDs but no text (inspect).

        Joined, they are the document the IDs decode to, special tokens as their
        names. This default is `token_bytes` per ID, exact where IDs stand for
        fixed bytes; families whose tokens depend on their neighbours override it
        (see `_pieces_by_reencoding`).
        """
        return [self.token_bytes(int(i)) for i in ids]

    def _pieces_by_reencoding(self, ids: Sequence[int]) -> list[bytes]:
        """token_pieces from the text: each run of IDs between special tokens is decoded, encoded again and
        cut at its `token_spans`. A run that does not encode back to the same IDs (an unknown token, text
        the normaliser changed) gets `token_bytes` per ID instead."""
        special = set(self.special_tokens.values())
        out: list[bytes] = []
        run: list[int] = []

        def flush() -> None:
            if not run:
                return
            text = self.decode(run)
            try:
                same = self._encode(text).tolist() == run
            except Exception:  # noqa: BLE001 - a view falls back to the IDs' own bytes
                same = False
            if same:
                data = spans.utf8(text)
                out.extend(data[s:e] for s, e in self.token_spans(text))
            else:
                out.extend(self.token_bytes(i) for i in run)
            run.clear()

        for i in map(int, ids):
            if i in special:
                flush()
                out.append(self.token_bytes(i))
            else:
                run.append(i)
        flush()
        return out

    # Tokens that --bos / --eos add; None where the vocabulary has none.
    bos_token: str | None = None
    eos_token: str | None = None

    # -- shared ---------------------------------------------------------------
    def _special_id(self, token: str | None, what: str) -> int:
        if token is None or token not in self.special_tokens:
            raise TokenizerSpecError(f"tokenizer {self.spec!r} has no {what} token")
        return self.special_tokens[token]

    @property
    def bos_id(self) -> int | None:
        return self._special_id(self.bos_token, "BOS") if self.add_bos else None

    @property
    def eos_id(self) -> int | None:
        return self._special_id(self.eos_token, "EOS") if self.add_eos else None

    @property
    def token_type(self) -> pa.DataType:
        return token_type_for_vocab(self.vocab_size)

    def policy(self) -> dict[str, Any]:
        return {
            "literal_special_tokens": "text",
            "bos": self.bos_token if self.add_bos else None,
            "bos_id": self.bos_id,
            "eos": self.eos_token if self.add_eos else None,
            "eos_id": self.eos_id,
        }

    def identity(self) -> dict[str, Any]:
        return {**self._identity(), "policy": self.policy()}

    def metadata(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "name": self.name,
            "modality": self.modality,
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "token_dtype": str(self.token_type),
            "special_tokens": dict(sorted(self.special_tokens.items(), key=lambda kv: kv[1])),
            "special_token_policy": self.policy(),
            "fingerprint": self.fingerprint(),
        }

    def encode(self, text: str) -> np.ndarray:
        """IDs of one document with the BOS/EOS policy applied."""
        column, failures = self.encode_batch([text])
        if failures:
            raise failures[0][1]
        return column.values.to_numpy(zero_copy_only=False)

    def encode_batch(self, texts: Sequence[str]) -> tuple[pa.ListArray, list[tuple[int, Exception]]]:
        """Encode documents into one Arrow list column, built from numpy buffers.

        Returns the column (one entry per document that encoded) and the
        (index, exception) of documents that failed; these are left out.
        """
        bos = [np.array([self.bos_id], np.uint32)] if self.add_bos else []
        eos = [np.array([self.eos_id], np.uint32)] if self.add_eos else []
        parts: list[np.ndarray] = []
        lengths: list[int] = []
        failures: list[tuple[int, Exception]] = []
        for i, ids in enumerate(self._encode_each(texts)):
            if isinstance(ids, BaseException):
                failures.append((i, record_failure(self.spec, ids)))
                continue
            parts.extend(bos)
            parts.append(ids)
            parts.extend(eos)
            lengths.append(len(ids) + len(bos) + len(eos))
        values = np.concatenate(parts) if parts else np.zeros(0, np.uint32)
        if len(values) and int(values.max()) >= self.vocab_size:  # one pass per batch; never a wrapped ID
            return self._without_out_of_range(texts, failures)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        values = values.astype(np.uint32, copy=False)
        value_type = self.token_type
        values_arr = pa.array(values.astype(numpy_dtype(value_type), copy=False), type=value_type)
        column = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values_arr,
                                          type=pa.list_(pa.field("element", value_type, nullable=False)))
        return column, failures

    def _encode_each(self, texts: Sequence[str]) -> list[Any]:
        """`_encode` of each document, or the exception in its place. A family with a batch call that
        pays off overrides this (hf:), falling back to this on any failure to find the bad document."""
        return _each(self._encode, texts)

    def _without_out_of_range(self, texts: Sequence[str], failures: list[tuple[int, BaseException]]
                              ) -> tuple[pa.ListArray, list[tuple[int, BaseException]]]:
        """encode_batch again, with the documents holding an ID at or above vocab_size as failures."""
        failed = {i for i, _ in failures}
        bad = []
        for i, text in enumerate(texts):
            if i in failed:
                continue
            top = int(self._encode(text).max(initial=0))
            if top >= self.vocab_size:
                bad.append((i, ValueError(f"token ID {top} is not below the vocabulary size {self.vocab_size}")))
        keep = [i for i in range(len(texts)) if i not in failed and i not in {j for j, _ in bad}]
        column, more = self.encode_batch([texts[i] for i in keep])
        return column, sorted(failures + bad + [(keep[j], e) for j, e in more], key=lambda f: f[0])


class _ArrayTokenizer(Tokenizer):
    """What image and video tokenizers share: arrays in, tokens on a grid out, one Arrow column per batch."""

    dim: int = 0
    latent_dtype: str | None = None
    vocab_size: int | None = None
    # Tokenizers whose per-item work is numpy that releases the GIL (vq:, pca:)
    # may encode a block's items on a thread pool (`item_pool`, set by the
    # pipeline): see transforms/tokenize.py.
    parallel_items: bool = False
    item_pool: Any = None
    # Where token columns get their memory: reused across blocks (transforms/buffers.py).
    buffers: BufferPool = BufferPool()

    @abc.abstractmethod
    def _encode_each(self, items: Sequence[np.ndarray]) -> list[Any]:
        """(tokens, grid) for each item, or an exception in place of a failed one.

        `tokens` may be any array whose elements in C order are the (n,) codes or
        the (n, dim) latents (a view is fine: encode_batch copies it once), or
        an object with `shape`, `size`, `dtype` and `copy_into(out)` that writes
        them itself (patches.Patches).
        """

    @property
    def token_type(self) -> pa.DataType:
        if self.kind == "hard":
            return token_type_for_vocab(self.vocab_size)
        from tokenmill.schemas.tables import LATENT_STORAGE

        return LATENT_STORAGE[self.latent_dtype]

    def encode_batch(self, items: Sequence[np.ndarray]
                     ) -> tuple[pa.Array, list[tuple[int, ...]], list[tuple[int, Exception]]]:
        """Encode items into one Arrow column built from numpy buffers; failures are left out."""
        parts: list[np.ndarray] = []
        grids: list[tuple[int, ...]] = []
        failures: list[tuple[int, Exception]] = []
        for i, result in enumerate(self._encode_each(items)):
            if isinstance(result, BaseException):
                failures.append((i, record_failure(self.spec, result)))
                continue
            out, grid = result
            parts.append(out)
            grids.append(grid)
        numpy_type = numpy_dtype(self.token_type).newbyteorder("<")
        # One copy of every item, in C order, into the column's buffer: items
        # may be views, which a reshape(-1) would copy first, or Patches that
        # write themselves (patches.py).
        lengths = [p.size for p in parts]
        flat = self.buffers.empty(sum(lengths), numpy_type)
        start = 0
        for part, n in zip(parts, lengths):
            into = flat[start:start + n].reshape(part.shape)
            if hasattr(part, "copy_into") and part.dtype == numpy_type:
                part.copy_into(into)
            else:
                np.copyto(into, np.asarray(part), casting="unsafe")
            start += n
        offsets = np.zeros(len(parts) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        if self.kind == "hard":
            column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, self.token_type),
                                              type=pa.list_(pa.field("element", self.token_type, nullable=False)))
        else:  # one binary value per row: see schemas/tables.py for why
            byte_offsets = offsets * np.int32(numpy_type.itemsize)
            column = pa.BinaryArray.from_buffers(pa.binary(), len(parts),
                                                 [None, pa.py_buffer(byte_offsets), pa.py_buffer(flat)])
        return column, grids, failures


def _each(encode, items: Sequence[np.ndarray], pool: Any = None) -> list[Any]:
    """encode(item) for each item, in order, or the exception in its place; on `pool`'s threads if given."""
    def one(item: np.ndarray) -> Any:
        try:
            return encode(item)
        except BaseException as e:  # noqa: BLE001 - one bad item must not sink the block (see record_failure)
            if isinstance(e, _PROCESS_EXCEPTIONS):
                raise
            return e

    if pool is not None and len(items) > 1:
        return list(pool.map(one, items))
    return [one(item) for item in items]


class ImageTokenizer(_ArrayTokenizer):
    """RGB uint8 images (H, W, 3) → tokens on a (h, w) grid: codes (hard) or vectors (soft).

    Subclasses implement `encode_image` and `decode_image`, and set `kind`,
    `dim` and `latent_dtype` (soft) or `vocab_size` (hard).
    """

    modality = "image"

    @abc.abstractmethod
    def encode_image(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """(tokens (n,) or latents (n, dim), grid (h, w) with h * w = n)."""

    @abc.abstractmethod
    def decode_image(self, tokens: np.ndarray, grid: tuple[int, int], height: int, width: int) -> np.ndarray:
        """The RGB uint8 image (height, width, 3) the tokens stand for."""

    def encode_images(self, images: Sequence[np.ndarray]) -> list[Any]:
        """encode_image for each image, with an exception in place of a failed one.

        Tokenizers that gain from batching (a neural encoder) override this.
        """
        return _each(self.encode_image, images, self.item_pool)

    def _encode_each(self, items: Sequence[np.ndarray]) -> list[Any]:
        return self.encode_images(items)


class VideoTokenizer(_ArrayTokenizer):
    """Clips of RGB uint8 frames (T, H, W, 3) → tokens on a (t, h, w) grid: codes (hard) or vectors (soft).

    Subclasses implement `encode_clip`, `padding` and (where they can) `decode_clip`.
    """

    modality = "video"

    @abc.abstractmethod
    def encode_clip(self, clip: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """(tokens (n,) or latents (n, dim), grid (t, h, w) with t * h * w = n)."""

    @abc.abstractmethod
    def padding(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Frames, rows and columns added by edge padding to a clip of this shape before encoding."""

    def decode_clip(self, tokens: np.ndarray, grid: tuple[int, int, int], frames: int, height: int,
                    width: int) -> np.ndarray:
        """The clip (frames, height, width, 3) the tokens stand for."""
        raise NotImplementedError(f"{self.spec} cannot decode")

    def encode_clips(self, clips: Sequence[np.ndarray]) -> list[Any]:
        """encode_clip for each clip, with an exception in place of a failed one (batching encoders override)."""
        return _each(self.encode_clip, clips, self.item_pool)

    def _encode_each(self, items: Sequence[np.ndarray]) -> list[Any]:
        return self.encode_clips(items)
