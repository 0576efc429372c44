"""Writing a token dataset: one Parquet data shard (and error shard) per block, then the commit.

Shard names derive from the input URI and block number, inside the run's own
folder (transforms/incremental.py), so the same inputs give the same files
whatever the number of workers, and a retried block overwrites its own shard
instead of adding a duplicate. (Beam's WriteToParquetBatched names shards by
bundle, which varies with the runner.) Shards of unchanged inputs are carried
over from the current commit. The manifest is committed last, by a single step
that waits for every shard (schemas/versions.py).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any, Iterable, Iterator

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows
from fsspec.implementations.local import LocalFileSystem

from tokenmill.schemas.manifest import DATA_DIR, ERRORS_DIR, Manifest, dataset_path, now_iso, tokenmill_version
from tokenmill.schemas.storage import (DIRECT_ALIGN, join, local_atomic_path, local_render_buffer, read_bytes,
                             write_bytes_atomic, write_file_direct)
from tokenmill.schemas.tables import ERROR_SCHEMA, read_metadata
from tokenmill.schemas.versions import commit
from tokenmill.transforms.overlap import OneAhead
from tokenmill.transforms.incremental import RunPlan, plan_run
from tokenmill.transforms.tokenizers.base import FatalTokenizerError
from tokenmill.transforms.records import (FILE_ERRORS_BLOCK, ErrorRecord, InputFile, ShardResult, TokenBlock,
                                          shard_name)

PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    # Token IDs barely repeat within a page; dictionary-encoding them costs
    # time and gains nothing, while `source` is one value per shard.
    "use_dictionary": ["source", "modality"],
}
# Min/max statistics only where they are cheap and useful: on 200 MB of patch
# bytes they took 1.6 of 2.2 s of writing (measured here).
STATISTICS_COLUMNS = ("id", "source", "locator", "modality", "num_tokens")
# Where writers leave one small JSON record per written block while a build
# runs; the launcher polls it to show progress (pipelines/progress.py), since
# a local runner reports Beam metrics only once the pipeline has finished.
PROGRESS_DIR = ".tokenmill-progress"


DEFAULT_SHARD_BYTES = 256 << 20
# Shards below this go through the page cache: direct I/O pays off on bulk
# writes (see schemas/storage.write_file_direct), not on small files.
DIRECT_MIN_BYTES = 8 << 20
DEFAULT_ROW_GROUP_BYTES = 16 << 20
CODECS = ("zstd", "lz4", "snappy", "gzip", "brotli", "none")


def default_compression(token_kind: str) -> str:
    """The codec `--compression auto` picks: zstd for token IDs and text, lz4 for soft latents.

    Latent columns (patch pixels, pca and torchscript vectors) are most of a
    dataset's bytes and are read back at training speed. Measured here: on
    1.8 GB of video patches zstd saved 9% of the bytes for 2.5 more CPU-seconds
    than lz4 and made the build 7.2-7.8 s instead of 9.0 s; on smooth 512x512
    images it saved 23% (269 vs 347 MB). Give --compression zstd to prefer size.
    """
    return "lz4" if token_kind == "soft" else "zstd"


def parse_compression(spec: str) -> tuple[str, int | None]:
    """'zstd', 'zstd:LEVEL', 'lz4', 'snappy', 'gzip[:LEVEL]', 'brotli[:LEVEL]' or 'none' → (codec, level)."""
    codec, _, level = spec.lower().partition(":")
    if codec not in CODECS:
        raise ValueError(f"unknown compression {spec!r}: use one of {', '.join(CODECS)} (zstd:LEVEL for a level)")
    if not level:
        return codec, None
    if codec in ("lz4", "snappy", "none") or not level.lstrip("-").isdigit():
        raise ValueError(f"compression {spec!r}: only zstd, gzip and brotli take an integer level")
    return codec, int(level)


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """How big data shards and their row groups may get, in (uncompressed Arrow) bytes.

    A block's rows go to one shard, or to several where they exceed
    `shard_bytes`; row groups hold about `row_group_bytes` each: big enough
    for fast sequential reads, small enough to be the unit a training reader
    shuffles and splits among workers. Both depend on the data only, never on
    the runner or worker count.
    """

    shard_bytes: int = DEFAULT_SHARD_BYTES
    row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES
    # Parquet codec of data shards (see parse_compression). zstd suits token IDs
    # and smooth images; pixels of noisy video barely compress (1.8 GB -> 1.64 GB
    # measured) and lz4 or none write them for a fraction of the CPU.
    compression: str = "zstd"
    # Local shards of DIRECT_MIN_BYTES or more are rendered in memory and
    # written with O_DIRECT (schemas/storage.write_file_direct).
    direct_io: bool = True

    def split(self, table: pa.Table) -> list[pa.Table]:
        n = max(1, math.ceil(table.nbytes / self.shard_bytes))
        step = math.ceil(table.num_rows / n)
        return [table] if n == 1 else [table.slice(i, step) for i in range(0, table.num_rows, step)]

    def group_rows(self, table: pa.Table) -> int:
        return max(1, math.ceil(table.num_rows * self.row_group_bytes / max(table.nbytes, 1)))


def _write_parquet(table: pa.Table, where: Any, row_group_rows: int | None, compression: str) -> None:
    codec, level = parse_compression(compression)
    pq.write_table(table, where, write_statistics=[c for c in STATISTICS_COLUMNS if c in table.column_names],
                   row_group_size=row_group_rows, **{**PARQUET_OPTIONS, "compression": codec},
                   compression_level=level)


def parquet_bytes(table: pa.Table, row_group_rows: int | None = None, compression: str = "zstd") -> pa.Buffer:
    """The table as one Parquet file in memory (an Arrow buffer: no extra copy)."""
    sink = pa.BufferOutputStream()
    _write_parquet(table, sink, row_group_rows, compression)
    return sink.getvalue()


def write_parquet_shard(uri: str, table: pa.Table, row_group_rows: int | None, compression: str,
                        direct_io: bool = False) -> tuple[int, str, tuple[int, ...]]:
    """Write a data shard atomically; its (bytes, sha256, rows per row group).

    With `direct_io`, a local shard of DIRECT_MIN_BYTES or more is rendered
    into a reused page-aligned buffer, hashed there and written past the page
    cache (schemas/storage.write_file_direct). Other local shards stream
    straight to their temporary file and are hashed from there: a patch shard
    is hundreds of MB, which a fresh in-memory copy would hold twice
    (measured: 1.6 GB of patch rows wrote in 3.6 s instead of 4.1 s).
    """
    fs, path = fsspec.core.url_to_fs(uri)
    if not isinstance(fs, LocalFileSystem):
        payload = parquet_bytes(table, row_group_rows, compression)
        write_bytes_atomic(uri, payload)
        groups = _row_groups(pq.read_metadata(pa.BufferReader(payload)))
        return payload.size, hashlib.sha256(payload).hexdigest(), groups
    if direct_io and table.nbytes >= DIRECT_MIN_BYTES:
        view, size = _render_parquet(table, row_group_rows, compression)
        data = view[:size]
        with local_atomic_path(path) as tmp:
            if not write_file_direct(tmp, view, size):
                with open(tmp, "wb") as f:
                    f.write(data)
        groups = _row_groups(pq.read_metadata(pa.BufferReader(pa.py_buffer(data))))
        return size, hashlib.sha256(data).hexdigest(), groups
    with local_atomic_path(path) as tmp:
        _write_parquet(table, tmp, row_group_rows, compression)
        with open(tmp, "rb") as f:
            sha = hashlib.file_digest(f, "sha256").hexdigest()
        size, groups = os.path.getsize(tmp), _row_groups(pq.read_metadata(tmp))
    return size, sha, groups


def _render_parquet(table: pa.Table, row_group_rows: int | None, compression: str) -> tuple[memoryview, int]:
    """The table as a Parquet file in this thread's render buffer: (the buffer, the file's size).

    The buffer is sized from the table, with room for codec overhead (lz4 and
    zstd grow incompressible data by well under 1%) and the footer, and grown
    if pyarrow still runs out of it.
    """
    need = table.nbytes + table.nbytes // 32 + (1 << 20)
    buffer = local_render_buffer()
    while True:
        view = buffer.reserve(need + DIRECT_ALIGN)
        sink = pa.FixedSizeBufferWriter(pa.py_buffer(view))
        try:
            _write_parquet(table, sink, row_group_rows, compression)
            return view, sink.tell()
        except OSError as e:
            if "out of bounds" not in str(e):  # pyarrow's only sign that the file outgrew the buffer
                raise
            need *= 2


def errors_table(errors: Iterable[ErrorRecord]) -> pa.Table:
    errors = list(errors)
    return pa.Table.from_pydict(
        {name: [getattr(e, name) for e in errors] for name in ERROR_SCHEMA.names}, schema=ERROR_SCHEMA)


def _under(prefix: str, sub: str, name: str) -> str:
    return f"{prefix}/{sub}/{name}" if prefix else f"{sub}/{name}"


def _row_groups(md: pq.FileMetaData) -> tuple[int, ...]:
    return tuple(md.row_group(i).num_rows for i in range(md.num_row_groups))


def write_block(root: str, block: TokenBlock, prefix: str = "",
                layout: ShardLayout = ShardLayout()) -> list[ShardResult]:
    """Write one block's data shard(s) and error shard under ROOT/PREFIX; empty parts write no file.

    The first result also carries the block's error shard.
    """
    errors_path, error_sha = None, ""
    if block.errors:
        payload = parquet_bytes(errors_table(block.errors))
        errors_path = _under(prefix, ERRORS_DIR, shard_name(block.source, block.block))
        write_bytes_atomic(join(root, errors_path), payload)
        error_sha = hashlib.sha256(payload).hexdigest()
    error_sources = {e.source for e in block.errors}
    parts = layout.split(block.table) if block.table is not None and block.table.num_rows else [None]
    results = []
    for k, table in enumerate(parts):
        data_path, rows, tokens, data_bytes, data_sha, fingerprint, row_groups = None, 0, 0, 0, "", "", ()
        sources = set(error_sources) if k == 0 else set()
        if table is not None:
            name = shard_name(block.source, block.block, k if len(parts) > 1 else None)
            data_path = _under(prefix, DATA_DIR, name)
            data_bytes, data_sha, row_groups = write_parquet_shard(join(root, data_path), table,
                                                                   layout.group_rows(table), layout.compression,
                                                                   layout.direct_io)
            rows = table.num_rows
            tokens = int(pc.sum(table.column("num_tokens")).as_py() or 0)
            fingerprint = read_metadata(table.schema).get("fingerprint", "")
            sources |= set(pc.unique(table.column("source")).to_pylist())
        first = k == 0
        results.append(ShardResult(block.source, block.block, data_path, errors_path if first else None, rows,
                                   tokens, len(block.errors) if first else 0, data_bytes, data_sha,
                                   error_sha if first else "", fingerprint, row_groups,
                                   sources=tuple(sorted(sources)), written_at=round(time.time(), 3)))
    return results


def write_progress(root: str, block: TokenBlock, results: list[ShardResult]) -> None:
    """One progress record per written block; a retried block overwrites its own.

    Not fsynced: the records only feed the live display and are deleted when the build ends, and two
    fsyncs per block (and deleting what they made durable) cost seconds in a build of 10,000 small files."""
    kind = "data" if block.table is not None else "errors"
    record = {"source": block.source, "block": block.block, "rows": sum(r.rows for r in results),
              "tokens": sum(r.tokens for r in results), "errors": sum(r.errors for r in results),
              "input_bytes": block.nbytes, "written_at": max(r.written_at for r in results),
              "sources": block_sources(block)}
    write_bytes_atomic(join(root, PROGRESS_DIR, f"{kind}-{shard_name(block.source, block.block)}.json"),
                       json.dumps(record).encode(), durable=False)


def block_sources(block: TokenBlock) -> list[str]:
    """The input files a block covers, in order (one for text; several for a block of image files)."""
    found = dict.fromkeys([block.source])
    if block.table is not None and "source" in block.table.column_names:
        found.update(dict.fromkeys(block.table.column("source").unique().to_pylist()))
    found.update(dict.fromkeys(e.source for e in block.errors))
    return list(found)


def carried_result(entry: dict[str, Any], fingerprint: str) -> ShardResult:
    """A shard of the current commit that the new commit references as it is."""
    sources = tuple(entry.get("sources") or [entry["source"]])
    if "errors" in entry:  # an error shard entry
        return ShardResult(entry["source"], entry["block"], None, entry["path"], 0, 0, entry["errors"], 0, "",
                           entry["sha256"], fingerprint, (), sources)
    return ShardResult(entry["source"], entry["block"], entry["path"], None, entry["rows"], entry["tokens"], 0,
                       entry["bytes"], entry["sha256"], "", fingerprint, tuple(entry.get("row_groups") or ()),
                       sources)


def rewrite_shard(root: str, entry: dict[str, Any], staying: list[str], prefix: str,
                  fingerprint: str) -> ShardResult:
    """Copy a shard without the rows of changed or removed inputs (no tokenizing)."""
    table = pq.read_table(pa.BufferReader(read_bytes(dataset_path(root, entry["path"]))))
    table = table.filter(pc.is_in(table.column("source"), pa.array(staying, pa.string())))
    is_errors = "errors" in entry
    name = "carry-" + entry["path"].rsplit("/", 1)[-1]
    path = _under(prefix, ERRORS_DIR if is_errors else DATA_DIR, name)
    payload = parquet_bytes(table, ShardLayout().group_rows(table))
    write_bytes_atomic(join(root, path), payload)
    sha, sources = hashlib.sha256(payload).hexdigest(), tuple(sorted(staying))
    if is_errors:
        return ShardResult(entry["source"], entry["block"], None, path, 0, 0, table.num_rows, 0, "", sha,
                           fingerprint, (), sources)
    tokens = int(pc.sum(table.column("num_tokens")).as_py() or 0)
    return ShardResult(entry["source"], entry["block"], path, None, table.num_rows, tokens, 0, payload.size,
                       sha, "", fingerprint, _row_groups(pq.read_metadata(pa.BufferReader(payload))), sources)


def _message(exc_type: type, exc_repr: str) -> str:
    """The message inside a dead-letter's repr, `Type('message')` -> `message`, else the repr as it is."""
    import ast

    name = exc_type.__name__
    if exc_repr.startswith(name + "(") and exc_repr.endswith(")"):
        try:
            value = ast.literal_eval(exc_repr[len(name) + 1:-1])
        except (ValueError, SyntaxError):
            return exc_repr
        if isinstance(value, str):
            return value
    return exc_repr


