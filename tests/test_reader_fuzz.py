"""Fuzzing the text readers (hypothesis): random valid and damaged jsonl, gzip, zstd and Parquet, random block sizes.

Through the same pure functions the pipeline runs (plan_blocks → read_task → decode_block), so thousands of
inputs cost seconds. Invariants: no exception escapes; no locator twice; valid input comes back exactly, in
order; damaged input keeps every record before the damage and accounts for the rest as error rows.
"""
from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from hypothesis import HealthCheck, given, settings, strategies as st

from tokenmill.transforms.decoders.text import decode_block
from tokenmill.transforms.records import InputFile
from tokenmill.transforms.sources.text import plan_blocks, read_task

TEXTS = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
RECORDS = st.lists(TEXTS, min_size=1, max_size=40)


def _read(path: Path, block_bytes: int, max_doc_bytes: int = 1 << 20):
    """(rows as (locator, text) in order, error rows as (locator, stage, type)) of one file."""
    f = InputFile(str(path), path.stat().st_size, "x")
    planned = plan_blocks(f, block_bytes, False)
    if not isinstance(planned, list):
        return [], [(planned.locator, planned.stage, planned.error_type)]
    rows, errors = [], []
    for task in planned:
        for raw in read_task(task, "text", block_bytes, max_doc_bytes):
            block = decode_block(raw, "text")
            rows += list(zip(block.locators, block.texts))
            errors += [(e.locator, e.stage, e.error_type) for e in block.errors]
    return rows, errors


def _jsonl(texts: list[str], ascii_only: bool) -> bytes:
    return b"".join(json.dumps({"text": t}, ensure_ascii=ascii_only).encode() + b"\n" for t in texts)


def _compress(data: bytes, kind: str) -> bytes:
    return {"": data, ".gz": gzip.compress(data), ".zst": zstandard.ZstdCompressor().compress(data)}[kind]


def _no_locator_twice(rows, errors):
    locators = [loc for loc, _ in rows] + [e[0] for e in errors]
    assert len(locators) == len(set(locators)), locators


SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(texts=RECORDS, ascii_only=st.booleans(), kind=st.sampled_from(["", ".gz", ".zst"]),
       block=st.integers(16, 4096))
def test_valid_jsonl_comes_back_exactly(tmp_path, texts, ascii_only, kind, block):
    path = tmp_path / f"v.jsonl{kind}"
    path.write_bytes(_compress(_jsonl(texts, ascii_only), kind))
    rows, errors = _read(path, block)
    assert errors == [] and [t for _, t in rows] == texts
    _no_locator_twice(rows, errors)


@SETTINGS
@given(texts=RECORDS, kind=st.sampled_from(["", ".gz", ".zst"]), block=st.integers(16, 4096),
       cut=st.floats(0.05, 0.95))
def test_a_cut_off_file_keeps_a_prefix_and_says_where_it_broke(tmp_path, texts, kind, block, cut):
    data = _jsonl(texts, False)
    whole = _compress(data, kind)
    at = max(1, int(len(whole) * cut))
    path = tmp_path / f"c.jsonl{kind}"
    path.write_bytes(whole[:at])
    rows, errors = _read(path, block)
    _no_locator_twice(rows, errors)
    got = [t for _, t in rows]
    assert got == texts[:len(got)]  # a prefix, in order: nothing invented, nothing reordered
    if kind:  # a compressed stream cut short says so, once, after the last row
        [(loc, stage, _)] = [e for e in errors if e[1] == "read"]
        assert stage == "read" and (not rows or int(loc.split(":")[1]) > int(rows[-1][0].split(":")[1]))
    else:  # a plain file: every whole record before the cut is a row; a record cut in two, an error row
        *whole, tail = data[:at].split(b"\n")
        complete = data[at:at + 1] == b"\n"  # the cut fell just before a newline: the last record is whole
        assert len(got) == len(whole) + (1 if tail and complete else 0)
        assert len(errors) == (1 if tail and not complete else 0)


@SETTINGS
@given(texts=RECORDS, block=st.integers(16, 4096), flips=st.lists(st.tuples(st.floats(0, 0.999), st.integers(0, 255)),
                                                                  min_size=1, max_size=4))
def test_damaged_plain_jsonl_accounts_for_every_line(tmp_path, texts, block, flips):
    data = bytearray(_jsonl(texts, True))
    for where, value in flips:
        data[int(where * len(data))] = value
    path = tmp_path / "d.jsonl"
    path.write_bytes(bytes(data))
    rows, errors = _read(path, block)
    _no_locator_twice(rows, errors)
    # Lines as the reader sees them: split at newlines, blank ones skipped, a leading BOM dropped.
    body = bytes(data[3:]) if data.startswith(b"\xef\xbb\xbf") else bytes(data)
    lines = [line for line in body.split(b"\n") if line.strip()]
    assert len(rows) + len(errors) == len(lines)


@SETTINGS
@given(texts=st.lists(st.one_of(TEXTS, st.none(), st.integers()), min_size=1, max_size=60),
       groups=st.integers(1, 20), block=st.integers(16, 4096), damage=st.booleans(), where=st.floats(0.1, 0.9))
def test_parquet_rows_and_error_rows_cover_every_record(tmp_path, texts, groups, block, damage, where):
    strings = [t if isinstance(t, str) else None for t in texts]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": pa.array(strings, pa.string())}), buf, row_group_size=groups,
                   compression="none")
    data = bytearray(buf.getvalue())
    if damage:  # bytes in the middle of the data pages
        at = int(len(data) * where)
        data[at:at + 8] = b"\xab" * 8
    path = tmp_path / "p.parquet"
    path.write_bytes(bytes(data))
    try:
        rows, errors = _read(path, block)
    except Exception:  # noqa: BLE001 - in a build, a read task that raises becomes error rows for what it covers
        assert damage
        return
    _no_locator_twice(rows, errors)
    if not damage:
        assert [t for _, t in rows] == [s for s in strings if s is not None]
        assert len(rows) + len(errors) == len(strings)
