"""Latents outside the reader: a dataset's `latents` column as (num_tokens, dim) numpy arrays.

HF datasets, Polars, DuckDB or pyarrow read `latents` as one binary value per
row (schemas/tables.py). These helpers give the values their dtype and shape
from the dataset's manifest (`latent_dtype`, `dim` in its tokenizer block);
docs/user-guide.md, "Reading latents with other tools", has the one-liners.

As stored (the default), arrays view the column's bytes without a copy (so
they are read-only where the bytes are): bfloat16 comes back as its raw uint16
bits and patch latents as uint8. `float32=True` gives new float32 arrays of the
values they stand for: bfloat16 and float16 widened, and uint8 mapped through
the dataset's recorded normalization (patch: to [-1, 1], as TokenReader does).
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa

from tokenmill.schemas.manifest import Manifest, read_manifest
from tokenmill.schemas.tables import LATENT_NUMPY


@dataclasses.dataclass(frozen=True)
class LatentFormat:
    """How a dataset stores a latent vector: `dim` values of `latent_dtype` (numpy `dtype`), and the
    recorded normalization (scale, offset) of uint8 latents, if any."""

    latent_dtype: str
    dim: int
    normalization: tuple[float, float] | None = None

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(LATENT_NUMPY[self.latent_dtype])

    @classmethod
    def of(cls, dataset: str | Manifest) -> LatentFormat:
        """The format of a dataset: its root directory or URI, or its Manifest."""
        tok = (read_manifest(dataset) if isinstance(dataset, str) else dataset).tokenizer
        if tok.get("kind", "hard") != "soft":
            raise ValueError(f"the dataset holds hard tokens ({tok.get('spec')}), not latents")
        norm = tok.get("normalization")
        return cls(tok["latent_dtype"], int(tok["dim"]),
                   (float(norm["scale"]), float(norm["offset"])) if norm else None)

    def to_float32(self, values: np.ndarray) -> np.ndarray:
        """Stored values as the float32 numbers they stand for (a new array)."""
        if self.latent_dtype == "bfloat16":  # the high 16 bits of a float32
            return (values.astype(np.uint32) << 16).view(np.float32)
        if self.normalization:
            return values * np.float32(self.normalization[0]) + np.float32(self.normalization[1])
        return values.astype(np.float32)


def flat_latents(column: pa.Array, fmt: LatentFormat) -> tuple[np.ndarray, np.ndarray]:
    """A binary Arrow array of latents as one (total tokens, dim) view and its row offsets in tokens.

    Row i is values[offsets[i]:offsets[i + 1]]; nothing is copied.
    """
    if pa.types.is_binary_view(column.type):
        column = column.cast(pa.large_binary())
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise TypeError(f"latents must be a binary column, got {column.type}")
    width = 8 if pa.types.is_large_binary(column.type) else 4
    offsets = np.frombuffer(column.buffers()[1], f"<i{width}")[column.offset: column.offset + len(column) + 1]
    buffer = column.buffers()[2]  # None when every value is empty
    data = np.frombuffer(buffer, np.uint8) if buffer is not None else np.zeros(0, np.uint8)
    start = int(offsets[0])
    values = data[start: int(offsets[-1])].view(fmt.dtype).reshape(-1, fmt.dim)
    return values, (offsets - start) // (fmt.dtype.itemsize * fmt.dim)


def latents_to_array(value: bytes, dataset: str | Manifest | LatentFormat, *,
                     float32: bool = False) -> np.ndarray:
    """One row's latents (bytes, bytearray or memoryview) as a (num_tokens, dim) array (module docstring)."""
    fmt = dataset if isinstance(dataset, LatentFormat) else LatentFormat.of(dataset)
    array = np.frombuffer(value, fmt.dtype).reshape(-1, fmt.dim)
    return fmt.to_float32(array) if float32 else array


def latents_to_arrays(values: Any, dataset: str | Manifest | LatentFormat, *,
                      float32: bool = False) -> list[np.ndarray]:
    """A latents column as a list of (num_tokens, dim) arrays, one per row (module docstring).

    `values`: a pyarrow Array or ChunkedArray of binary (pyarrow, DuckDB), a Polars Series, or any
    sequence of bytes (HF datasets, a numpy object array). `dataset`: the dataset's root or Manifest
    (read once and reuse it in a per-batch transform), or a LatentFormat.
    """
    fmt = dataset if isinstance(dataset, LatentFormat) else LatentFormat.of(dataset)
    if hasattr(values, "to_arrow") and not isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = values.to_arrow()  # a Polars Series
    arrays: Iterable[np.ndarray]
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        arrays = []
        for chunk in values.chunks if isinstance(values, pa.ChunkedArray) else [values]:
            flat, offsets = flat_latents(chunk, fmt)
            arrays += [flat[a:b] for a, b in itertools.pairwise(offsets)]
    else:
        arrays = [np.frombuffer(v, fmt.dtype).reshape(-1, fmt.dim) for v in values]
    return [fmt.to_float32(a) for a in arrays] if float32 else list(arrays)
