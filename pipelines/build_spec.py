"""`tokenmill build --config build.yaml`: a whole multimodal build declared in one file.

    output: gs://bucket/datasets/mix        # one root; one dataset per source below it
    defaults:                               # optional: options every source starts from
      block_size: 16MiB
    sources:
      - name: web                           # the dataset folder: OUTPUT/web
        input: ["gs://bucket/raw/web/*.jsonl.zst"]
        tokenizer: tiktoken:cl100k_base
        eos: true
      - name: photos
        input: gs://bucket/raw/photos/
        modality: image
        tokenizer: patch:16
        size: native:512

A source's keys are the long options of `tokenmill build` with '_' for '-'
(input, tokenizer, modality, text_field, eos, size, ...): each source becomes
a BuildSpec through the same option table as the command line (pipelines/spec.py),
and unknown keys are an error.
Everything runs as one Beam pipeline with a branch per source; each dataset is
versioned and committed on its own, and OUTPUT/_manifest.json then lists them.
The YAML is read with yaml.safe_load: no tags, no objects.
"""
from __future__ import annotations

import dataclasses
import re
import sys
import time
from typing import Any, Sequence

import apache_beam as beam

from tokenmill.pipelines import beam_seam, runners
from tokenmill.pipelines.build import BuildDataset, _summary, prepare
from tokenmill.pipelines.cli_errors import OneLineArgumentParser, UsageError, usage_errors
from tokenmill.pipelines.spec import BuildSpec, SpecError, from_loose_values
from tokenmill.schemas.manifest import MANIFEST_NAME, now_iso, tokenmill_version
from tokenmill.schemas.storage import join, read_bytes, write_bytes_atomic
from tokenmill.transforms import fs, registry

