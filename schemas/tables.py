"""pyarrow schemas of tokenmill datasets: data rows and error rows.

A data shard's schema is the contract a training job reads. Token IDs are
stored in the narrowest unsigned integer type that holds every ID of the
vocabulary (including special tokens); the chosen type is recorded in the
manifest and the Parquet key-value metadata so a reader never guesses it.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import pyarrow as pa

SCHEMA_VERSION = 1

# Key under which tokenmill stores its metadata (JSON) in Parquet files.
METADATA_KEY = b"tokenmill"


def token_type_for_vocab(vocab_size: int) -> pa.DataType:
    """The narrowest unsigned type holding IDs 0 .. vocab_size - 1."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 8:
        return pa.uint8()
    if vocab_size <= 1 << 16:
        return pa.uint16()
    if vocab_size <= 1 << 32:
        return pa.uint32()
    return pa.uint64()


def _field(name: str, type_: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={b"doc": doc.encode()})


def text_hard_schema(token_type: pa.DataType, metadata: Mapping[str, Any] | None = None) -> pa.Schema:
    """Schema of a text dataset of hard (integer) tokens."""
    fields = [
        _field("id", pa.string(), "Stable row id: hash of source and locator."),
        _field("source", pa.string(), "URI of the input shard the record came from."),
        _field("locator", pa.string(),
               "Where the record sits in its source: 'offset:N' (byte offset of the "
               "record in the decompressed stream), 'row:N' (Parquet row) or 'file'."),
        _field("tokens", pa.list_(pa.field("element", token_type, nullable=False)),
               "Token IDs, BOS/EOS included when the dataset's policy adds them."),
        _field("num_tokens", pa.int32(), "len(tokens)."),
    ]
    return pa.schema(fields, metadata=_encode_metadata(metadata))


ERROR_SCHEMA = pa.schema([
    _field("source", pa.string(), "URI of the input shard."),
    _field("locator", pa.string(), "Where the failed record (or range) sits in its source."),
    _field("stage", pa.string(), "Pipeline stage that rejected it: read, decode, tokenize or write."),
    _field("error_type", pa.string(), "Exception class or error kind."),
    _field("message", pa.string(), "Human-readable reason."),
])


def _encode_metadata(metadata: Mapping[str, Any] | None) -> dict[bytes, bytes] | None:
    if metadata is None:
        return None
    return {METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()}


def read_metadata(schema: pa.Schema) -> dict[str, Any]:
    """The tokenmill metadata stored in a shard's schema, or {} if absent."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}