def failed_to_block(failed: tuple[Any, tuple[type, str, list[str]]], stage: str) -> TokenBlock:
    """A dead-letter element from with_exception_handling, as error records.

    Every record the failed element held gets an error row, so nothing is lost;
    a read task that failed before yielding records gets rows for what it covers.
    """
    element, (exc_type, exc_repr, _tb) = failed
    if isinstance(exc_type, type) and issubclass(exc_type, FatalTokenizerError):
        raise exc_type(_message(exc_type, exc_repr))  # not a bad record: the build must stop
    if isinstance(exc_type, type) and issubclass(exc_type, ImportError):  # a missing dependency, for every record
        raise FatalTokenizerError(f"{stage} cannot run here: {exc_type.__name__}: {_message(exc_type, exc_repr)}")
    kind = getattr(exc_type, "__name__", str(exc_type))
    message = f"{stage} failed for the whole block: {exc_repr}"
    if isinstance(element, str):  # a tar of videos that could not be listed
        return TokenBlock(element, 0, None, [ErrorRecord(element, "file", stage, kind, message)])
    if not hasattr(element, "error_block"):  # every read task and block knows its error rows (records.py)
        raise TypeError(f"unexpected dead-letter element {type(element).__name__}")
    return element.error_block(stage, kind, message)



