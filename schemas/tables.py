"""pyarrow schemas of tokenmill datasets, one per modality and token kind, and error rows.

A data shard's schema is the contract a training job reads:

- common to all: `id`, `source`, `locator`, `modality`
- hard tokens: `tokens` (list of unsigned integers, in the narrowest type that
  holds the vocabulary, recorded as `token_dtype`) and `num_tokens`
- soft tokens: `latents`, one binary value per row holding num_tokens x dim
  values of `latent_dtype`, little-endian, row-major; np.frombuffer(...)
  .reshape(num_tokens, dim) gives the array without copying. bfloat16, which
  Arrow lacks, is its raw 16 bits. Why not list<fixed_size_list<T, dim>>:
  Parquet writes repetition and definition levels for every value of a nested
  list; measured here, 79 MB of uint8 patches took 1.1-4 s to write that way
  and 0.1 s as one binary value per row.
- image and video: `grid`, the token layout (h, w) or (t, h, w), row-major;
  optional per-row extras (original size, clip timing, fps, frame indices)

`describe()` gives the same definition as JSON for consumers in any language.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import pyarrow as pa

SCHEMA_VERSION = 1

# Key under which tokenmill stores its metadata (JSON) in Parquet files.
METADATA_KEY = b"tokenmill"

MODALITIES = ("text", "image", "video")
KINDS = ("hard", "soft")
DEFINED = {("text", "hard"), ("image", "hard"), ("image", "soft"), ("video", "hard"), ("video", "soft")}

# Arrow storage type of each latent dtype (the values inside a row's latents bytes).
LATENT_STORAGE = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16(),
                  "uint8": pa.uint8()}
LATENT_NUMPY = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "uint8": "u1"}


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


def numpy_dtype(arrow_type: pa.DataType) -> Any:
    """The numpy dtype of a fixed-width Arrow integer or float type.

    Why not `arrow_type.to_pandas_dtype()`: pyarrow imports pandas for it, and
    pandas is no dependency of tokenmill (a plain install has none).
    """
    import numpy as np

    if not (pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)):
        raise TypeError(f"not a numeric Arrow type: {arrow_type}")
    kind = "f" if pa.types.is_floating(arrow_type) else "i" if pa.types.is_signed_integer(arrow_type) else "u"
    return np.dtype(f"{kind}{arrow_type.bit_width // 8}")


def _field(name: str, type_: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={b"doc": doc.encode()})


def _list(item: pa.DataType) -> pa.DataType:
    # "element" is the name Parquet's compliant nested encoding reads back.
    return pa.list_(pa.field("element", item, nullable=False))


def grid_rank(modality: str) -> int:
    return {"image": 2, "video": 3}[modality]


def parse_keep_fields(text: str | None) -> tuple[tuple[str, str], ...]:
    """`lang,url,meta.score:float64` -> (("lang", "string"), ("url", "string"), ("meta.score", "float64")).

    A field is a JSON path (dots address nested objects) or a Parquet column
    (dots address struct fields), with an optional Arrow type alias after ':'
    (string by default). Raises ValueError with a one-line reason.
    """
    out: list[tuple[str, str]] = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        path, _, alias = item.partition(":")
        path, alias = path.strip(), (alias.strip() or "string")
        if not path or any(not part for part in path.split(".")):
            raise ValueError(f"--keep-fields: {item!r} is not a field name (a.b.c, optionally :TYPE)")
        try:
            type_ = pa.type_for_alias(alias)
        except (ValueError, KeyError):
            raise ValueError(f"--keep-fields: {alias!r} is not an Arrow type (string, int64, float64, bool, "
                             "date32, timestamp[s], ...)") from None
        if pa.types.is_nested(type_):
            raise ValueError(f"--keep-fields: {path} cannot be kept as {alias}: keep nested values as string (JSON)")
        if any(path == p for p, _ in out):
            raise ValueError(f"--keep-fields: {path} is named twice")
        out.append((path, alias))
    return tuple(out)


def keep_fields_type(keep: Sequence[tuple[str, str]]) -> pa.StructType:
    """The struct type of a text dataset's `meta` column: one child per kept field, named by its path."""
    return pa.struct([pa.field(path, pa.type_for_alias(alias), nullable=True) for path, alias in keep])


def kept_fields_field(struct: pa.StructType) -> pa.Field:
    """The `meta` column of a text dataset built with --keep-fields."""
    return _field("meta", struct, "Source fields kept with --keep-fields, each typed as declared (null where the "
                                  "record lacks it).", True)


