"""Reading image shards: image files, WebDataset-style tar shards, Parquet with an image column.

Records carry raw encoded bytes; decoding happens in transforms/decoders/images.py.
- Image files (jpg, jpeg, png, webp, bmp, tif, tiff, gif) are grouped into read
  tasks of up to `files_per_block` files; each file is one record, locator 'file'.
- Tar shards (never extracted): members key.jpg sit beside key.json or key.txt
  sidecars, which are kept as the row's `meta`. Members whose path is absolute
  or climbs out of the archive ('..'), links, later duplicates of a key, and a
  listing that stops before the end of the archive are error rows
  (transforms/sources/tars.py). A plain .tar is
  indexed (transforms/sources/tars.py) and its samples are read by byte range in
  tasks of `images_per_block` that workers share; a compressed tar cannot be
  read by range and is streamed by one worker.
- Parquet: the image column holds bytes, or Hugging Face's {"bytes", "path"} struct.
"""
from __future__ import annotations

import functools
import lzma
import tarfile
import zlib
from typing import IO, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

from tokenmill.transforms import fs
from tokenmill.transforms.records import (BLOCKS_PER_ROW_GROUP, ErrorRecord, ImageFilesTask, InputFile, ParquetIndexTask,
                                          ParquetTask, RawBlock, ReadTask, TarIndexTask, TarMembersTask, TarStreamTask)
from tokenmill.transforms.incremental import Incremental, ListInputs, RunPlan
from tokenmill.transforms.sources.common import SpreadAndSplit, parquet_placeholder, parquet_row_groups, plan_parquet
from tokenmill.transforms.sources.tars import TarSamples, TarStream, end_of_archive_error, index_tar
from tokenmill.transforms.coders import BlockCoder  # noqa: F401  (registers the block coder)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
SIDECAR_EXTENSIONS = (".json", ".txt")
# Images per block: a 512x512 image is 786 kB of patches, so 64 keep a block
# (and a worker's memory) to about 50 MB of tokens.
DEFAULT_FILES_PER_BLOCK = 64
DEFAULT_TAR_BLOCK = 64
PARQUET_TASK_BYTES = 64 << 20  # encoded image bytes per read task of a Parquet file


def image_kind(uri: str) -> str | None:
    name = uri.rsplit("/", 1)[-1].lower()
    if name.endswith(IMAGE_EXTENSIONS):
        return "image-files"
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    if name.endswith(".parquet"):
        return "parquet"
    return None


def plan_image_tasks(files: list[InputFile], files_per_block: int) -> tuple[list[ReadTask], list[ErrorRecord]]:
    """Read tasks for all matched files: loose images in groups, one task per tar or Parquet file."""
    tasks, errors, loose = [], [], []
    for f in files:
        kind = image_kind(f.uri)
        if kind is None:
            errors.append(ErrorRecord(f.uri, "file", "read", "UnsupportedFormat",
                                      f"not an image, tar or Parquet file name ({', '.join(IMAGE_EXTENSIONS)})"))
        elif f.size == 0:
            errors.append(ErrorRecord(f.uri, "file", "read", "EmptyFile", "zero-byte file"))
        elif kind == "image-files":
            loose.append(f)
        elif kind == "parquet":
            tasks.append(parquet_placeholder(f))  # split on a worker: split_image_task
        elif f.uri.lower().endswith(".tar"):
            tasks.append(TarIndexTask(f.uri, 0, f.size))  # split on a worker, likewise
        else:
            tasks.append(TarStreamTask(f.uri, 0, f.size))
    for i in range(0, len(loose), files_per_block):
        group = loose[i:i + files_per_block]
        total = sum(g.size for g in group)
        tasks.append(ImageFilesTask(group[0].uri, 0, total, members=tuple(g.uri for g in group), total=total))
    return tasks, errors


def read_image_files(task: ImageFilesTask) -> RawBlock:
    payloads, sources, errors = [], [], []
    for uri in task.members:
        try:
            with fs.open_binary(uri) as f:
                payloads.append(f.read())
            sources.append(uri)
        except OSError as e:
            errors.append(ErrorRecord(uri, "file", "read", type(e).__name__, f"cannot read: {e}"))
    return RawBlock(task.source, task.block, "image", ["file"] * len(payloads), payloads, errors,
                    sum(len(p) for p in payloads), sources=sources)