def error_to_block(errors: ErrorRecord | list[ErrorRecord]) -> TokenBlock:
    """The errors found while listing one file (unsupported, empty, unsafe tar members) as one block.

    All of a file's listing errors must come in one call: they share one error shard.
    """
    errors = [errors] if isinstance(errors, ErrorRecord) else list(errors)
    return TokenBlock(errors[0].source, FILE_ERRORS_BLOCK, None, errors)


class _WriteShards(beam.DoFn):
    """Writes each block's shards in a background thread while the next block is read and tokenized.

    Compressing and hashing a block's Parquet (Arrow and hashlib release the
    GIL) then overlaps the decoding of the next one: with a spare core that
    hides most of the writing. One block is in flight at most, so memory stays
    bounded; results and metrics come out on the bundle's own thread, in order.
    """

    def __init__(self, root: str, layout: ShardLayout, progress: bool = True):
        self._root, self._layout, self._progress = root, layout, progress
        self._rows = Metrics.counter("tokenmill", "rows_written")
        self._errors = Metrics.counter("tokenmill", "errors")
        self._writer = OneAhead(self._write, "tokenmill-write", drain_first=True)

    def setup(self):
        self._writer.start()

    def teardown(self):
        self._writer.stop(wait=True)

    def start_bundle(self):
        self._writer.reset()

    def _write(self, job: tuple[TokenBlock, str]) -> list[ShardResult]:
        block, run_dir = job
        results = write_block(self._root, block, run_dir, self._layout)
        if self._progress:
            write_progress(self._root, block, results)
        return results

    def _done(self, finished: Iterator[tuple[Any, list[ShardResult]]]) -> Iterator[ShardResult]:
        for _, results in finished:
            for result in results:
                self._rows.inc(result.rows)
                self._errors.inc(result.errors)
                yield result

    def process(self, block: TokenBlock, plan: RunPlan) -> Iterator[ShardResult]:
        yield from self._done(self._writer.push((block, plan.run_dir)))

    def finish_bundle(self):
        for result in self._done(self._writer.drain()):
            yield GlobalWindows.windowed_value(result)


