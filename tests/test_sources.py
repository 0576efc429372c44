"""Reading shards without Beam: block planning covers every record exactly once."""
from __future__ import annotations

import gzip
import io

import pytest
from hypothesis import given, settings, strategies as st

from tokenmill.transforms.decoders.text import decode_block
from tokenmill.transforms.records import InputFile
from tokenmill.transforms.sources.text import detect_format, plan_blocks, read_line_stream, read_task

LINES = st.lists(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\n\r"),
                         max_size=40), max_size=60)


def expected_records(data: bytes) -> list[tuple[str, bytes]]:
    out, pos = [], 0
    for line in data.split(b"\n"):
        if line.strip():
            out.append((f"offset:{pos}", line))
        pos += len(line) + 1
    return out


@settings(max_examples=150, deadline=None)
@given(lines=LINES, block=st.integers(1, 64), trailing_newline=st.booleans())
def test_byte_range_blocks_cover_every_line_once(tmp_path_factory, lines, block, trailing_newline):
    data = "\n".join(lines).encode() + (b"\n" if trailing_newline and lines else b"")
    path = tmp_path_factory.mktemp("ranges") / "x.jsonl"
    path.write_bytes(data)
    tasks = plan_blocks(InputFile(str(path), len(data), ""), block, False)
    if not data:
        assert tasks.error_type == "EmptyFile"
        return
    got = []
    for task in tasks:
        for raw in read_task(task, "text", block, 1 << 20):
            got += list(zip(raw.locators, raw.payloads))
    assert got == expected_records(data)
    assert len({t.block for t in tasks}) == len(tasks)


@settings(max_examples=60, deadline=None)
@given(lines=LINES, block=st.integers(1, 200))
def test_compressed_stream_blocks_cover_every_line_once(tmp_path_factory, lines, block):
    data = "\n".join(lines).encode() + b"\n"
    path = tmp_path_factory.mktemp("gz") / "x.jsonl.gz"
    path.write_bytes(gzip.compress(data))
    (task,) = plan_blocks(InputFile(str(path), path.stat().st_size, ""), block, False)
    got, blocks = [], []
    for raw in read_task(task, "text", block, 1 << 20):
        got += list(zip(raw.locators, raw.payloads))
        blocks.append(raw.block)
        assert not raw.errors or data.strip() == b""
    if data.strip():
        assert got == expected_records(data)
    assert blocks == list(range(len(blocks)))


def test_truncated_gzip_keeps_complete_lines_and_reports_the_rest():
    data = b"".join(b'{"text": "line %d"}\n' % i for i in range(2000))
    cut = gzip.compress(data)[:-200]
    from tokenmill.transforms.records import TextStreamTask

    task = TextStreamTask("mem.jsonl.gz", 0, len(cut), fmt="jsonl", compression="gzip")
    blocks = list(read_line_stream(io.BytesIO(cut), task, 1 << 20))
    records = [p for b in blocks for p in b.payloads]
    errors = [e for b in blocks for e in b.errors]
    assert len(errors) == 1 and errors[0].stage == "read" and errors[0].error_type == "EOFError"
    assert 0 < len(records) < 2000
    assert records == data.split(b"\n")[: len(records)]
    assert errors[0].locator == f"offset:{sum(len(r) + 1 for r in records)}"


@pytest.mark.parametrize("name,expected", [
    ("a.jsonl", ("jsonl", "")), ("a.JSONL.GZ", ("jsonl", "gzip")), ("a.jsonl.zst", ("jsonl", "zstd")),
    ("a.txt", ("txt", "")), ("s3://b/x/a.parquet", ("parquet", "")), ("a.csv", None),
    ("a.parquet.gz", None)])
def test_detect_format(name, expected):
    assert detect_format(name) == expected


def test_decode_rejects_each_bad_record_with_its_reason():
    from tokenmill.transforms.records import RawBlock

    lines = [b'{"text": "ok"}', b'{"text": ', b'{"body": "x"}', b'{"text": 5}', b'{"text": null}',
             b'{"meta": {"text": "nested"}}', b'\xff\xfe']
    raw = RawBlock("s", 0, "jsonl", [f"offset:{i}" for i in range(len(lines))], lines, [])
    out = decode_block(raw, "text")
    assert out.texts == ["ok"]
    kinds = [e.error_type for e in out.errors]
    assert kinds == ["JSONDecodeError", "MissingField", "NonStringText", "NonStringText",
                     "MissingField", "JSONDecodeError"]
    assert "int, not a string" in out.errors[2].message
    nested = decode_block(raw, "meta.text")
    assert nested.texts == ["nested"]


