"""Reading text shards: .jsonl, .txt and .parquet, plain, gzip or zstd, local or remote.

Pure functions plan and read blocks; `ReadTextShards` wraps them for Beam.
Plain files are cut into byte ranges that workers read in parallel with a seek;
compressed streams and Parquet files are read front to back, one block at a time,
so a huge file is never held in memory whole. A UTF-8 byte order mark at the
start of a .jsonl or .txt (after decompression) is dropped, not read as text.

Why not Beam's ReadFromText / fileio / ReadFromParquetBatched: ReadFromText
emits one element per line, and that per-element cost put a straightforward
ReadFromText → BatchElements → tokenize → WriteToParquetBatched pipeline at
0.76x raw tiktoken on one core; fileio and Beam's readers only reach Beam's
own filesystems. Reading whole blocks through fsspec makes the block the unit
of work from the first step, which is what lets the build match raw tiktoken.
"""
from __future__ import annotations

import gzip
import math
import zlib
from typing import IO, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

from tokenmill.transforms import fs
from tokenmill.transforms.records import (BLOCKS_PER_ROW_GROUP, ErrorRecord, InputFile, ParquetTask, RawBlock, ReadTask,
                                          TextRangeTask, TextStreamTask)
from tokenmill.transforms.incremental import Incremental, ListInputs, RunPlan
from tokenmill.transforms.sources.common import SpreadOverWorkers, parquet_row_groups, plan_parquet
from tokenmill.transforms.coders import BlockCoder  # noqa: F401  (registers the block coder)

DEFAULT_BLOCK_BYTES = 8 << 20
DEFAULT_MAX_DOC_BYTES = 64 << 20
_READ_CHUNK = 1 << 20
UTF8_BOM = b"\xef\xbb\xbf"

_COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".txt": "txt",
            ".text": "txt", ".parquet": "parquet"}
TEXT_EXTENSIONS = tuple(_FORMATS)


def detect_format(uri: str, txt_per_line: bool = False) -> tuple[str, str] | None:
    """(format, compression) from the file name, or None if unsupported."""
    name = uri.rsplit("/", 1)[-1].lower()
    compression = ""
    for ext, comp in _COMPRESSIONS.items():
        if name.endswith(ext):
            compression, name = comp, name[: -len(ext)]
            break
    for ext, fmt in _FORMATS.items():
        if name.endswith(ext):
            if fmt == "parquet" and compression:
                return None  # Parquet compresses inside the file
            if fmt == "txt" and txt_per_line:
                fmt = "txt-lines"
            return fmt, compression
    return None


def plan_blocks(f: InputFile, block_bytes: int, txt_per_line: bool) -> list[ReadTask] | ErrorRecord:
    """Split one input file into read tasks, or explain why it cannot be read."""
    detected = detect_format(f.uri, txt_per_line)
    if detected is None:
        return ErrorRecord(f.uri, "file", "read", "UnsupportedFormat",
                           f"unsupported file type (expected one of {', '.join(TEXT_EXTENSIONS)}"
                           ", optionally .gz or .zst)")
    fmt, compression = detected
    if f.size == 0:
        return ErrorRecord(f.uri, "file", "read", "EmptyFile", "zero-byte file: no records")
    if fmt == "parquet":
        return plan_parquet(f, block_bytes)
    if compression or fmt == "txt":
        return [TextStreamTask(f.uri, 0, f.size, fmt=fmt, compression=compression)]
    n = max(1, math.ceil(f.size / block_bytes))
    return [TextRangeTask(f.uri, i, f.size, fmt=fmt, start=i * block_bytes, end=min(f.size, (i + 1) * block_bytes))
            for i in range(n)]


def _without_bom(data: bytes) -> bytes:
    """`data` less a UTF-8 byte order mark it starts with. Only for data that starts a (decompressed) stream:
    there a BOM says the encoding and is no part of the first record; anywhere else it is data."""
    return data[len(UTF8_BOM):] if data.startswith(UTF8_BOM) else data


def _split_lines(data: bytes, base: int, source: str = "", max_doc_bytes: int | None = None
                 ) -> tuple[list[str], list[bytes], list[ErrorRecord]]:
    """Non-blank lines of `data` with their 'offset:N' locators (N = base + index, where the line starts).

    At base 0, the start of the stream, a BOM is dropped from the first line (its locator stays offset:0).
    Lines longer than `max_doc_bytes` become DocumentTooLarge error records instead.
    """
    locators: list[str] = []
    lines: list[bytes] = []
    errors: list[ErrorRecord] = []
    pos = base
    for line in data.split(b"\n"):
        body = _without_bom(line) if pos == 0 else line
        if body.strip():
            if max_doc_bytes is not None and len(body) > max_doc_bytes:
                errors.append(_too_large(source, pos, max_doc_bytes))
            else:
                locators.append(f"offset:{pos}")
                lines.append(body[:-1] if body.endswith(b"\r") else body)
        pos += len(line) + 1
    return locators, lines, errors


