"""What every reader shares: listing inputs, and dealing read tasks out to workers."""
from __future__ import annotations

from typing import Iterator

import apache_beam as beam

from transforms import fs
from transforms.records import BlockTask, InputFile


def list_files(patterns: list[str]) -> list[InputFile]:
    """Every file matched by any pattern, once, sorted by URI."""
    found = {f.uri: f for pattern in patterns for f in fs.match(pattern)}
    return [found[uri] for uri in sorted(found)]


def _task_key(task: BlockTask) -> tuple[str, int]:
    return task.source, task.block


class SpreadOverWorkers(beam.PTransform):
    """Redistributes read tasks so that workers read in parallel.

    Keyed by (source, block) rather than Reshuffle's random keys, so which worker
    gets which task (and so everything downstream) is the same on every run.
    """

    def expand(self, tasks):
        return (tasks
                | "KeyByBlock" >> beam.WithKeys(_task_key)
                | "GroupByBlock" >> beam.GroupByKey()
                | "Unkey" >> beam.FlatMap(lambda kv: kv[1]))


# A Parquet input is split into read tasks by row groups, so one huge file is
# read by many workers at once. Block numbers derive from the row-group index
# (not from the task), so they do not depend on how groups are dealt to tasks.
BLOCKS_PER_ROW_GROUP = 1000


def plan_parquet(f: InputFile, budget_bytes: int) -> list[BlockTask]:
    """Read tasks of one Parquet file: runs of whole row groups of about `budget_bytes`.

    For these tasks `start`/`end` are row-group indices. A file whose footer
    cannot be read gets one task over everything, whose read then fails into
    an error row with the reason.
    """
    import pyarrow.parquet as pq

    try:
        with fs.open_binary(f.uri) as handle:
            md = pq.ParquetFile(handle).metadata
    except Exception:
        return [BlockTask(f.uri, "parquet", "", 0, 1, 0, f.size)]
    tasks, first, acc = [], 0, 0
    for g in range(md.num_row_groups):
        acc += md.row_group(g).total_byte_size
        if acc >= budget_bytes or g == md.num_row_groups - 1:
            tasks.append(BlockTask(f.uri, "parquet", "", first, g + 1, first * BLOCKS_PER_ROW_GROUP, f.size))
            first, acc = g + 1, 0
    return tasks or [BlockTask(f.uri, "parquet", "", 0, 0, 0, f.size)]


def parquet_row_groups(pf, task: BlockTask) -> Iterator[tuple[int, int]]:
    """(row-group index, index of its first row in the file) for the groups of a task."""
    md = pf.metadata
    row = sum(md.row_group(g).num_rows for g in range(task.start))
    for g in range(task.start, min(task.end, md.num_row_groups)):
        yield g, row
        row += md.row_group(g).num_rows