TOP_KEYS = {"output", "defaults", "sources"}
NOT_PER_SOURCE = {"output", "overwrite", "config", "help"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def load_build_spec(text: str, origin: str = "build.yaml") -> tuple[str, list[tuple[str, BuildSpec]]]:
    """(output root, [(source name, its BuildSpec)]) from a YAML build spec; raises UsageError."""
    import yaml

    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UsageError(f"{origin}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(spec, dict):
        raise UsageError(f"{origin}: expected a mapping with keys {', '.join(sorted(TOP_KEYS))}")
    unknown = sorted(set(spec) - TOP_KEYS)
    if unknown:
        raise UsageError(f"{origin}: unknown key(s) {', '.join(map(str, unknown))} "
                         f"(allowed: {', '.join(sorted(TOP_KEYS))})")
    output, defaults, sources = spec.get("output"), spec.get("defaults") or {}, spec.get("sources")
    if not isinstance(output, str) or not output:
        raise UsageError(f"{origin}: 'output' must be a path or URI")
    if not isinstance(defaults, dict):
        raise UsageError(f"{origin}: 'defaults' must be a mapping of options")
    if not isinstance(sources, list) or not sources:
        raise UsageError(f"{origin}: 'sources' must be a non-empty list")
    out: list[tuple[str, BuildSpec]] = []
    seen: set[str] = set()
    for i, source in enumerate(sources):
        where = f"{origin}: sources[{i}]"
        if not isinstance(source, dict):
            raise UsageError(f"{where}: expected a mapping")
        name = source.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise UsageError(f"{where}: 'name' must be letters, digits, '_', '.', '-' (it names the dataset folder)")
        if name in seen:
            raise UsageError(f"{where}: the name {name!r} is used twice")
        seen.add(name)
        where = f"{origin}: source {name!r}"
        options = {**defaults, **{k: v for k, v in source.items() if k != "name"}}
        refused = sorted(set(options) & NOT_PER_SOURCE)
        if refused:
            raise UsageError(f"{where}: unknown key(s) {', '.join(refused)} ('output' is the file's, "
                             "'overwrite' a command-line switch)")
        try:
            out.append((name, from_loose_values({**options, "output": join(output, name)}, where)))
        except SpecError as e:
            raise UsageError(str(e)) from None
    return output, out


def _config_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog="tokenmill build --config",
                              description="Build every source of a YAML build spec in one Beam pipeline.")
    p.add_argument("--config", required=True, metavar="BUILD.yaml", help="the build spec (path or URI)")
    p.add_argument("--overwrite", action="store_true", help="tokenize every input of every source again")
    return p


def write_root_manifest(output: str, config_text: str, outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    """OUTPUT/_manifest.json: the datasets of a multi-source build, written after all of them committed.

    Left as it is when it already names the same commits of the same spec.
    """
    import json

    datasets = {o["name"]: {k: v for k, v in o.items() if k not in ("name", "root", "outcome")} | {"path": o["name"]}
                for o in sorted(outcomes, key=lambda o: o["name"])}
    try:
        before = json.loads(read_bytes(join(output, MANIFEST_NAME)))
    except (FileNotFoundError, ValueError):
        before = {}
    if before.get("datasets") == datasets and before.get("config") == config_text:
        return before
    root = {"datasets": datasets, "config": config_text, "created_at": now_iso(),
            "tokenmill_version": tokenmill_version()}
    write_bytes_atomic(join(output, MANIFEST_NAME), (json.dumps(root, indent=2, sort_keys=True) + "\n").encode())
    return root


def _named(outcome: dict[str, Any], name: str) -> dict[str, Any]:
    return {**outcome, "name": name}


def build_config_pipeline(output: str, config_text: str, sources: list[tuple[str, BuildSpec]],
                          metas: dict[str, dict[str, Any]], options, pipeline: beam.Pipeline | None = None):
    """The un-run Beam graph: a BuildDataset branch per (resolved) source, then the root manifest."""
    p = pipeline or beam.Pipeline(runner=runners.make_runner(options), options=options)
    outcomes = [p | f"Build {name}" >> BuildDataset(spec, metas[name])
                | f"Name {name}" >> beam.Map(_named, name) for name, spec in sources]
    _ = (outcomes
         | "JoinDatasets" >> beam.Flatten()
         | "GatherDatasets" >> beam.combiners.ToList()
         | "WriteRootManifest" >> beam.Map(lambda outs: write_root_manifest(output, config_text, outs)))
    return p


def run_config(argv: Sequence[str]) -> int:
    with usage_errors("tokenmill build"):
        args, beam_args = _config_parser().parse_known_args(argv)
        try:
            text = read_bytes(args.config).decode()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read --config {args.config}: {e}") from None
        output, sources = load_build_spec(text, args.config)
        output = fs.canonical(output)
        beam_seam.install()
        beam_args, runner = runners.local_defaults(beam_args)
        options = runners.pipeline_options(beam_args)
        local = runners.runs_locally(options)
        metas, resolved = {}, []
        for name, source in sources:
            source = dataclasses.replace(source, output=join(output, name),
                                         overwrite=source.overwrite or args.overwrite)
            try:
                source, metas[name], _ = prepare(source, local=local)
            except UsageError as e:
                raise UsageError(f"source {name!r}: {e}") from None
            resolved.append((name, source))
        sources = resolved
        runners.tune_local(options, allocator=any(registry.modality(s.modality).allocator_tuning for _, s in sources))
        pipeline = build_config_pipeline(output, text, sources, metas, options)
    print(f"tokenmill build: runner {runner}, {len(sources)} sources", file=sys.stderr)
    start = time.perf_counter()
    outcome = runners.execute(pipeline, "tokenmill build")
    if outcome.result is None:
        return outcome.code
    result = outcome.result
    seconds = time.perf_counter() - start
    counters = runners.counters(result)
    for name, source in sources:
        own = runners.counters(result, f"Build {name}")
        print(f"[{name}] " + _summary(source.output, seconds, runner, own).replace("\n", f"\n[{name}] "))
    if counters:
        print("counters: " + ", ".join(f"{k}={v}" for k, v in sorted(counters.items())))
    print(f"tokenmill build: {len(sources)} datasets under {output} (root manifest {MANIFEST_NAME})")
    return 0