def _too_large(source: str, offset: int | str, max_doc_bytes: int) -> ErrorRecord:
    locator = offset if isinstance(offset, str) else f"offset:{offset}"
    return ErrorRecord(source, locator, "read", "DocumentTooLarge",
                       f"record is larger than --max-doc-bytes={max_doc_bytes}; skipped")


def _line_rest(f: IO[bytes], keep: int, limit: int | None = None) -> tuple[bytes | None, int]:
    """Read to the end of the current line (newline included): (the bytes, or None past `keep` bytes; bytes consumed).

    Memory stays within `keep` + one chunk however long the line: a 1 GB line
    is scanned in chunks, not read whole (f.readline() would hold all of it).
    `limit` stops the scan after that many bytes (the line goes on).
    """
    kept = bytearray()
    consumed = 0
    while True:
        if limit is not None and consumed >= limit:
            return None, consumed
        chunk = f.read(_READ_CHUNK if limit is None else min(_READ_CHUNK, limit - consumed))
        if not chunk:
            return (bytes(kept) if consumed <= keep else None), consumed
        i = chunk.find(b"\n")
        part = chunk if i < 0 else chunk[:i + 1]
        consumed += len(part)
        if consumed <= keep:
            kept += part
        if i >= 0:
            f.seek(len(part) - len(chunk), 1)  # give back what follows the line
            return (bytes(kept) if consumed <= keep else None), consumed


def read_line_range(f: IO[bytes], task: TextRangeTask, max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES) -> RawBlock:
    """The lines that start in [task.start, task.end) of a seekable plain file."""
    pos = task.start
    if pos > 0:
        f.seek(pos - 1)
        if f.read(1) != b"\n":  # mid-line: that line belongs to the previous block
            skipped = _line_rest(f, 0, task.end - pos)[1]
            if pos + skipped >= task.end:  # no line starts in this range (it lies inside a long one)
                return RawBlock(task.source, task.block, task.fmt, [], [], [], 0)
            pos += skipped
    else:
        f.seek(0)
    data = f.read(task.end - pos) if pos < task.end else b""
    errors: list[ErrorRecord] = []
    if data and not data.endswith(b"\n"):  # finish the last line, which may run past `end`
        start = data.rfind(b"\n") + 1
        rest, _ = _line_rest(f, max(0, max_doc_bytes + 1 - (len(data) - start)))
        if rest is None:  # the line is too long: its start is dropped too
            errors.append(_too_large(task.source, pos + start, max_doc_bytes))
            data = data[:start]
        else:
            data += rest
    locators, lines, too_large = _split_lines(data, pos, task.source, max_doc_bytes)
    return RawBlock(task.source, task.block, task.fmt, locators, lines, too_large + errors, len(data))


def _decompressed(f: IO[bytes], compression: str) -> IO[bytes]:
    if compression == "gzip":
        return gzip.GzipFile(fileobj=f, mode="rb")
    if compression == "zstd":
        import zstandard

        from tokenmill.transforms.sources.zstd_frames import FrameCheckedSource

        # stream_reader ends cleanly on a cut-off frame: the wrapper makes that an error.
        return zstandard.ZstdDecompressor().stream_reader(FrameCheckedSource(f), read_across_frames=True)
    return f


def read_line_stream(f: IO[bytes], task: TextStreamTask, block_bytes: int,
                     max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES) -> Iterator[RawBlock]:
    """Blocks of lines from a (possibly compressed) stream, read front to back.

    A stream that breaks off (truncated gzip, corrupt zstd) yields the complete
    lines before the break and an error record at the offset of the first
    record it could not read. A line longer than `max_doc_bytes` becomes a
    DocumentTooLarge error record and is skipped as it streams past: memory
    stays within a block plus `max_doc_bytes`, and time linear, however long
    the line (a buffer re-joined per chunk made one 1 GB line quadratic).
    """
    stream = _decompressed(f, task.compression)
    # read1 returns what one decompression step produced, so the data before a
    # break is kept; read(n) would discard it along with the exception.
    read = getattr(stream, "read1", stream.read)
    block, offset = task.block, 0  # offset: stream position of pending[0]
    pending = bytearray()
    last_nl = -1  # index in `pending` of its last newline
    skipping = False  # inside an oversized line, discarding it
    errors: list[ErrorRecord] = []  # for the next block out
    total = 0

    def emit(cut: int) -> RawBlock:
        nonlocal block, offset, errors
        locators, lines, too_large = _split_lines(bytes(pending[:cut]), offset, task.source, max_doc_bytes)
        out = RawBlock(task.source, block, task.fmt, locators, lines, errors + too_large, cut)
        del pending[:cut]
        block, offset, errors = block + 1, offset + cut, []
        return out

    while True:
        try:
            chunk = read(_READ_CHUNK)
        except Exception as e:  # EOFError, OSError, zlib.error, zstandard.ZstdError and the like
            yield _tail_error(task, block, offset, bytes(pending), e, errors)
            return
        if not chunk:
            break
        total += len(chunk)
        if skipping:
            i = chunk.find(b"\n")
            if i < 0:
                offset += len(chunk)
                continue
            offset += i + 1
            chunk, skipping = chunk[i + 1:], False
        j = chunk.rfind(b"\n")
        if j >= 0:
            last_nl = len(pending) + j
        pending += chunk
        if len(pending) - (last_nl + 1) > max_doc_bytes:  # the unfinished last line is already too long
            start = offset + last_nl + 1
            errors.append(_too_large(task.source, start, max_doc_bytes))
            if last_nl >= 0:
                yield emit(last_nl + 1)
            offset += len(pending)
            pending.clear()
            last_nl, skipping = -1, True
        elif len(pending) >= block_bytes and last_nl >= 0:
            yield emit(last_nl + 1)
            last_nl = -1
    if total == 0:
        yield RawBlock(task.source, block, task.fmt, [], [],
                       [ErrorRecord(task.source, "file", "read", "EmptyFile",
                                    "file decompresses to zero bytes: no records")])
        return
    yield emit(len(pending))


