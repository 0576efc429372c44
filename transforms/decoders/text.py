"""Raw records → document strings: JSON lines, UTF-8 text, Parquet string columns.

Every record either becomes a document or an ErrorRecord saying why not
(malformed JSON, missing field, non-string text, invalid UTF-8).
"""
from __future__ import annotations

from typing import Any, Iterator

import apache_beam as beam
import orjson
import pyarrow as pa
from apache_beam.metrics import Metrics

from tokenmill.transforms.records import ErrorRecord, RawBlock, TextBlock
from tokenmill.transforms.coders import BlockCoder  # noqa: F401  (registers the block coder)


def _field_path(text_field: str) -> list[str]:
    return text_field.split(".")


def _get_field(record: Any, path: list[str]) -> Any:
    for key in path:
        if not isinstance(record, dict):
            raise KeyError(key)
        record = record[key]
    return record


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _utf8_error(e: UnicodeDecodeError) -> str:
    return f"invalid UTF-8 at byte {e.start}: {e.object[e.start:e.start + 4]!r}"


def decode_block(raw: RawBlock, text_field: str = "text") -> TextBlock:
    """Decode one block of raw records into documents and error records."""
    path = _field_path(text_field)
    texts: list[str] = []
    locators: list[str] = []
    errors = list(raw.errors)

    def reject(loc: str, kind: str, message: str) -> None:
        errors.append(ErrorRecord(raw.source, loc, "decode", kind, message))

    if raw.fmt == "jsonl":
        for loc, line in zip(raw.locators, raw.payloads):
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                reject(loc, "JSONDecodeError", f"malformed JSON: {e}")
                continue
            try:
                text = _get_field(record, path)
            except KeyError:
                reject(loc, "MissingField", f"record has no text field {text_field!r}")
                continue
            if not isinstance(text, str):
                reject(loc, "NonStringText",
                       f"text field {text_field!r} is {_type_name(text)}, not a string")
                continue
            texts.append(text)
            locators.append(loc)
    elif raw.fmt in ("txt", "txt-lines"):
        for loc, data in zip(raw.locators, raw.payloads):
            try:
                texts.append(data.decode("utf-8"))
                locators.append(loc)
            except UnicodeDecodeError as e:
                reject(loc, "UnicodeDecodeError", _utf8_error(e))
    elif raw.fmt == "parquet":
        values = raw.payloads
        if isinstance(values, (pa.Array, pa.ChunkedArray)) and not (
                pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            for loc in raw.locators:
                reject(loc, "NonStringText", f"column {text_field!r} has type {values.type}, not string")
        else:
            pylist = values.to_pylist() if hasattr(values, "to_pylist") else list(values)
            for loc, text in zip(raw.locators, pylist):
                if isinstance(text, str):
                    texts.append(text)
                    locators.append(loc)
                else:
                    reject(loc, "NonStringText", f"text is {_type_name(text)}, not a string")
    else:
        raise ValueError(f"unknown text format {raw.fmt!r}")
    return TextBlock(raw.source, raw.block, locators, texts, errors, raw.nbytes)


@beam.typehints.with_output_types(TextBlock)
class _DecodeBlocks(beam.DoFn):
    def __init__(self, text_field: str):
        self._text_field = text_field
        self._rejected = Metrics.counter("tokenmill", "decode_errors")

    def process(self, raw: RawBlock) -> Iterator[TextBlock]:
        block = decode_block(raw, self._text_field)
        self._rejected.inc(len(block.errors) - len(raw.errors))
        yield block


class DecodeText(beam.PTransform):
    """RawBlocks → TextBlocks. Returns (blocks, failed) where failed holds blocks that raised."""

    def __init__(self, text_field: str = "text"):
        super().__init__()
        self._text_field = text_field

    def expand(self, raw_blocks):
        return raw_blocks | "DecodeBlocks" >> beam.ParDo(
            _DecodeBlocks(self._text_field)).with_exception_handling()