class WriteTokenShards(beam.PTransform):
    """TokenBlocks → Parquet shards in the run's folder (PLAN.run_dir/data, /_errors); outputs ShardResults.

    With `progress`, each written block also leaves a record under ROOT/.tokenmill-progress for the launcher's
    display, which removes them when the build ends; only a local run has that launcher (a remote runner's
    would leave the folder behind, with nobody reading it).
    """

    def __init__(self, root: str, plan, layout: ShardLayout = ShardLayout(), progress: bool = True):
        super().__init__()
        self._root, self._plan, self._layout, self._progress = root, plan, layout, progress

    def expand(self, blocks):
        return blocks | "WriteShards" >> beam.ParDo(_WriteShards(self._root, self._layout, self._progress),
                                                    plan=beam.pvalue.AsSingleton(self._plan))


def _carry_tasks(plan: RunPlan) -> Iterator[tuple[str, dict[str, Any], list[str] | None, str]]:
    for entry in plan.keep:
        yield "keep", entry, None, plan.run_dir
    for entry, staying in plan.rewrite:
        yield "rewrite", entry, staying, plan.run_dir


class _CarryOver(beam.DoFn):
    def __init__(self, root: str, fingerprint: str):
        self._root, self._fingerprint = root, fingerprint
        self._kept = Metrics.counter("tokenmill", "shards_carried_over")
        self._rewritten = Metrics.counter("tokenmill", "shards_rewritten")

    def process(self, task: tuple[str, dict[str, Any], list[str] | None, str]) -> Iterator[ShardResult]:
        how, entry, staying, prefix = task
        if how == "keep":
            self._kept.inc()
            yield carried_result(entry, self._fingerprint)
        else:
            self._rewritten.inc()
            yield rewrite_shard(self._root, entry, staying or [], prefix, self._fingerprint)