def _tail_error(task: TextStreamTask, block: int, offset: int, pending: bytes, exc: Exception,
                errors: list[ErrorRecord] = ()) -> RawBlock:
    cut = pending.rfind(b"\n") + 1
    locators, lines, too_large = _split_lines(pending[:cut], offset, task.source)
    err = ErrorRecord(task.source, f"offset:{offset + cut}", "read", type(exc).__name__,
                      f"stream ended early ({exc}); records from this offset on are lost")
    return RawBlock(task.source, block, task.fmt, locators, lines, [*errors, *too_large, err], cut)


def read_whole_text(f: IO[bytes], task: TextStreamTask, max_doc_bytes: int) -> RawBlock:
    """One document per file."""
    stream = _decompressed(f, task.compression)
    try:
        data = stream.read(max_doc_bytes + 1)
    except Exception as e:
        err = ErrorRecord(task.source, "file", "read", type(e).__name__, f"cannot read file: {e}")
        return RawBlock(task.source, task.block, task.fmt, [], [], [err])
    if len(data) > max_doc_bytes:
        err = ErrorRecord(task.source, "file", "read", "DocumentTooLarge",
                          f"document is larger than --max-doc-bytes={max_doc_bytes}")
        return RawBlock(task.source, task.block, task.fmt, [], [], [err])
    if not data:
        err = ErrorRecord(task.source, "file", "read", "EmptyFile", "file decompresses to zero bytes")
        return RawBlock(task.source, task.block, task.fmt, [], [], [err])
    return RawBlock(task.source, task.block, task.fmt, ["file"], [_without_bom(data)], [], len(data))


