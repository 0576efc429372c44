"""Reading video shards: video files, and WebDataset-style tar shards of videos.

One task per video, so that the videos of a folder or of a tar spread over
workers; decoding (transforms/decoders/video.py) then streams each video clip by clip.
- Video files (mp4, webm, mkv, mov, avi): one task each.
- Plain (uncompressed) tars: their headers are walked, without reading any
  video bytes, and each video member becomes a task that reads its byte range.
  Members key.mp4 sit beside key.json or key.txt sidecars, kept as the row's
  `meta`. Members whose path is absolute or climbs out of the archive, links,
  later duplicates of a key, and a listing that stops before the end of the
  archive are error rows (transforms/sources/tars.py). Compressed tars cannot
  be read by range and are refused.
"""
from __future__ import annotations

import typing

from typing import Iterator

import apache_beam as beam

from tokenmill.transforms.records import ErrorRecord, InputFile, VideoTask
from tokenmill.transforms.incremental import Incremental, ListInputs, RunPlan
from tokenmill.transforms.sources.common import SpreadOverWorkers
from tokenmill.transforms.sources.tars import index_tar

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi")


def video_kind(uri: str) -> str | None:
    name = uri.rsplit("/", 1)[-1].lower()
    if name.endswith(VIDEO_EXTENSIONS):
        return "video-file"
    if name.endswith(".tar"):
        return "tar"
    if name.endswith((".tar.gz", ".tgz")):
        return "compressed-tar"
    return None


def plan_video_tasks(files: list[InputFile]) -> tuple[list[VideoTask], list[InputFile], list[ErrorRecord]]:
    """(a task per video file, the tars to list, errors for files that cannot be read as video)."""
    tasks, tars, errors = [], [], []
    for f in files:
        kind = video_kind(f.uri)
        if kind is None:
            errors.append(ErrorRecord(f.uri, "file", "read", "UnsupportedFormat",
                                      f"not a video or tar file name ({', '.join(VIDEO_EXTENSIONS)}, .tar)"))
        elif kind == "compressed-tar":
            errors.append(ErrorRecord(f.uri, "file", "read", "CompressedTar",
                                      "videos are read from plain .tar shards by byte range; a compressed "
                                      "tar cannot be; unpack it to .tar"))
        elif f.size == 0:
            errors.append(ErrorRecord(f.uri, "file", "read", "EmptyFile", "zero-byte file"))
        elif kind == "video-file":
            tasks.append(VideoTask(f.uri, size=f.size))
        else:
            tars.append(f)
    return tasks, tars, errors


def list_tar_videos(uri: str) -> Iterator[VideoTask | ErrorRecord]:
    """A task per video member of a plain tar, with its sidecars; errors for unsafe members."""
    samples, errors = index_tar(uri, VIDEO_EXTENSIONS)
    for ordinal, s in enumerate(samples):
        yield VideoTask(uri, s.name, ordinal, s.offset, s.size, s.meta)
    yield from errors


class _PlanVideoTasks(beam.DoFn):
    def process(self, plan: RunPlan):
        tasks, tars, errors = plan_video_tasks(plan.todo)
        for e in errors:
            yield beam.pvalue.TaggedOutput("errors", e)
        for t in tars:
            yield beam.pvalue.TaggedOutput("tars", t.uri)
        yield from tasks


class _ListTarVideos(beam.DoFn):
    def process(self, uri: str):
        errors = []
        for item in list_tar_videos(uri):
            if isinstance(item, ErrorRecord):
                errors.append(item)
            else:
                yield item
        if errors:  # one list per tar: its errors share one error shard
            yield beam.pvalue.TaggedOutput("errors", errors)


class ReadVideoShards(beam.PTransform):
    """Globs → one VideoTask per video (files and tar members), spread over workers.

    Outputs like ReadTextShards: files, blocks (here: VideoTasks), errors, failed.
    """

    def __init__(self, patterns: list[str], incremental: Incremental | None = None):
        super().__init__()
        self._patterns, self._incremental = list(patterns), incremental

    def expand(self, pbegin):
        inputs = pbegin | "ListInputs" >> ListInputs(self._patterns, self._incremental)
        planned = (inputs["plan"]
                   | "PlanReadTasks" >> beam.ParDo(_PlanVideoTasks()).with_outputs("errors", "tars", main="tasks"))
        listed = (planned.tars
                  | "ListTarVideos" >> beam.ParDo(_ListTarVideos())
                  .with_output_types(typing.Any, errors=typing.Any)  # declares the tag beside the dead letters
                  .with_exception_handling(dead_letter_tag="failed")
                  .with_outputs("errors", main="tasks"))
        tasks = ((planned.tasks, listed["tasks"]) | "JoinVideoTasks" >> beam.Flatten()
                 | "SpreadOverWorkers" >> SpreadOverWorkers())
        errors = (planned.errors, listed["errors"]) | "JoinReadErrors" >> beam.Flatten()
        return {"files": inputs["files"], "plan": inputs["plan"], "blocks": tasks, "errors": errors,
                "failed": listed["failed"]}