def split_tar(task: TarIndexTask, images_per_block: int) -> tuple[list[TarMembersTask], list[ErrorRecord]]:
    """A plain tar's read tasks: runs of `images_per_block` samples, each read by byte range."""
    samples, errors = index_tar(task.source, IMAGE_EXTENSIONS)
    tasks = []
    for i in range(0, len(samples), images_per_block):
        run = samples[i:i + images_per_block]
        tasks.append(TarMembersTask(task.source, i // images_per_block, task.size, first=i, end=i + len(run),
                                    entries=tuple((s.name, s.offset, s.size, s.meta) for s in run)))
    return tasks, errors


def read_tar_members(f: IO[bytes], task: TarMembersTask) -> RawBlock:
    """The samples of a tar-members task, each read by seeking to its data."""
    locators, payloads, metas, errors = [], [], [], []
    for name, offset, size, meta in task.entries:
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            errors.append(ErrorRecord(task.source, f"member:{name}", "read", "TruncatedTar",
                                      f"the tar ends {size - len(data)} bytes into this member"))
            continue
        locators.append(f"member:{name}")
        payloads.append(data)
        metas.append(meta)
    return RawBlock(task.source, task.block, "image", locators, payloads, errors, sum(map(len, payloads)),
                    metas=metas)


def read_tar(f: IO[bytes], task: TarStreamTask, images_per_block: int) -> Iterator[RawBlock]:
    """Blocks of images from a (compressed) tar stream, each with its sidecar metadata (WebDataset layout).

    Samples are grouped as in an index (tars.TarSamples: duplicates and bad
    sidecars are error rows); a stream that breaks, or whose listing stops
    before the end-of-archive marker, ends in an error row where it stopped.
    """
    block = task.block
    locators: list[str] = []
    payloads: list[bytes] = []
    metas: list[str | None] = []
    groups = TarSamples(task.source, IMAGE_EXTENSIONS, streaming=True)

    def add(samples) -> None:
        for (name, data), meta in samples:
            locators.append(f"member:{name}")
            payloads.append(data)
            metas.append(meta)

    def take_block() -> RawBlock:
        nonlocal block, locators, payloads, metas
        out = RawBlock(task.source, block, "image", locators, payloads, groups.errors,
                       sum(len(p) for p in payloads), metas=metas)
        block += 1
        locators, payloads, metas, groups.errors = [], [], [], []
        return out

    stream = TarStream(f)
    tar, member = None, None
    try:
        tar = tarfile.open(fileobj=stream, mode="r|")
        for member in tar:
            got = groups.part(member)
            if got is not None:
                key, part = got
                data = tar.extractfile(member).read()
                if part == "main":
                    groups.set_main(key, (member.name, data))
                else:
                    groups.set_sidecar(key, part, data)
            member = None
            add(groups.take())
            if len(payloads) >= images_per_block:
                yield take_block()
        if (err := end_of_archive_error(task.source, tar.offset, stream.since(tar.offset))) is not None:
            groups.errors.append(err)
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
        # Cut off inside a member's data: that member (TruncatedTar, as an index says it); else where the
        # listing had got to.
        where = "file" if tar is None else f"member:{member.name}" if member is not None else f"offset:{tar.offset}"
        cut = member is not None and isinstance(e, (EOFError, tarfile.ReadError))
        groups.errors.append(ErrorRecord(task.source, where, "read", "TruncatedTar" if cut else type(e).__name__,
                                         f"tar stream ended early ({e}); members from here on are lost"))
    finally:
        if tar is not None:
            tar.close()
    add(groups.take(finish=True))
    if payloads or groups.errors or block == task.block:
        yield take_block()


def read_image_parquet(f: IO[bytes], task: ParquetTask, field: str, images_per_block: int) -> Iterator[RawBlock]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    groups = list(parquet_row_groups(pf, task))
    if field not in pf.schema_arrow.names:
        errors = [ErrorRecord(task.source, f"row:{i}", "decode", "MissingField",
                              f"Parquet file has no column {field!r}")
                  for g, first in groups for i in range(first, first + pf.metadata.row_group(g).num_rows)]
        yield RawBlock(task.source, task.block, "image", [], [], errors)
        return
    for g, row in groups:
        yield from _image_batches(pf, task, field, images_per_block, g, row)