def read_parquet(f: IO[bytes], task: ParquetTask, text_field: str, block_bytes: int,
                 keep_columns: tuple[str, ...] = (), max_doc_bytes: int | None = None) -> Iterator[RawBlock]:
    """Blocks of values of the text column, about `block_bytes` each, with 'row:N' locators.

    keep_columns: top-level columns that --keep-fields reads beside the text (those the file has).
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    md = pf.metadata
    column = text_field.split(".", 1)[0]
    if column not in pf.schema_arrow.names:
        locators = [f"row:{i}" for g, first in parquet_row_groups(pf, task)
                    for i in range(first, first + md.row_group(g).num_rows)]
        errors = [ErrorRecord(task.source, loc, "decode", "MissingField",
                              f"Parquet file has no column {column!r}") for loc in locators]
        yield RawBlock(task.source, task.block, "parquet", [], [], errors)
        return
    extra = [c for c in dict.fromkeys(keep_columns) if c in pf.schema_arrow.names and c != column]
    for g, row in parquet_row_groups(pf, task):
        group = md.row_group(g)
        rows_per_block = max(1, int(block_bytes * group.num_rows / max(group.total_byte_size, 1)))
        block = g * BLOCKS_PER_ROW_GROUP
        for batch in pf.iter_batches(batch_size=rows_per_block, row_groups=[g], columns=[column, *extra]):
            values = batch.column(0)
            locators = [f"row:{i}" for i in range(row, row + len(values))]
            errors = []
            if max_doc_bytes is not None and _is_text(values.type):
                sizes = pc.binary_length(values)
                big = pc.fill_null(pc.greater(sizes, max_doc_bytes), False)
                if pc.any(big).as_py():
                    keep = pc.invert(big)
                    errors = [_too_large(task.source, loc, max_doc_bytes)
                              for loc, b in zip(locators, big.to_pylist()) if b]
                    locators = [loc for loc, b in zip(locators, big.to_pylist()) if not b]
                    values, batch = values.filter(keep), batch.filter(keep)
            yield RawBlock(task.source, block, "parquet", locators, values, errors, values.nbytes,
                           fields=batch if keep_columns else None)
            block, row = block + 1, row + len(values)


def _is_text(type_) -> bool:
    import pyarrow as pa

    return pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_binary(type_) \
        or pa.types.is_large_binary(type_)


def read_task(task: ReadTask, text_field: str, block_bytes: int, max_doc_bytes: int,
              keep_columns: tuple[str, ...] = ()) -> Iterator[RawBlock]:
    """All blocks of one read task."""
    with fs.open_binary(task.source) as f:
        if isinstance(task, ParquetTask):
            yield from read_parquet(f, task, text_field, block_bytes, keep_columns, max_doc_bytes)
        elif isinstance(task, TextRangeTask):
            yield read_line_range(f, task, max_doc_bytes)
        elif task.fmt == "txt":  # a TextStreamTask: one document per file
            yield read_whole_text(f, task, max_doc_bytes)
        else:
            yield from read_line_stream(f, task, block_bytes, max_doc_bytes)


class _PlanTextTasks(beam.DoFn):
    """Plans the read tasks of the inputs a run must tokenize.

    Tasks leave largest first: Beam's local runner deals a stage's input out to
    its workers round-robin, and largest-first keeps their shares even.
    """

    def __init__(self, block_bytes: int, txt_per_line: bool):
        self._block_bytes = block_bytes
        self._txt_per_line = txt_per_line

    def process(self, plan: RunPlan) -> Iterator[ReadTask | beam.pvalue.TaggedOutput]:
        tasks: list[ReadTask] = []
        for f in plan.todo:
            planned = plan_blocks(f, self._block_bytes, self._txt_per_line)
            if isinstance(planned, ErrorRecord):
                yield beam.pvalue.TaggedOutput("errors", planned)
            else:
                tasks.extend(planned)
        yield from sorted(tasks, key=lambda t: (-t.nbytes, t.source, t.block))


@beam.typehints.with_output_types(RawBlock)
class _ReadBlocks(beam.DoFn):
    def __init__(self, text_field: str, block_bytes: int, max_doc_bytes: int, keep_columns: tuple[str, ...] = ()):
        self._text_field, self._keep_columns = text_field, keep_columns
        self._block_bytes = block_bytes
        self._max_doc_bytes = max_doc_bytes
        self._bytes = Metrics.counter("tokenmill", "bytes_read")
        self._blocks = Metrics.counter("tokenmill", "blocks")

    def process(self, task: ReadTask) -> Iterator[RawBlock]:
        for block in read_task(task, self._text_field, self._block_bytes, self._max_doc_bytes, self._keep_columns):
            self._bytes.inc(block.nbytes)
            self._blocks.inc()
            yield block


class ReadTextShards(beam.PTransform):
    """Globs → matched files → read tasks → RawBlocks.

    Outputs a dict: 'files' (InputFile, for the manifest), 'plan' (the RunPlan:
    with `incremental`, only new and changed inputs are read), 'blocks'
    (RawBlock), 'errors' (ErrorRecord for files that cannot be read at all) and
    'failed' (read tasks that raised: (ReadTask, exception info)).
    Listing happens inside the pipeline, so building it reads no data.
    """

    def __init__(self, patterns: list[str], *, text_field: str = "text", txt_per_line: bool = False,
                 block_bytes: int = DEFAULT_BLOCK_BYTES, max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
                 incremental: Incremental | None = None, keep_columns: tuple[str, ...] = ()):
        super().__init__()
        self._keep_columns = tuple(keep_columns)
        self._patterns = list(patterns)
        self._incremental = incremental
        self._text_field = text_field
        self._txt_per_line = txt_per_line
        self._block_bytes = block_bytes
        self._max_doc_bytes = max_doc_bytes

    def expand(self, pbegin):
        listed = pbegin | "ListInputs" >> ListInputs(self._patterns, self._incremental)
        planned = (listed["plan"]
                   | "PlanReadTasks" >> beam.ParDo(_PlanTextTasks(self._block_bytes, self._txt_per_line))
                   .with_outputs("errors", main="tasks"))
        tasks = planned.tasks | "SpreadOverWorkers" >> SpreadOverWorkers()
        blocks, failed = (tasks
                          | "ReadBlocks" >> beam.ParDo(
                              _ReadBlocks(self._text_field, self._block_bytes, self._max_doc_bytes,
                                          self._keep_columns))
                          .with_exception_handling(partial=True))
        return {"files": listed["files"], "plan": listed["plan"], "blocks": blocks, "errors": planned.errors,
                "failed": failed}