class CarryOverShards(beam.PTransform):
    """The RunPlan → ShardResults for the rows of unchanged inputs, without tokenizing them."""

    def __init__(self, root: str, fingerprint: str):
        super().__init__()
        self._root, self._fingerprint = root, fingerprint

    def expand(self, plan):
        return (plan
                | "ShardsToCarry" >> beam.FlatMap(_carry_tasks)
                | "CarryShards" >> beam.ParDo(_CarryOver(self._root, self._fingerprint)))


def build_manifest(results: list[ShardResult], files: list[InputFile], plan: RunPlan | None = None, *,
                   modality: str, tokenizer: dict[str, Any], options: dict[str, Any],
                   build_args: list[str] | None = None, spec: dict[str, Any] | None = None,
                   started_at: float | None = None) -> Manifest:
    """The manifest of a finished run (outside a build, `plan` may be left out).

    Refuses shards made by another tokenizer.
    """
    plan = plan or plan_run(None, files, None)
    results = sorted(results, key=lambda r: (r.source, r.block, r.data_path or "", r.error_path or ""))
    stray = {r.fingerprint for r in results if r.data_path} - {tokenizer["fingerprint"]}
    if stray:
        raise RuntimeError(f"shards were tokenized with fingerprint(s) {sorted(stray)}, "
                           f"expected {tokenizer['fingerprint']}")
    data = [r for r in results if r.data_path]
    failed = [r for r in results if r.error_path]
    paths = collections.Counter([r.data_path for r in data] + [r.error_path for r in failed])
    twice = sorted(p for p, n in paths.items() if n > 1)
    if twice:  # two writes to one file: the later one replaced the earlier, and its rows are lost
        raise RuntimeError(f"shard path(s) written twice: {', '.join(twice)}")

    def input_entry(f: InputFile) -> dict[str, Any]:
        run = plan.unchanged[f.uri].get("run", "") if f.uri in plan.unchanged else plan.run_dir
        return {"uri": f.uri, "size": f.size, "change_token": f.change_token, "version": plan.version,
                "run": run}

    return Manifest(
        modality=modality,
        tokenizer=tokenizer,
        token_dtype=tokenizer["token_dtype"],
        files=[r.data_path for r in data],
        error_files=[r.error_path for r in failed],
        rows=sum(r.rows for r in results),
        tokens=sum(r.tokens for r in results),
        errors=sum(r.errors for r in results),
        inputs=[input_entry(f) for f in sorted(files, key=lambda f: f.uri)],
        shards=[{"path": r.data_path, "rows": r.rows, "tokens": r.tokens, "bytes": r.data_bytes,
                 "sha256": r.data_sha256, "source": r.source, "block": r.block,
                 "row_groups": list(r.row_groups), "sources": list(r.sources)} for r in data],
        error_shards=[{"path": r.error_path, "errors": r.errors, "sha256": r.error_sha256, "source": r.source,
                       "block": r.block, "sources": list(r.sources)} for r in failed],
        options=options,
        created_at=now_iso(),
        tokenmill_version=tokenmill_version(),
        version=plan.version,
        build_args=list(build_args or []),
        spec=dict(spec or {}),
        timing=run_timing(results, started_at),
    )