def dataset_schema(modality: str, kind: str, *, token_dtype: str | None = None,
                   latent_dtype: str | None = None, dim: int | None = None,
                   metadata: Mapping[str, Any] | None = None,
                   keep_fields: Sequence[tuple[str, str]] = ()) -> pa.Schema:
    """The schema of one modality and kind. Hard needs token_dtype; soft needs latent_dtype and dim.

    keep_fields (text, from --keep-fields) adds a `meta` struct column.
    """
    if (modality, kind) not in DEFINED:
        raise ValueError(f"no schema for modality={modality!r} kind={kind!r}; defined: "
                         + ", ".join(f"{m}/{k}" for m, k in sorted(DEFINED)))
    fields = [
        _field("id", pa.string(), "Stable row id: hash of source and locator."),
        _field("source", pa.string(), "URI of the input shard the record came from."),
        _field("locator", pa.string(),
               "Where the record sits in its source: 'offset:N' (byte offset in the decompressed "
               "stream), 'row:N' (Parquet row), 'member:NAME' (tar member), 'clip:N' or 'file'."),
        _field("modality", pa.string(), "text, image or video."),
    ]
    if kind == "hard":
        if token_dtype is None:
            raise ValueError("hard tokens need token_dtype")
        fields.append(_field("tokens", _list(pa.type_for_alias(token_dtype)),
                             "Token IDs, BOS/EOS included when the dataset's policy adds them."))
    else:
        if latent_dtype not in LATENT_STORAGE or not dim:
            raise ValueError(f"soft tokens need latent_dtype in {sorted(LATENT_STORAGE)} and dim > 0")
        fields.append(_field("latents", pa.binary(),
                             f"num_tokens x {dim} {latent_dtype} values, little-endian, row-major "
                             "(bfloat16 as raw 16 bits): np.frombuffer(...).reshape(num_tokens, dim)."))
    fields.append(_field("num_tokens", pa.int32(), "Number of tokens (or latent vectors) in the row."))
    if keep_fields and modality == "text":
        fields.append(kept_fields_field(keep_fields_type(keep_fields)))
    if modality in ("image", "video"):
        n = grid_rank(modality)
        fields.append(_field("grid", pa.list_(pa.field("element", pa.int32(), nullable=False), n),
                             "Token layout, row-major: (h, w)" if n == 2 else
                             "Token layout, row-major: (t, h, w)"))
        fields += [
            _field("orig_height", pa.int32(), "Height of the source image or frame, pixels, as displayed.", True),
            _field("orig_width", pa.int32(), "Width of the source image or frame, pixels, as displayed.", True),
            _field("height", pa.int32(), "Height of the tokenized image after the size policy, before "
                                         "padding to the token grid, pixels.", True),
            _field("width", pa.int32(), "Width of the tokenized image after the size policy, before "
                                        "padding, pixels.", True),
            _field("meta", pa.string(), "Sidecar metadata of the record (JSON), if any.", True),
        ]
    if modality == "video":
        fields += [
            _field("clip_start", pa.float64(), "Clip start time in the source video, seconds.", True),
            _field("clip_end", pa.float64(), "Clip end time in the source video, seconds.", True),
            _field("fps", pa.float64(), "Frame rate of the sampled clip, frames per second.", True),
            _field("frame_indices", _list(pa.int32()), "Source frame indices of the clip's frames.", True),
            _field("padding", pa.list_(pa.field("element", pa.int32(), nullable=False), 3),
                   "Frames, rows and columns the tokenizer added by edge padding (end of clip, bottom, "
                   "right) before encoding: (t, h, w).", True),
        ]
    return pa.schema(fields, metadata=_encode_metadata(metadata))


def text_hard_schema(token_type: pa.DataType, metadata: Mapping[str, Any] | None = None) -> pa.Schema:
    """Schema of a text dataset of hard (integer) tokens."""
    return dataset_schema("text", "hard", token_dtype=str(token_type), metadata=metadata)


def schema_for_manifest(manifest: Any) -> pa.Schema:
    """The schema a dataset's shards must have, from its manifest."""
    tok = manifest.tokenizer
    kind = tok.get("kind", "hard")
    return dataset_schema(manifest.modality, kind, token_dtype=manifest.token_dtype if kind == "hard" else None,
                          latent_dtype=tok.get("latent_dtype"), dim=tok.get("dim"),
                          keep_fields=parse_keep_fields((manifest.options or {}).get("keep_fields")))


