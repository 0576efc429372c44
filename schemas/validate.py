"""Checking a dataset against its manifest and schema.

`validate(root)` reads every shard and returns a list of precise problems
(empty when the dataset is sound): missing or altered files (sha256), column
types, row and token counts, token IDs at or above vocab_size, latent shapes,
grids that do not multiply out to num_tokens, metadata that names another
tokenizer, and a dataset card (README.md) that lists another commit's files.
Error shards are checked like data shards (sha256, row counts, schema).
"""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tokenmill.schemas.card import CARD_NAME, card_state
from tokenmill.schemas.manifest import MANIFEST_NAME, Manifest, ManifestError, dataset_path, read_manifest
from tokenmill.schemas.storage import join, read_bytes
from tokenmill.schemas.tables import (ERROR_SCHEMA, LATENT_NUMPY, SCHEMA_VERSION, read_metadata, schema_differences,
                            schema_for_manifest)


def _check_table(path: str, table: pa.Table, manifest: Manifest, shard: dict[str, Any]) -> list[str]:
    problems = []
    tok = manifest.tokenizer
    n = table.num_rows
    if n != shard["rows"]:
        problems.append(f"{path}: {n} rows, manifest says {shard['rows']}")
    num_tokens = table.column("num_tokens").combine_chunks()
    total = int(pc.sum(num_tokens).as_py() or 0)
    if total != shard["tokens"]:
        problems.append(f"{path}: {total} tokens, manifest says {shard['tokens']}")
    payload = "tokens" if "tokens" in table.column_names else "latents"
    column = table.column(payload).combine_chunks()
    if payload == "latents":  # bytes per row = num_tokens x dim x value size
        size = np.dtype(LATENT_NUMPY[tok.get("latent_dtype")]).itemsize * int(tok.get("dim") or 0)
        lengths = pc.divide(pc.binary_length(column), size) if size else pc.binary_length(column)
    else:
        lengths = pc.list_value_length(column)
    bad = pc.not_equal(lengths, num_tokens.cast(lengths.type))
    if pc.any(bad).as_py():
        row = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
        problems.append(f"{path}: row {row}: {payload} has {lengths[row].as_py()} entries, "
                        f"num_tokens says {num_tokens[row].as_py()}")
    if payload == "tokens":
        vocab = tok.get("vocab_size")
        biggest = pc.max(pc.list_flatten(column)).as_py()
        if vocab is not None and biggest is not None and biggest >= vocab:
            problems.append(f"{path}: token ID {biggest} is not below vocab_size {vocab}")
    elif pc.any(pc.not_equal(pc.binary_length(column),
                             pc.multiply(num_tokens.cast(pa.int64()), size))).as_py():
        bad_rows = np.flatnonzero(pc.not_equal(pc.binary_length(column), pc.multiply(
            num_tokens.cast(pa.int64()), size)).to_numpy(zero_copy_only=False))
        r = int(bad_rows[0])
        problems.append(f"{path}: row {r}: latents hold {pc.binary_length(column)[r].as_py()} bytes, "
                        f"num_tokens x dim x {size // max(int(tok.get('dim') or 1), 1)} bytes = "
                        f"{num_tokens[r].as_py() * size}")
    if "grid" in table.column_names:
        grid = table.column("grid").combine_chunks()
        cells = np.prod(grid.flatten().to_numpy().reshape(n, -1), axis=1) if n else np.zeros(0)
        mismatch = np.flatnonzero(cells != num_tokens.to_numpy())
        if len(mismatch):
            r = int(mismatch[0])
            problems.append(f"{path}: row {r}: grid {grid[r].as_py()} holds {int(cells[r])} tokens, "
                            f"num_tokens says {num_tokens[r].as_py()}")
    return problems


class _Unreachable(Exception):
    """The store failed (no credentials, endpoint down): the check stops with one line saying so."""


def _read(root: str, path: str) -> bytes | None:
    """The bytes of a manifest-named file, None if it is missing; _Unreachable on any other storage failure."""
    uri = dataset_path(root, path)
    try:
        return read_bytes(uri)
    except FileNotFoundError:
        return None
    except Exception as e:
        raise _Unreachable(f"{uri}: cannot read: {_cause(e)}") from None