def run_timing(results: list[ShardResult], started_at: float | None) -> dict[str, Any]:
    """When the run started and finished and when each of its blocks was written (unix seconds).

    Kept apart from `shards`, which stay identical whatever the runner and timing.
    Shards carried over from an earlier commit were not written by this run.
    """
    blocks = sorted(([r.written_at, r.rows, r.tokens, r.errors] for r in results if r.written_at),
                    key=lambda b: b[0])
    return {"started_at": started_at, "finished_at": round(time.time(), 3),
            "blocks": blocks, "block_fields": ["written_at", "rows", "tokens", "errors"]}


class TooManyErrorsError(RuntimeError):
    """More of the records failed than --max-error-fraction allows: the run is not committed."""


def check_error_fraction(root: str, manifest: Manifest, limit: float) -> None:
    """Refuse a commit whose error rows exceed `limit` of all its records; name the first error.

    Why: a build whose tokenizer cannot run (a missing dependency, a wrong
    model) turns every record into an error row; committing that and exiting 0
    would hand a trainer an empty dataset as a success.
    """
    records = manifest.rows + manifest.errors
    if not records or manifest.errors <= limit * records:
        return
    first = ""
    if manifest.error_files:
        try:
            with fsspec.open(dataset_path(root, manifest.error_files[0]), "rb") as f:
                row = pq.ParquetFile(f).read_row_group(0).slice(0, 1).to_pylist()[0]
            first = f"; first: {row['stage']} {row['error_type']}: {row['message'][:200]} ({row['source']} " \
                    f"{row['locator']})"
        except Exception:  # the count alone still says enough
            pass
    raise TooManyErrorsError(f"{manifest.errors} of {records} records failed ({manifest.errors / records:.0%}), "
                             f"more than --max-error-fraction {limit:g}; nothing committed{first}")