def _image_batches(pf, task: ParquetTask, field: str, images_per_block: int, group: int,
                   row: int) -> Iterator[RawBlock]:
    block = group * BLOCKS_PER_ROW_GROUP
    for batch in pf.iter_batches(batch_size=images_per_block, row_groups=[group], columns=[field]):
        values = batch.column(0).to_pylist()
        locators, payloads, errors = [], [], []
        for i, v in enumerate(values, row):
            data = v.get("bytes") if isinstance(v, dict) else v
            if isinstance(data, (bytes, bytearray)) and data:
                locators.append(f"row:{i}")
                payloads.append(bytes(data))
            else:
                errors.append(ErrorRecord(task.source, f"row:{i}", "decode", "NotImageBytes",
                                          f"column {field!r} holds {type(data).__name__}, not image bytes"))
        yield RawBlock(task.source, block, "image", locators, payloads, errors, sum(len(p) for p in payloads))
        block, row = block + 1, row + len(values)


def read_image_task(task: ReadTask, field: str, images_per_block: int) -> Iterator[RawBlock]:
    if isinstance(task, ImageFilesTask):
        yield read_image_files(task)
        return
    with fs.open_binary(task.source) as f:
        if isinstance(task, TarMembersTask):
            yield read_tar_members(f, task)
        elif isinstance(task, TarStreamTask):
            yield from read_tar(f, task, images_per_block)
        elif isinstance(task, ParquetTask):
            yield from read_image_parquet(f, task, field, images_per_block)
        else:
            raise TypeError(f"not an image read task: {type(task).__name__}")


class _PlanImageTasks(beam.DoFn):
    def __init__(self, files_per_block: int):
        self._files_per_block = files_per_block

    def process(self, plan: RunPlan):
        tasks, errors = plan_image_tasks(plan.todo, self._files_per_block)
        for e in errors:
            yield beam.pvalue.TaggedOutput("errors", e)
        yield from sorted(tasks, key=lambda t: (-t.size, t.source, t.block))  # whole files, largest first


def split_image_task(task: ReadTask, images_per_block: int) -> tuple[list[ReadTask], list[ErrorRecord]] | None:
    """A placeholder's finer tasks (see SpreadAndSplit): a plain tar's sample runs, a Parquet file's
    row-group runs; other tasks stay as they are."""
    if isinstance(task, TarIndexTask):
        return split_tar(task, images_per_block)
    if isinstance(task, ParquetIndexTask):
        return plan_parquet(task, PARQUET_TASK_BYTES), []
    return None


@beam.typehints.with_output_types(RawBlock)
class _ReadImageBlocks(beam.DoFn):
    def __init__(self, field: str, images_per_block: int):
        self._field, self._per_block = field, images_per_block
        self._bytes = Metrics.counter("tokenmill", "bytes_read")
        self._blocks = Metrics.counter("tokenmill", "blocks")

    def process(self, task: ReadTask) -> Iterator[RawBlock]:
        for block in read_image_task(task, self._field, self._per_block):
            self._bytes.inc(block.nbytes)
            self._blocks.inc()
            yield block


class ReadImageShards(beam.PTransform):
    """Globs → image read tasks → RawBlocks of encoded images. Same outputs as ReadTextShards."""

    def __init__(self, patterns: list[str], *, image_field: str = "image",
                 files_per_block: int = DEFAULT_FILES_PER_BLOCK, images_per_block: int = DEFAULT_TAR_BLOCK,
                 incremental: Incremental | None = None):
        super().__init__()
        self._patterns, self._field, self._incremental = list(patterns), image_field, incremental
        self._files_per_block, self._per_block = files_per_block, images_per_block

    def expand(self, pbegin):
        listed = pbegin | "ListInputs" >> ListInputs(self._patterns, self._incremental)
        planned = (listed["plan"]
                   | "PlanReadTasks" >> beam.ParDo(_PlanImageTasks(self._files_per_block))
                   .with_outputs("errors", main="tasks"))
        dealt = planned.tasks | "DealReadTasks" >> SpreadAndSplit(
            functools.partial(split_image_task, images_per_block=self._per_block))
        blocks, failed = (dealt["tasks"]
                          | "ReadBlocks" >> beam.ParDo(_ReadImageBlocks(self._field, self._per_block))
                          .with_exception_handling(partial=True))
        errors = (planned.errors, dealt["errors"]) | "JoinListingErrors" >> beam.Flatten()
        failed = (dealt["failed"], failed) | "JoinReadFailures" >> beam.Flatten()
        return {"files": listed["files"], "plan": listed["plan"], "blocks": blocks, "errors": errors,
                "failed": failed}
