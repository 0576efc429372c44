"""The elements that flow between tokenmill's transforms.

Work moves in *blocks*: a block is a contiguous run of records of one input
shard (a byte range, a stretch of a compressed stream or a group of Parquet
rows), a few MiB in size. Passing blocks instead of single records keeps Beam's
per-element cost off the hot path, and because block boundaries depend only on
the input and the block size, the same inputs give the same blocks, rows and
file names with 1 or N workers.

Reading work comes as typed *read tasks* (ReadTask and its kinds), each of
which knows what it covers, the block numbers its blocks take (Block numbers,
below: the one place shard names are made unique) and its error rows.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Sequence

import pyarrow as pa


@dataclasses.dataclass(frozen=True)
class InputFile:
    """One matched input shard."""

    uri: str
    size: int
    change_token: str  # mtime, ETag or checksum: whatever the filesystem offers


# -- Block numbers -----------------------------------------------------------
# A shard is named part-<source key>-<block>[-<part>] (shard_name, below), so
# block numbers must never repeat within one input. Each read task says which
# numbers its blocks take, from these rules alone:
#   byte range i of a plain file ............... i
#   a stream (compressed file, whole .txt) ..... 0, 1, 2, ... as it is read
#   Parquet row group g ........................ g * BLOCKS_PER_ROW_GROUP + k
#   tar samples [first, end) ................... first // samples per block
#   video number n of a file or tar ............ n * BLOCKS_PER_VIDEO + k (its failure: the last of that range)
#   a file's listing errors .................... FILE_ERRORS_BLOCK
#   a read task that failed .................... failed_task_block(its first block): negative, below
#                                                FILE_ERRORS_BLOCK, so never one its blocks took
BLOCKS_PER_ROW_GROUP = 1000
BLOCKS_PER_VIDEO = 1 << 20
FILE_ERRORS_BLOCK = -1


def failed_task_block(block: int) -> int:
    """The error block of a read task that failed, even after yielding blocks of its own."""
    return FILE_ERRORS_BLOCK - 1 - block


@dataclasses.dataclass(frozen=True)
class ReadTask:
    """A unit of reading work over one input file (or a group of small ones); subclasses say what it covers.

    `block` is the number of the first block it yields (see Block numbers).
    A task that fails before yielding its records becomes error rows through
    `error_block`, so nothing it covers is lost.
    """

    source: str
    block: int
    size: int  # the input file's size in bytes

    @property
    def nbytes(self) -> int:
        """Input bytes the task covers (for ordering tasks and for progress)."""
        return self.size

    def locator(self) -> str:
        return "file"

    def error_records(self, stage: str, kind: str, message: str) -> list["ErrorRecord"]:
        return [ErrorRecord(self.source, self.locator(), stage, kind, message)]

    def error_block(self, stage: str, kind: str, message: str) -> "TokenBlock":
        return TokenBlock(self.source, failed_task_block(self.block), None, self.error_records(stage, kind, message),
                          self.nbytes)


@dataclasses.dataclass(frozen=True)
class TextRangeTask(ReadTask):
    """The lines that *start* in bytes [start, end) of a plain (seekable) .jsonl or .txt file."""

    fmt: str  # jsonl | txt-lines
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def locator(self) -> str:
        return "file" if (self.start, self.end) == (0, self.size) else f"offset:{self.start}-{self.end}"


@dataclasses.dataclass(frozen=True)
class TextStreamTask(ReadTask):
    """A whole text stream read front to back: a compressed file, or a .txt that is one document."""

    fmt: str  # jsonl | txt | txt-lines
    compression: str  # "" | gzip | zstd


@dataclasses.dataclass(frozen=True)
class ParquetTask(ReadTask):
    """Row groups [first_group, end_group) of a Parquet file; block = first_group * BLOCKS_PER_ROW_GROUP."""

    first_group: int
    end_group: int
    data_bytes: int = 0  # the groups' uncompressed size, as the footer says

    @property
    def nbytes(self) -> int:
        return self.data_bytes or self.size

    def locator(self) -> str:
        return f"row_groups:{self.first_group}-{self.end_group}"


@dataclasses.dataclass(frozen=True)
class ParquetIndexTask(ReadTask):
    """A Parquet file whose footer a worker reads and splits into ParquetTasks (sources/common.SpreadAndSplit)."""


@dataclasses.dataclass(frozen=True)
class TarIndexTask(ReadTask):
    """A plain tar whose headers a worker reads and splits into TarMembersTasks."""


@dataclasses.dataclass(frozen=True)
class TarStreamTask(ReadTask):
    """A compressed tar, streamed front to back by one worker (it cannot be read by range)."""


@dataclasses.dataclass(frozen=True)
class TarMembersTask(ReadTask):
    """Samples [first, end) of a plain tar, each read by its byte range: (name, offset, size, sidecar meta)."""

    first: int
    end: int
    entries: tuple[tuple[str, int, int, str | None], ...]

    @property
    def nbytes(self) -> int:
        return sum(e[2] for e in self.entries)

    def error_records(self, stage: str, kind: str, message: str) -> list["ErrorRecord"]:
        return [ErrorRecord(self.source, f"member:{name}", stage, kind, message) for name, *_ in self.entries]


@dataclasses.dataclass(frozen=True)
class ImageFilesTask(ReadTask):
    """A group of loose image files, one record each (locator 'file'); `source` is the first of them."""

    members: tuple[str, ...]
    total: int  # their bytes together

    @property
    def nbytes(self) -> int:
        return self.total

    def error_records(self, stage: str, kind: str, message: str) -> list["ErrorRecord"]:
        return [ErrorRecord(uri, "file", stage, kind, message) for uri in self.members]


@dataclasses.dataclass(frozen=True)
class ErrorRecord:
    """An input record (or range) that could not become a data row."""

    source: str
    locator: str
    stage: str  # read | decode | tokenize | write
    error_type: str
    message: str


class _Records:
    """What every block of records shares: its failure as error rows, one per record it held."""

    def error_block(self, stage: str, kind: str, message: str) -> "TokenBlock":
        sources = getattr(self, "sources", None) or [self.source] * len(self.locators)
        errors = list(self.errors) + [ErrorRecord(src, loc, stage, kind, message)
                                      for src, loc in zip(sources, self.locators)]
        return TokenBlock(self.source, self.block, None, errors, self.nbytes)


@dataclasses.dataclass
class RawBlock(_Records):
    """Records as read: raw bytes (jsonl, txt) or column values (Parquet)."""

    source: str
    block: int
    fmt: str
    locators: list[str]
    payloads: Sequence[Any]
    errors: list[ErrorRecord]
    nbytes: int = 0
    sources: list[str] | None = None  # per record, where records come from several files
    metas: list[str | None] | None = None  # per record sidecar metadata (JSON), images
    fields: Any = None  # Parquet text: the columns --keep-fields names (a pa.RecordBatch), row-aligned


@dataclasses.dataclass
class ImageBlock(_Records):
    """Decoded RGB uint8 images (H, W, 3) with where they came from."""

    source: str
    block: int
    locators: list[str]
    sources: list[str]
    images: list[Any]
    infos: list[dict[str, Any]]
    metas: list[str | None]
    errors: list[ErrorRecord]
    nbytes: int = 0


@dataclasses.dataclass(frozen=True)
class VideoTask:
    """One video to decode: a file, or a member of a tar shard (read from its byte range)."""

    source: str  # the video file, or the tar that holds it
    member: str = ""  # tar member name; "" for a video file
    ordinal: int = 0  # the member's place among its tar's videos
    offset: int = 0  # where the member's bytes start in the tar
    size: int = 0
    meta: str | None = None  # sidecar metadata (JSON)

    # Block numbers of one tar's videos are spaced apart, so that videos decoded on
    # different workers never write the same shard name.
    BLOCKS_PER_VIDEO = BLOCKS_PER_VIDEO

    @property
    def block(self) -> int:
        return self.ordinal * BLOCKS_PER_VIDEO

    def error_block(self, stage: str, kind: str, message: str) -> "TokenBlock":
        """The video as one error row, numbered past its own blocks so as not to replace one."""
        return TokenBlock(self.source, self.block + BLOCKS_PER_VIDEO - 1, None,
                          [ErrorRecord(self.source, self.locator(), stage, kind, message)])

    def locator(self, clip: int | None = None) -> str:
        """'clip:N' / 'member:NAME#clip:N' for a clip; 'file' / 'member:NAME' for the whole video."""
        where = f"member:{self.member}" if self.member else ""
        if clip is None:
            return where or "file"
        return f"{where}#clip:{clip}" if where else f"clip:{clip}"


@dataclasses.dataclass
class VideoBlock(_Records):
    """Decoded clips (T, H, W, 3) uint8, each with its timing (`infos`) and origin."""

    source: str
    block: int
    locators: list[str]
    sources: list[str]
    clips: list[Any]
    infos: list[dict[str, Any]]
    metas: list[str | None]
    errors: list[ErrorRecord]
    nbytes: int = 0


@dataclasses.dataclass
class TextBlock(_Records):
    """Decoded documents, ready for a tokenizer."""

    source: str
    block: int
    locators: list[str]
    texts: list[str]
    errors: list[ErrorRecord]
    nbytes: int = 0
    meta: Any = None  # --keep-fields: a pa.StructArray, one entry per text


@dataclasses.dataclass
class TokenBlock:
    """Tokenized rows as an Arrow table in the dataset schema, plus the block's errors.

    `table` is None for a block that only carries errors.
    """

    source: str
    block: int
    table: pa.Table | None
    errors: list[ErrorRecord]
    nbytes: int = 0  # input bytes the block covers, as read (decompressed): for progress


@dataclasses.dataclass(frozen=True)
class ShardResult:
    """What the writer reports for one block; the manifest is built from these."""

    source: str
    block: int
    data_path: str | None  # relative to the dataset root
    error_path: str | None
    rows: int
    tokens: int
    errors: int
    data_bytes: int
    data_sha256: str
    error_sha256: str
    fingerprint: str
    row_groups: tuple[int, ...] = ()
    sources: tuple[str, ...] = ()  # every input with rows or errors in the shard(s)
    written_at: float = 0.0  # unix time the shard was written: throughput over the run


def source_key(uri: str) -> str:
    """Short stable key of an input URI, used in shard file names."""
    return hashlib.sha1(uri.encode()).hexdigest()[:12]


def shard_name(source: str, block: int, part: int | None = None) -> str:
    """part-<source key>-<block>[-<part>].parquet; `part` numbers the files of a block split by size."""
    return f"part-{source_key(source)}-{block:06d}" + (f"-{part:03d}" if part is not None else "") + ".parquet"


def row_id(source: str, locator: str) -> str:
    return hashlib.blake2b(source.encode() + b"\0" + locator.encode(), digest_size=8).hexdigest()


def row_ids(source: str, locators: Sequence[str]) -> list[str]:
    """Stable row ids: the same source and locator always give the same id."""
    prefix = source.encode() + b"\0"
    return [hashlib.blake2b(prefix + loc.encode(), digest_size=8).hexdigest() for loc in locators]