def _cause(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def validate(root: str) -> list[str]:
    """Problems found in the dataset at `root`; [] means valid.

    Never raises for a damaged dataset or a failing store: a manifest that is
    malformed or names a path outside the dataset is one line, and a storage
    failure (missing credentials, an endpoint that is down) ends the check
    with one line naming it.
    """
    try:
        manifest = read_manifest(root)
    except FileNotFoundError:
        return [f"{root}: no _manifest.json (not a tokenmill dataset, or its build did not finish)"]
    except ManifestError as e:
        return [str(e)]
    except ValueError as e:
        return [f"{root}/_manifest.json: unreadable: {e}"]
    except Exception as e:
        return [f"{join(root, MANIFEST_NAME)}: cannot read: {_cause(e)}"]
    problems: list[str] = []
    try:
        _check(root, manifest, problems)
    except _Unreachable as e:
        problems.append(str(e))
    return problems


def _check(root: str, manifest: Manifest, problems: list[str]) -> None:
    if manifest.schema_version != SCHEMA_VERSION:
        problems.append(f"schema_version {manifest.schema_version} is not supported (expected {SCHEMA_VERSION})")
        return
    try:
        expected = schema_for_manifest(manifest)
    except Exception as e:  # a tokenizer entry no schema fits (an unknown kind or dtype)
        problems.append(f"manifest 'tokenizer' gives no {manifest.modality} schema: {_cause(e)}")
        return
    if [s["path"] for s in manifest.shards] != list(manifest.files):
        problems.append("manifest 'files' and 'shards' list different files")
    rows = tokens = 0
    for shard in manifest.shards:
        path = shard["path"]
        absent = [k for k in ("rows", "tokens", "sha256") if k not in shard]
        if absent:
            problems.append(f"{path}: the manifest's shard entry has no {', '.join(absent)}")
            continue
        data = _read(root, path)
        if data is None:
            problems.append(f"{path}: missing")
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest != shard["sha256"]:
            problems.append(f"{path}: sha256 {digest[:16]}... does not match the manifest's "
                            f"{shard['sha256'][:16]}... (file changed or corrupt)")
            continue
        try:
            pf = pq.ParquetFile(pa.BufferReader(data))
        except Exception as e:
            problems.append(f"{path}: not readable as Parquet: {e}")
            continue
        diff = schema_differences(pf.schema_arrow, expected)
        if diff:
            problems.append(f"{path}: not the {manifest.modality}/{manifest.tokenizer.get('kind', 'hard')} "
                            f"schema: {'; '.join(diff)}")
            continue
        fingerprint = read_metadata(pf.schema_arrow).get("fingerprint")
        if fingerprint != manifest.tokenizer.get("fingerprint"):
            problems.append(f"{path}: tokenizer fingerprint {fingerprint} differs from the manifest's "
                            f"{manifest.tokenizer.get('fingerprint')}")
        try:
            problems += _check_table(path, pf.read(), manifest, shard)
        except Exception as e:  # rows the manifest's tokenizer entry cannot describe
            problems.append(f"{path}: cannot check its rows: {_cause(e)}")
        rows += shard["rows"]
        tokens += shard["tokens"]
    if rows != manifest.rows:
        problems.append(f"shards hold {rows} rows, manifest says {manifest.rows}")
    if tokens != manifest.tokens:
        problems.append(f"shards hold {tokens} tokens, manifest says {manifest.tokens}")
    _check_errors(root, manifest, problems)
    try:
        card = card_state(root, manifest)
    except Exception as e:
        raise _Unreachable(f"{join(root, CARD_NAME)}: cannot read: {_cause(e)}") from None
    if card == "stale":  # the user's own README.md, or none, is fine
        problems.append(f"{CARD_NAME}: the dataset card lists other files than commit {manifest.commit}'s, "
                        "so `datasets.load_dataset` reads another commit (the next build or `tokenmill gc` "
                        "rewrites it)")


def _check_errors(root: str, manifest: Manifest, problems: list[str]) -> None:
    """Error shards as data shards are checked: present, the sha256 and row count their entry records, the schema."""
    entries = {e["path"]: e for e in manifest.error_shards}
    if [e["path"] for e in manifest.error_shards] != list(manifest.error_files):
        problems.append("manifest 'error_files' and 'error_shards' list different files")
    errors = 0
    for path in manifest.error_files:
        entry = entries.get(path, {})
        data = _read(root, path)
        if data is None:
            problems.append(f"{path}: missing")
            continue
        if path in entries and "sha256" not in entry:
            problems.append(f"{path}: the manifest's error shard entry has no sha256")
        digest = hashlib.sha256(data).hexdigest()
        if "sha256" in entry and digest != entry["sha256"]:
            problems.append(f"{path}: sha256 {digest[:16]}... does not match the manifest's "
                            f"{entry['sha256'][:16]}... (file changed or corrupt)")
            continue
        try:
            table = pq.read_table(pa.BufferReader(data))
        except Exception as e:
            problems.append(f"{path}: not readable as Parquet: {e}")
            continue
        diff = schema_differences(table.schema, ERROR_SCHEMA)
        if diff:
            problems.append(f"{path}: not an error shard: {'; '.join(diff)}")
        if "errors" in entry and table.num_rows != entry["errors"]:
            problems.append(f"{path}: {table.num_rows} error rows, manifest says {entry['errors']}")
        errors += table.num_rows
    if errors != manifest.errors:
        problems.append(f"error shards hold {errors} rows, manifest says {manifest.errors}")