class _Commit(beam.DoFn):
    def __init__(self, root: str, kwargs: dict[str, Any], max_error_fraction: float = 1.0):
        self._root, self._kwargs, self._max_error_fraction = root, kwargs, max_error_fraction
        self._committed = Metrics.counter("tokenmill", "commits")
        self._unchanged = Metrics.counter("tokenmill", "commits_unchanged")

    def process(self, results: list[ShardResult], files: list[InputFile], plan: RunPlan) -> Iterator[dict]:
        manifest = build_manifest(results, files, plan, **self._kwargs)
        check_error_fraction(self._root, manifest, self._max_error_fraction)
        outcome = commit(self._root, manifest, plan.base_commit)
        (self._committed if outcome == "committed" else self._unchanged).inc()
        yield {"root": self._root, "outcome": outcome, "version": manifest.version, "commit": manifest.commit,
               "rows": manifest.rows, "tokens": manifest.tokens, "errors": manifest.errors}


class CommitManifest(beam.PTransform):
    """Waits for every ShardResult, then commits the run (schemas/versions.py).

    Outputs one dict: root, outcome ("committed" or "unchanged"), version, commit and counts.
    """

    def __init__(self, root: str, files, plan, *, modality: str, tokenizer: dict[str, Any],
                 options: dict[str, Any], build_args: list[str] | None = None,
                 spec: dict[str, Any] | None = None, started_at: float | None = None,
                 max_error_fraction: float = 1.0):
        super().__init__()
        self._root, self._files, self._plan = root, files, plan
        self._max_error_fraction = max_error_fraction
        self._kwargs = {"modality": modality, "tokenizer": tokenizer, "options": options,
                        "build_args": build_args, "spec": spec, "started_at": started_at}

    def expand(self, results):
        all_files = self._files | "GatherInputs" >> beam.combiners.ToList()
        return (results
                | "GatherShardResults" >> beam.combiners.ToList()
                | "Commit" >> beam.ParDo(_Commit(self._root, self._kwargs, self._max_error_fraction),
                                         files=beam.pvalue.AsSingleton(all_files),
                                         plan=beam.pvalue.AsSingleton(self._plan)))
