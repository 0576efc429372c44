"""The elements that flow between tokenmill's transforms.

Work moves in *blocks*: a block is a contiguous run of records of one input
shard (a byte range, a stretch of a compressed stream or a group of Parquet
rows), a few MiB in size. Passing blocks instead of single records keeps Beam's
per-element cost off the hot path, and because block boundaries depend only on
the input and the block size, the same inputs give the same blocks, rows and
file names with 1 or N workers.
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


@dataclasses.dataclass(frozen=True)
class BlockTask:
    """A unit of reading work: a byte range of a plain file, or a whole stream.

    For seekable plain files `start`/`end` bound the records that *start* in the
    range. Streams (compressed files, Parquet, whole-file text) have start=0,
    end=size and are cut into blocks while they are read.
    """

    source: str
    fmt: str  # jsonl | txt | txt-lines | parquet
    compression: str  # "" | gzip | zstd
    start: int
    end: int
    block: int  # index of the first block this task produces
    size: int
    members: tuple[str, ...] = ()  # image-files tasks: the files it reads
    entries: tuple[tuple[str, int, int, str | None], ...] = ()  # tar-members tasks: (name, offset, size, meta)


@dataclasses.dataclass(frozen=True)
class ErrorRecord:
    """An input record (or range) that could not become a data row."""

    source: str
    locator: str
    stage: str  # read | decode | tokenize | write
    error_type: str
    message: str


@dataclasses.dataclass
class RawBlock:
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


@dataclasses.dataclass
class ImageBlock:
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
    BLOCKS_PER_VIDEO = 1 << 20

    @property
    def block(self) -> int:
        return self.ordinal * self.BLOCKS_PER_VIDEO

    def locator(self, clip: int | None = None) -> str:
        """'clip:N' / 'member:NAME#clip:N' for a clip; 'file' / 'member:NAME' for the whole video."""
        where = f"member:{self.member}" if self.member else ""
        if clip is None:
            return where or "file"
        return f"{where}#clip:{clip}" if where else f"clip:{clip}"


@dataclasses.dataclass
class VideoBlock:
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
class TextBlock:
    """Decoded documents, ready for a tokenizer."""

    source: str
    block: int
    locators: list[str]
    texts: list[str]
    errors: list[ErrorRecord]
    nbytes: int = 0


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
