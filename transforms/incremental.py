"""Incremental runs: which inputs a run must tokenize, and which shards it carries over.

Every build lists its inputs inside the pipeline (so a launcher reads no data),
compares them with the dataset's current commit, and plans the run:

* an input whose URI and change token (mtime, ETag, checksum) match the
  current commit of the same version is *unchanged*: its rows are carried over
  by referencing the shards that hold them, without reading or tokenizing it;
* new and changed inputs are *to do*: they are read and tokenized into the
  run's own folder;
* a shard that also holds rows of removed or changed inputs (loose image files
  are grouped into blocks) is rewritten without them, which copies rows and
  tokenizes nothing.

A changed tokenizer or options give another version, which starts empty.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

from tokenmill.schemas.manifest import Manifest
from tokenmill.schemas.versions import read_current, version_dir
from tokenmill.transforms.records import InputFile
from tokenmill.transforms.sources.common import list_files


@dataclasses.dataclass(frozen=True)
class Incremental:
    """Where a build commits and what it builds: the dataset root and the version id."""

    root: str
    version: str
    rebuild: bool = False  # True: tokenize every input again (--overwrite)


@dataclasses.dataclass
class RunPlan:
    version: str
    base_commit: str  # the commit this run builds on; "" for an empty output
    run_dir: str  # where the run writes new shards, relative to the root ("" outside a build)
    todo: list[InputFile]
    keep: list[dict[str, Any]]  # shard entries referenced as they are
    rewrite: list[tuple[dict[str, Any], list[str]]]  # (shard entry, sources whose rows stay)
    unchanged: dict[str, dict[str, Any]]  # uri -> its input entry in the previous commit


def plan_run(previous: Manifest | None, files: list[InputFile], incremental: Incremental | None) -> RunPlan:
    """What this run does, from the current manifest and the listed inputs (a pure function)."""
    if incremental is None:
        return RunPlan("", "", "", list(files), [], [], {})
    base = previous.commit if previous is not None else ""
    same = previous is not None and previous.version == incremental.version and not incremental.rebuild
    before = {i["uri"]: i for i in previous.inputs} if same else {}
    unchanged = {f.uri: before[f.uri] for f in files
                 if f.uri in before and f.change_token and before[f.uri].get("change_token") == f.change_token
                 and before[f.uri].get("size") == f.size}
    todo = [f for f in files if f.uri not in unchanged]
    keep: list[dict[str, Any]] = []
    rewrite: list[tuple[dict[str, Any], list[str]]] = []
    if same:
        for entry in [*previous.shards, *previous.error_shards]:
            sources = entry.get("sources") or [entry.get("source")]
            staying = [s for s in sources if s in unchanged]
            if len(staying) == len(sources):
                keep.append(entry)
            elif staying:
                rewrite.append((entry, staying))
    key = json.dumps([incremental.version, base, incremental.rebuild,
                      [(f.uri, f.size, f.change_token) for f in todo],
                      [(e["path"], s) for e, s in rewrite]])
    run = "run-" + hashlib.sha256(key.encode()).hexdigest()[:12]
    return RunPlan(incremental.version, base, f"{version_dir(incremental.version)}/{run}", todo, keep,
                   rewrite, unchanged)


class _ListAndCompare(beam.DoFn):
    def __init__(self, incremental: Incremental | None):
        self._incremental = incremental
        self._unchanged = Metrics.counter("tokenmill", "inputs_unchanged")
        self._todo = Metrics.counter("tokenmill", "inputs_to_tokenize")

    def process(self, patterns: list[str]) -> Iterator[Any]:
        files = list_files(patterns)
        for f in files:
            yield beam.pvalue.TaggedOutput("files", f)
        previous = read_current(self._incremental.root) if self._incremental else None
        plan = plan_run(previous, files, self._incremental)
        self._unchanged.inc(len(plan.unchanged))
        self._todo.inc(len(plan.todo))
        yield plan


class ListInputs(beam.PTransform):
    """Globs → 'files' (every matched InputFile) and 'plan' (one RunPlan: what to tokenize)."""

    def __init__(self, patterns: list[str], incremental: Incremental | None = None):
        super().__init__()
        self._patterns, self._incremental = list(patterns), incremental

    def expand(self, pbegin):
        listed = (pbegin
                  | "InputGlobs" >> beam.Create([self._patterns])
                  | "ListAndCompare" >> beam.ParDo(_ListAndCompare(self._incremental)).with_outputs(
                      "files", main="plan"))
        return {"files": listed.files, "plan": listed.plan}