class _CountingReader(io.RawIOBase):
    """A file that counts how many bytes have been read from it."""

    def __init__(self, data: bytes):
        self._f = io.BytesIO(data)
        self.read_bytes = 0

    def readable(self):
        return True

    def readinto(self, b):
        n = self._f.readinto(b)
        self.read_bytes += n
        return n


def test_compressed_stream_is_read_block_by_block_not_whole():
    from tokenmill.transforms.records import TextStreamTask

    data = b"".join(b'{"text": "%d %s"}\n' % (i, bytes(str(i * 7919 % 104729), "ascii") * 20)
                    for i in range(60000))
    packed = gzip.compress(data)
    f = _CountingReader(packed)
    task = TextStreamTask("mem.jsonl.gz", 0, len(packed), fmt="jsonl", compression="gzip")
    blocks = read_line_stream(f, task, 1 << 20)
    first = next(blocks)
    assert first.nbytes >= 1 << 20
    assert f.read_bytes < len(packed) // 2  # the rest of the stream is still unread
    rest = list(blocks)
    assert sum(len(b.payloads) for b in [first, *rest]) == 60000


@settings(max_examples=100, deadline=None)
@given(records=st.lists(st.one_of(
    st.builds(lambda t: {"text": t}, st.text(max_size=30)),
    st.builds(lambda v: {"text": v}, st.one_of(st.integers(), st.none(), st.lists(st.integers(), max_size=2))),
    st.builds(lambda t: {"other": t}, st.text(max_size=5)),
    st.sampled_from(['{"text": "unclosed', "{}", "[1, 2]", '"just a string"', "nul\x00l"]),
), max_size=40), block=st.integers(16, 400))
def test_every_record_is_a_row_or_an_error(tmp_path_factory, records, block):
    """The invariant, on the pure read → decode → tokenize chain."""
    import json

    from tokenmill.transforms.tokenize import tokenize_block
    from tokenmill.transforms.tokenizers.spec import shared_text_tokenizer
    from tokenmill.schemas.tables import text_hard_schema

    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path = tmp_path_factory.mktemp("inv") / "x.jsonl"
    path.write_text("".join(l + "\n" for l in lines))
    tok = shared_text_tokenizer("bytes")
    schema = text_hard_schema(tok.token_type, tok.metadata())
    planned = plan_blocks(InputFile(str(path), path.stat().st_size, ""), block, False)
    non_blank = sum(1 for l in lines if l.strip())
    good = sum(1 for r in records if isinstance(r, dict) and isinstance(r.get("text"), str))
    if not isinstance(planned, list):  # a zero-byte file is one error row
        assert planned.error_type == "EmptyFile" and not lines
        return
    rows = errors = 0
    for task in planned:
        for raw in read_task(task, "text", block, 1 << 20):
            out = tokenize_block(tok, decode_block(raw, "text"), schema)
            rows += out.table.num_rows
            errors += len(out.errors)
    assert rows == good
    assert rows + errors == non_blank


def test_a_big_parquet_file_is_read_by_row_groups_in_parallel_tasks(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.conftest import TWO_PROCESSES, read_rows, run_build
    from tokenmill.transforms.records import InputFile
    from tokenmill.transforms.sources.common import plan_parquet

    path = tmp_path / "big.parquet"
    texts = [f"document {i} " + "x" * (i % 300) for i in range(4000)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=250)  # 16 row groups
    tasks = plan_parquet(InputFile(str(path), path.stat().st_size, "t"), budget_bytes=40_000)
    assert len(tasks) > 4 and tasks[0].first_group == 0 and tasks[-1].end_group == 16
    assert all(a.end_group == b.first_group for a, b in zip(tasks, tasks[1:]))  # every row group once, in order
    outs = []
    for name, runner in (("one", None), ("two", TWO_PROCESSES)):
        out = tmp_path / name
        assert run_build(["--input", str(path), "--output", str(out), "--tokenizer", "bytes",
                          "--block-size", "40k"], runner) == 0
        outs.append(read_rows(out))
    rows = outs[0]
    assert rows.equals(outs[1]) and rows.num_rows == 4000
    by_locator = {r["locator"]: bytes(r["tokens"]).decode() for r in rows.to_pylist()}
    assert all(by_locator[f"row:{i}"] == texts[i] for i in (0, 249, 250, 1234, 3999))