def table_from_columns(schema: pa.Schema, columns: Mapping[str, Any], num_rows: int) -> pa.Table:
    """A table in `schema` from the given columns; nullable columns not given are null."""
    arrays = []
    for f in schema:
        if f.name in columns:
            value = columns[f.name]
            arrays.append(value if isinstance(value, (pa.Array, pa.ChunkedArray)) else pa.array(value, f.type))
        elif f.nullable:
            arrays.append(pa.nulls(num_rows, f.type))
        else:
            raise ValueError(f"column {f.name!r} is required")
    return pa.Table.from_arrays(arrays, schema=schema)


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
    return {METADATA_KEY: json.dumps({"schema_version": SCHEMA_VERSION, **metadata}, sort_keys=True).encode()}


def read_metadata(schema: pa.Schema) -> dict[str, Any]:
    """The tokenmill metadata stored in a shard's schema, or {} if absent."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def schema_differences(got: pa.Schema, expected: pa.Schema) -> list[str]:
    """How `got` differs from `expected` in column names, order, types and nullability."""
    out = []
    for f in expected:
        if f.name not in got.names:
            out.append(f"missing column {f.name!r} ({f.type})")
        elif not got.field(f.name).type.equals(f.type):
            out.append(f"column {f.name!r} is {got.field(f.name).type}, expected {f.type}")
        elif got.field(f.name).nullable != f.nullable:
            out.append(f"column {f.name!r} is {'' if got.field(f.name).nullable else 'not '}nullable")
    out += [f"unexpected column {n!r}" for n in got.names if n not in expected.names]
    if not out and got.names != expected.names:
        out.append(f"columns are in the order {got.names}, expected {expected.names}")
    return out


# -- JSON definition ---------------------------------------------------------

def type_json(t: pa.DataType) -> Any:
    """A language-neutral description of an Arrow type."""
    if pa.types.is_fixed_size_list(t):
        return {"fixed_size_list": type_json(t.value_type), "size": t.list_size}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return {"list": type_json(t.value_type)}
    return str(t)


def describe(modality: str, kind: str, *, token_dtype: str | None = None, latent_dtype: str | None = None,
             dim: int | None = None, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON definition of a schema. Unknown parameters are shown as {"param": name}."""
    params = {"token_dtype": token_dtype or "uint32", "latent_dtype": latent_dtype or "float32",
              "dim": dim or 8}
    schema = dataset_schema(modality, kind, token_dtype=params["token_dtype"] if kind == "hard" else None,
                            latent_dtype=params["latent_dtype"] if kind == "soft" else None,
                            dim=params["dim"] if kind == "soft" else None)
    fields = []
    for f in schema:
        entry: dict[str, Any] = {"name": f.name, "type": type_json(f.type), "nullable": f.nullable,
                                 "doc": (f.metadata or {}).get(b"doc", b"").decode()}
        if f.name == "tokens" and token_dtype is None:
            entry["type"] = {"list": {"param": "token_dtype"}}
        if f.name == "latents":
            inner = {"param": "latent_storage"} if latent_dtype is None else type_json(
                LATENT_STORAGE[latent_dtype])
            entry["type"] = "binary"
            entry["tensor"] = {"element": inner, "shape": ["num_tokens", {"param": "dim"} if dim is None else dim],
                               "order": "row-major", "byte_order": "little"}
        fields.append(entry)
    out: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "modality": modality, "kind": kind, "fields": fields,
        "parameters": {
            "token_dtype": "narrowest of uint8/uint16/uint32/uint64 holding vocab_size IDs"
            if kind == "hard" else None,
            "latent_dtype": f"one of {sorted(LATENT_STORAGE)}; bfloat16 is stored as uint16 bits"
            if kind == "soft" else None,
            "latent_storage": "Arrow type storing latent_dtype" if kind == "soft" else None,
            "dim": "values per latent vector" if kind == "soft" else None,
        },
        "metadata": {"parquet_key": METADATA_KEY.decode(),
                     "fields": ["spec", "name", "fingerprint", "vocab_size or dim and latent_dtype",
                                "token_dtype", "special_tokens", "special_token_policy", "geometry"]},
    }
    out["parameters"] = {k: v for k, v in out["parameters"].items() if v is not None}
    if token_dtype or latent_dtype or dim:
        out["values"] = {k: v for k, v in {"token_dtype": token_dtype, "latent_dtype": latent_dtype,
                                           "dim": dim}.items() if v is not None}
    if metadata is not None:
        out["dataset_metadata"] = dict(metadata)
    return out
