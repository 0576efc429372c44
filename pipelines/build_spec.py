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
(input, tokenizer, modality, text_field, eos, size, ...), so the file and the
command line are validated by the same parser; unknown keys are an error.
Everything runs as one Beam pipeline with a branch per source; each dataset is
versioned and committed on its own, and OUTPUT/_manifest.json then lists them.
The YAML is read with yaml.safe_load: no tags, no objects.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from typing import Any, Sequence

import apache_beam as beam

from pipelines import runners
from pipelines.build import (BuildDataset, _summary, make_parser, prepare_source, recorded_args)
from pipelines.cli_errors import OneLineArgumentParser, UsageError, usage_errors
from schemas.manifest import MANIFEST_NAME, now_iso, tokenmill_version
from schemas.storage import join, read_bytes, write_bytes_atomic
from transforms import fs

TOP_KEYS = {"output", "defaults", "sources"}
NOT_PER_SOURCE = {"output", "overwrite", "config", "help"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def source_keys() -> dict[str, argparse.Action]:
    """The YAML keys a source may use: build's long options, '-' as '_'."""
    return {a.option_strings[-1][2:].replace("-", "_"): a for a in make_parser()._actions
            if a.option_strings and a.dest not in NOT_PER_SOURCE}


def _argv(where: str, options: dict[str, Any]) -> list[str]:
    keys = source_keys()
    unknown = sorted(set(options) - set(keys))
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(keys))})")
    out: list[str] = []
    for key, value in options.items():
        action, flag = keys[key], keys[key].option_strings[-1]
        if action.nargs == 0:  # a switch
            if not isinstance(value, bool):
                raise UsageError(f"{where}: {key} must be true or false, not {value!r}")
            out += [flag] if value else []
            continue
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not isinstance(action, argparse._AppendAction):
            raise UsageError(f"{where}: {key} takes one value, not a list")
        for v in values:
            if isinstance(v, (dict, list)) or v is None:
                raise UsageError(f"{where}: {key} must be a string or number, not {v!r}")
            out += [flag, str(v).lower() if isinstance(v, bool) else str(v)]
    return out


def load_build_spec(text: str, origin: str = "build.yaml") -> tuple[str, list[tuple[str, argparse.Namespace]]]:
    """(output root, [(source name, build arguments)]) from a YAML build spec; raises UsageError."""
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
    out: list[tuple[str, argparse.Namespace]] = []
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
        argv = _argv(where, options) + ["--output", join(output, name)]
        try:
            args, extra = make_parser().parse_known_args(argv)
        except UsageError as e:
            raise UsageError(f"{where}: {e}") from None
        if extra:
            raise UsageError(f"{where}: unexpected {' '.join(extra)}")
        out.append((name, args))
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


def build_config_pipeline(output: str, config_text: str, sources: list[tuple[str, argparse.Namespace]],
                          metas: dict[str, dict[str, Any]], options, pipeline: beam.Pipeline | None = None):
    """The un-run Beam graph: a BuildDataset branch per source, then the root manifest."""
    p = pipeline or beam.Pipeline(runner=runners.make_runner(options), options=options)
    outcomes = [p | f"Build {name}" >> BuildDataset(args, metas[name], recorded_args(args))
                | f"Name {name}" >> beam.Map(_named, name) for name, args in sources]
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
        beam_args, runner = runners.local_defaults(beam_args)
        options = runners.pipeline_options(beam_args)
        runners.one_blas_thread_per_worker(options)
        local = runners.runs_locally(options)
        metas = {}
        for name, source in sources:
            source.output = join(output, name)
            source.overwrite = source.overwrite or args.overwrite
            try:
                metas[name] = prepare_source(source, local=local)[0]
            except UsageError as e:
                raise UsageError(f"source {name!r}: {e}") from None
        pipeline = build_config_pipeline(output, text, sources, metas, options)
    print(f"tokenmill build: runner {runner}, {len(sources)} sources", file=sys.stderr)
    start = time.perf_counter()
    result = runners.execute(pipeline, "tokenmill build")
    if isinstance(result, int):
        return result
    seconds = time.perf_counter() - start
    counters = runners.counters(result)
    for name, source in sources:
        own = runners.counters(result, f"Build {name}")
        print(f"[{name}] " + _summary(source.output, seconds, runner, own).replace("\n", f"\n[{name}] "))
    if counters:
        print("counters: " + ", ".join(f"{k}={v}" for k, v in sorted(counters.items())))
    print(f"tokenmill build: {len(sources)} datasets under {output} (root manifest {MANIFEST_NAME})")
    return 0
