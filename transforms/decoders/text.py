"""Raw records → document strings: JSON lines, UTF-8 text, Parquet string columns (string, large_string,
string_view, or dictionary-encoded strings).

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


def _as_strings(values: Any) -> Any:
    """A Parquet text column as plain strings: a dictionary-encoded column is decoded and a string_view one
    cast, which are strings written another way; any other type is returned as it is (and rejected)."""
    if not isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values
    if pa.types.is_dictionary(values.type):
        values = values.cast(values.type.value_type)
    if pa.types.is_string_view(values.type):
        values = values.cast(pa.large_string())  # large: a view column's strings may pass 2 GiB together
    return values


def _optional_field(record: Any, path: list[str]) -> Any:
    try:
        return _get_field(record, path)
    except KeyError:
        return None


def _kept_values(values: list[Any], path: str, alias: str) -> tuple[pa.Array, dict[int, str]]:
    """One kept field's values as an Arrow array of its declared type, and the records whose value has no such form.

    string keeps strings as they are and any other value as its JSON text.
    """
    type_ = pa.type_for_alias(alias)
    if pa.types.is_string(type_) or pa.types.is_large_string(type_):
        return pa.array([v if v is None or isinstance(v, str) else
                         orjson.dumps(v, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
                         for v in values], type_), {}
    try:
        return pa.array(values, type_), {}
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError):
        pass
    bad: dict[int, str] = {}
    for i, v in enumerate(values):  # find which values (the bulk conversion says only that one failed)
        try:
            pa.array([v], type_)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError):
            bad[i] = f"kept field {path!r} is {_type_name(v)} {str(v)[:60]!r}, not {alias}"
    return pa.array([None if i in bad else v for i, v in enumerate(values)], type_), bad


def _kept_struct(kept: list[list[Any]], keep_fields: tuple[tuple[str, str], ...]
                 ) -> tuple[pa.StructArray, dict[int, str]]:
    from tokenmill.schemas.tables import keep_fields_type

    arrays, bad = [], {}
    for values, (path, alias) in zip(kept, keep_fields):
        array, wrong = _kept_values(values, path, alias)
        arrays.append(array)
        for i, reason in wrong.items():
            bad.setdefault(i, reason)
    return pa.StructArray.from_arrays(arrays, fields=list(keep_fields_type(keep_fields))), bad


def decode_block(raw: RawBlock, text_field: str = "text", keep_fields: tuple[tuple[str, str], ...] = ()
                 ) -> TextBlock:
    """Decode one block of raw records into documents and error records.

    keep_fields (--keep-fields): the source fields each document keeps, typed;
    a value that cannot take its declared type makes its record an error row.
    """
    path = _field_path(text_field)
    texts: list[str] = []
    locators: list[str] = []
    errors = list(raw.errors)
    keep_paths = [_field_path(p) for p, _ in keep_fields]
    kept: list[list[Any]] = [[] for _ in keep_fields]  # per kept field, one value per text

    def keep(record: Any) -> None:
        for values, field_path in zip(kept, keep_paths):
            values.append(_optional_field(record, field_path))

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
            keep(record)
    elif raw.fmt in ("txt", "txt-lines"):
        for loc, data in zip(raw.locators, raw.payloads):
            try:
                texts.append(data.decode("utf-8"))
                locators.append(loc)
                keep(None)  # a text file has no fields
            except UnicodeDecodeError as e:
                reject(loc, "UnicodeDecodeError", _utf8_error(e))
    elif raw.fmt == "parquet":
        values = _as_strings(raw.payloads)
        if isinstance(values, (pa.Array, pa.ChunkedArray)) and not (
                pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            for loc in raw.locators:
                reject(loc, "NonStringText", f"column {text_field!r} has type {values.type}, not string")
        else:
            pylist = values.to_pylist() if hasattr(values, "to_pylist") else list(values)
            columns = {}
            if keep_fields and raw.fields is not None:  # the kept columns, as records of their values
                columns = {name: raw.fields.column(name).to_pylist() for name in raw.fields.schema.names
                           if name in {p[0] for p in keep_paths}}
            for i, (loc, text) in enumerate(zip(raw.locators, pylist)):
                if isinstance(text, str):
                    texts.append(text)
                    locators.append(loc)
                    if keep_fields:
                        keep({name: column[i] for name, column in columns.items()})
                else:
                    reject(loc, "NonStringText", f"text is {_type_name(text)}, not a string")
    else:
        raise ValueError(f"unknown text format {raw.fmt!r}")
    if not keep_fields:
        return TextBlock(raw.source, raw.block, locators, texts, errors, raw.nbytes)
    meta, bad = _kept_struct(kept, keep_fields)
    if bad:
        for i, reason in sorted(bad.items()):
            reject(locators[i], "KeptFieldType", reason)
        mask = [i not in bad for i in range(len(texts))]
        texts = [t for t, ok in zip(texts, mask) if ok]
        locators = [loc for loc, ok in zip(locators, mask) if ok]
        meta = meta.filter(pa.array(mask))
    return TextBlock(raw.source, raw.block, locators, texts, errors, raw.nbytes, meta)


@beam.typehints.with_output_types(TextBlock)
class _DecodeBlocks(beam.DoFn):
    def __init__(self, text_field: str, keep_fields: tuple[tuple[str, str], ...] = ()):
        self._text_field, self._keep_fields = text_field, keep_fields
        self._rejected = Metrics.counter("tokenmill", "decode_errors")

    def process(self, raw: RawBlock) -> Iterator[TextBlock]:
        block = decode_block(raw, self._text_field, self._keep_fields)
        self._rejected.inc(len(block.errors) - len(raw.errors))
        yield block


class DecodeText(beam.PTransform):
    """RawBlocks → TextBlocks. Returns (blocks, failed) where failed holds blocks that raised."""

    def __init__(self, text_field: str = "text", keep_fields: tuple[tuple[str, str], ...] = ()):
        super().__init__()
        self._text_field, self._keep_fields = text_field, tuple(keep_fields)

    def expand(self, raw_blocks):
        return raw_blocks | "DecodeBlocks" >> beam.ParDo(
            _DecodeBlocks(self._text_field, self._keep_fields)).with_exception_handling()
