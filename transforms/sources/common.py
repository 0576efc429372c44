"""What every reader shares: listing inputs, and dealing read tasks out to workers."""
from __future__ import annotations

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
