"""`tokenmill build`: raw text, image or video shards → a Parquet token dataset.

    read → decode → tokenize → write → commit        (BuildDataset, below)

with every rejected record routed beside the main path into error shards. The
modality's plug-in (transforms/modalities/) supplies read, decode and
tokenize; writing and committing are the same for all. Arguments tokenmill
does not know are Apache Beam pipeline options (--runner, ...).
"""
from __future__ import annotations

import sys
import time
import uuid
from typing import Any, Sequence

if __name__ == "__main__":  # `python -m tokenmill.pipelines.build`: Beam imported as lean as `tokenmill build` does
    from tokenmill.pipelines.beam_seam import lean_import

    lean_import(sys.argv[1:])

import apache_beam as beam  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions

from tokenmill.pipelines import beam_seam, runners
from tokenmill.pipelines.cli_errors import OneLineArgumentParser, UsageError, usage_errors
from tokenmill.pipelines.progress import BuildProgress, human
from tokenmill.pipelines.spec import BuildSpec, SpecError, add_options, from_args, tokenizer_epilog
from tokenmill.schemas.card import CARD_NAME, card_state
from tokenmill.schemas.manifest import MANIFEST_NAME, read_manifest
from tokenmill.schemas.storage import join
from tokenmill.schemas.tables import SCHEMA_VERSION
from tokenmill.schemas.versions import version_id
from tokenmill.transforms import fs, registry
from tokenmill.transforms.incremental import Incremental
from tokenmill.transforms.records import InputFile
from tokenmill.transforms.tokenizers.base import TokenizerSpecError
from tokenmill.transforms.write import (CarryOverShards, CommitManifest, ShardLayout, WriteTokenShards,
                                        default_compression, error_to_block, failed_to_block, parse_compression)


def make_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(
        prog="tokenmill build",
        description="Tokenize text shards (.jsonl, .txt, .parquet; plain, .gz or .zst), image shards "
                    "(image files, WebDataset tars, Parquet with image bytes) or video shards (video files, "
                    "WebDataset tars), from local paths or fsspec URIs, into a Parquet token dataset. Arguments "
                    "not listed here are Apache Beam pipeline options, e.g. --runner, --direct_num_workers.",
        epilog=tokenizer_epilog())
    p.add_argument("--config", metavar="BUILD.yaml",
                   help="build every source declared in a YAML build spec instead (see docs/user-guide.md, "
                        "Build specs); then only --overwrite and Beam options may be given beside it")
    add_options(p)
    return p


def check_inputs(patterns: Sequence[str]) -> list[InputFile]:
    """Fail fast on globs that match nothing; returns every file matched, once, sorted by URI.

    The pipeline lists again with the same functions (fs.match_all), so both see the same inputs.
    """
    found: list[InputFile] = []
    for pattern in patterns:
        try:
            matched = fs.match(pattern)
        except Exception as e:
            raise UsageError(f"cannot list input {pattern!r}: {e}") from None
        if not matched:
            raise UsageError(f"input {pattern!r} matches no files")
        found += matched
    return fs.unique(found)


def prepare_output(root: str) -> None:
    """Make sure the output is a writable folder (an existing dataset there is built upon)."""
    import fsspec

    try:
        fsys, path = fsspec.core.url_to_fs(root)
        if fsys.exists(path) and not fsys.isdir(path):
            raise UsageError(f"output {root} exists and is not a directory")
        fsys.makedirs(path, exist_ok=True)
        probe = join(path, f".tokenmill-write-probe-{uuid.uuid4().hex}")  # unique: runs may start at once
        fsys.pipe_file(probe, b"")
        fsys.rm(probe)
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"cannot write to output {root}: {e}") from None


def infer_modality(spec: BuildSpec, uris: Sequence[str]) -> str:
    """--modality, else the file names where unambiguous, else the tokenizer family.

    A tokenizer of the other modality than the files is a usage error.
    """
    if spec.modality != "auto":
        return spec.modality
    family = registry.family_of(spec.tokenizer.spec)
    arg = spec.tokenizer.spec.partition(":")[2]
    implied = family.modality_of(arg) if family.modality_of else None
    by_tokenizer = registry.modality_of_tokenizer(spec.tokenizer.spec)
    by_files = registry.modality_of_files(uris)
    if by_files in family.modalities and implied in (None, by_files):
        return by_files  # vq:, pca: and torchscript: tokenize images and clips alike
    if by_files and by_files != by_tokenizer:
        raise UsageError(f"the inputs are {by_files} files but --tokenizer {spec.tokenizer.spec} is a "
                         f"{by_tokenizer} tokenizer (pass --modality to override)")
    return by_files or by_tokenizer


def prepare(spec: BuildSpec, local: bool = True) -> tuple[BuildSpec, dict[str, Any], list[InputFile]]:
    """Check one build on the launcher: the resolved spec, the tokenizer's metadata and the files listed.

    On a local runner the inputs are listed and the output probed here; on a
    remote one nothing is (see pipelines/local.is_local_runner): the pipeline lists its
    inputs itself, and the modality comes from --modality or the tokenizer.
    Raises UsageError.
    """
    if spec.layout.compression != "auto":
        try:
            parse_compression(spec.layout.compression)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if not spec.run.progress_every > 0:
        raise UsageError(f"--progress-every must be a positive number of seconds, not {spec.run.progress_every}")
    if not 0 <= spec.run.max_error_fraction <= 1:
        raise UsageError(f"--max-error-fraction must be between 0 and 1, not {spec.run.max_error_fraction}")
    if spec.run.decode_threads is not None and spec.run.decode_threads < 1:
        raise UsageError(f"--decode-threads must be 1 or more, not {spec.run.decode_threads}")
    files = check_inputs(spec.inputs) if local else []
    try:
        modality = infer_modality(spec, [f.uri for f in files])
        spec = spec.resolved(modality, [fs.canonical(i) for i in spec.inputs], fs.canonical(spec.output))
        registry.modality(modality).check(spec.reader_options)
        tokenizer = registry.shared_tokenizer(spec.tokenizer.spec, modality, spec.tokenizer.options)
    except (TokenizerSpecError, ValueError) as e:
        raise UsageError(str(e)) from None
    if local:
        prepare_output(spec.output)
    return spec, tokenizer.metadata(), files


def options_record(spec: BuildSpec) -> dict[str, Any]:
    """The reader and size options that shape the rows (part of the version id)."""
    return registry.modality(spec.modality).record(spec.reader_options)


def dataset_version(spec: BuildSpec, tokenizer_meta: dict[str, Any]) -> str:
    return version_id(spec.modality, tokenizer_meta["fingerprint"], options_record(spec), SCHEMA_VERSION)


def to_tokenize(spec: BuildSpec, tokenizer_meta: dict[str, Any], files: list[InputFile]) -> dict[str, int]:
    """The inputs (URI -> bytes) this run will tokenize, for the progress display.

    The pipeline decides this itself (transforms/incremental.py); the launcher
    repeats the same pure planning on what it listed, to show a true total.
    """
    from tokenmill.schemas.versions import read_current
    from tokenmill.transforms.incremental import plan_run

    try:
        previous = read_current(spec.output)
    except ValueError:  # not a dataset tokenmill can build upon; the pipeline will say why
        previous = None
    plan = plan_run(previous, files, Incremental(spec.output, dataset_version(spec, tokenizer_meta), spec.overwrite))
    return {f.uri: f.size for f in plan.todo}


class BuildDataset(beam.PTransform):
    """One dataset: read → decode → tokenize → write, carry over unchanged inputs, commit.

    `spec` is resolved (pipelines/build.prepare). Rejected records go beside the
    main path into error shards. Outputs the commit's outcome (see CommitManifest).
    """

    def __init__(self, spec: BuildSpec, tokenizer_meta: dict[str, Any]):
        super().__init__()
        self._spec, self._meta = spec, tokenizer_meta

    def expand(self, pbegin):
        spec, meta, modality = self._spec, self._meta, registry.modality(self._spec.modality)
        options = getattr(pbegin, "pipeline", pbegin).options
        incremental = Incremental(spec.output, dataset_version(spec, meta), rebuild=spec.overwrite)
        read, decoded, decode_failed = modality.read_and_decode(pbegin, spec, incremental, decode_threads(spec, options))
        tokens, tokenize_failed = modality.tokenize(decoded, spec, runners.cores_per_worker(options))
        # The error path gets its own writer: joining it to the main path before
        # writing would keep Beam from fusing tokenize and write into one stage,
        # and every token block would travel through the runner between them.
        rejected = (
            (read["failed"] | "ReadFailuresAsErrors" >> beam.Map(failed_to_block, "read")),
            (decode_failed | "DecodeFailuresAsErrors" >> beam.Map(failed_to_block, "decode")),
            (tokenize_failed | "TokenizeFailuresAsErrors" >> beam.Map(failed_to_block, "tokenize")),
            (read["errors"] | "FileErrorsAsBlocks" >> beam.Map(error_to_block)),
        ) | "JoinRejected" >> beam.Flatten()
        layout = shard_layout(spec, meta)
        progress = spec.run.progress != "none" and runners.runs_locally(options)  # who reads the records
        results = (
            (tokens | "WriteTokenShards" >> WriteTokenShards(spec.output, read["plan"], layout, progress)),
            (rejected | "WriteRejectedShards" >> WriteTokenShards(spec.output, read["plan"], layout, progress)),
            (read["plan"] | "CarryOverUnchanged" >> CarryOverShards(spec.output, meta["fingerprint"])),
        ) | "JoinShardResults" >> beam.Flatten()
        return results | "CommitManifest" >> CommitManifest(
            spec.output, read["files"], read["plan"], modality=spec.modality, tokenizer=meta,
            options=manifest_options(spec), build_args=spec.to_argv(), spec=recorded_spec(spec),
            started_at=round(time.time(), 3), max_error_fraction=spec.run.max_error_fraction)


def decode_threads(spec: BuildSpec, options: PipelineOptions) -> int:
    """--decode-threads, else the worker's cores for a light tokenizer family (patch:) and 1 for the rest."""
    if spec.run.decode_threads:
        return spec.run.decode_threads
    return runners.cores_per_worker(options) if registry.family_of(spec.tokenizer.spec).light else 1


def shard_layout(spec: BuildSpec, meta: dict[str, Any]) -> ShardLayout:
    layout = spec.layout
    compression = layout.compression if layout.compression != "auto" else default_compression(meta.get("kind", "hard"))
    return ShardLayout(layout.shard_size, layout.row_group_size, compression, layout.direct_io == "auto")


def manifest_options(spec: BuildSpec) -> dict[str, Any]:
    return {**options_record(spec), "block_bytes": spec.layout.block_size, "shard_bytes": spec.layout.shard_size,
            "row_group_bytes": spec.layout.row_group_size}


def recorded_spec(spec: BuildSpec) -> dict[str, Any]:
    """The spec as the manifest records it: what to build again (`retokenize`), not how this run went."""
    import dataclasses

    return dataclasses.replace(spec, overwrite=False).to_json()


def build_pipeline(spec: BuildSpec, options: PipelineOptions, tokenizer_meta: dict[str, Any],
                   pipeline: beam.Pipeline | None = None) -> beam.Pipeline:
    """The un-run Beam graph of a one-source build."""
    p = pipeline or beam.Pipeline(runner=runners.make_runner(options), options=options)
    _ = p | "BuildDataset" >> BuildDataset(spec, tokenizer_meta)
    return p


# The summary's `card:` line for each schemas.card.card_state.
CARD_SUMMARY = {
    "current": f"{CARD_NAME} (`datasets.load_dataset(DIR)` reads this commit)",
    "foreign": f"{CARD_NAME} is yours (no tokenmill marker): left as it is; `tokenmill files DIR` lists this "
               "commit's shards",
    "stale": f"{CARD_NAME} lists another commit's files; the next build or `tokenmill gc` rewrites it",
    "missing": f"no {CARD_NAME}",
}


def _summary(root: str, seconds: float, runner: str, counters: dict[str, int], planned_s: float | None = None) -> str:
    """The closing summary; `planned_s`: the launcher's seconds before the pipeline ran, shown when given."""
    m = read_manifest(root)
    in_bytes = sum(i["size"] for i in m.inputs)
    up_to_date = counters.get("commits_unchanged", 0) > 0 and not counters.get("commits", 0)
    lines = [
        f"tokenmill build: {'up to date' if up_to_date else 'done'} in {seconds:.1f} s",
        f"  runner:     {runner}",
        f"  tokenizer:  {m.tokenizer['spec']} ({m.tokenizer['name']}, "
        + (f"vocab {m.tokenizer['vocab_size']}, " if "vocab_size" in m.tokenizer else
           f"dim {m.tokenizer.get('dim')} {m.tokenizer.get('latent_dtype')}, ")
        + (f"engine {m.tokenizer['engine']}, " if "engine" in m.tokenizer else "") + 
        f"{m.token_dtype}, fingerprint {m.tokenizer['fingerprint'][:12]})",
        f"  inputs:     {len(m.inputs)} files, {human(in_bytes)}"
        + (f"  ({counters.get('inputs_to_tokenize', 0)} tokenized, {counters.get('inputs_unchanged', 0)} "
           "unchanged and carried over)" if "inputs_unchanged" in counters else ""),
        f"  version:    {m.version} commit {m.commit} ({len(m.versions)} version(s) kept)",
        f"  rows:       {m.rows}",
        f"  tokens:     {m.tokens}",
        f"  errors:     {m.errors}" + ("  (error rows: the manifest's error_files)" if m.errors else ""),
        f"  output:     {root}  ({len(m.files)} data shards, manifest {MANIFEST_NAME})",
        f"  card:       {CARD_SUMMARY[card_state(root, m)]}",
    ]
    if planned_s is not None:  # listing and planning happen before "done in": a phase of their own
        lines.insert(2, f"  planning:   {planned_s:.2f} s before the pipeline ran (inputs listed, output probed, "
                        "tokenizer loaded, run planned, graph built)")
    if not up_to_date:  # an up-to-date run tokenized nothing: no rate to speak of
        lines.insert(-2, f"  throughput: {human(in_bytes / seconds, 'B/s')}, {human(m.tokens / seconds, 'tokens/s')}")
    if counters:
        lines.append("  counters:   " + ", ".join(f"{k}={v}" for k, v in sorted(counters.items())))
    return "\n".join(lines)


def make_pipeline(argv: Sequence[str] | None = None
                  ) -> tuple[BuildSpec, beam.Pipeline, str, dict[str, int], bool]:
    """Parse and check the command line and build the un-run graph.

    Returns (resolved spec, pipeline, runner description, sizes of the inputs to
    tokenize for the progress display, whether the runner is local). Raises UsageError.
    """
    args, beam_args = make_parser().parse_known_args(argv)
    try:
        spec = from_args(args)
    except SpecError as e:
        raise UsageError(str(e)) from None
    return plan_build(spec, beam_args)


def plan_build(spec: BuildSpec, beam_args: Sequence[str]) -> tuple[BuildSpec, beam.Pipeline, str, dict[str, int], bool]:
    """make_pipeline for a BuildSpec (what `retokenize` and schedulers use)."""
    beam_seam.install()
    chosen = list(beam_args)
    beam_args, runner = runners.local_defaults(chosen)
    options = runners.pipeline_options(beam_args)
    local = runners.runs_locally(options)
    spec, meta, files = prepare(spec, local)
    sizes = to_tokenize(spec, meta, files) if local else {}
    if local and (small := runners.small_build(beam_args, chosen, sum(sizes.values()))):
        beam_args, runner, options = small
    runners.tune_local(options, allocator=registry.modality(spec.modality).allocator_tuning)
    return spec, build_pipeline(spec, options, meta), runner, sizes, local


def run(argv: Sequence[str] | None = None) -> int:
    """Parse, check, build and run; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        from tokenmill.pipelines.build_spec import run_config

        return run_config(argv)
    start = time.perf_counter()
    with usage_errors("tokenmill build"):
        planned = make_pipeline(argv)
    return execute(*planned, planned_s=time.perf_counter() - start)


def run_spec(spec: BuildSpec, beam_args: Sequence[str] = ()) -> int:
    """Build a BuildSpec with Beam options; returns the process exit code."""
    start = time.perf_counter()
    with usage_errors("tokenmill build"):
        planned = plan_build(spec, beam_args)
    return execute(*planned, planned_s=time.perf_counter() - start)


def execute(spec: BuildSpec, pipeline: beam.Pipeline, runner: str, sizes: dict[str, int], local: bool,
            planned_s: float | None = None) -> int:
    """Run a planned build and print its summary; `planned_s`: how long listing and planning took."""
    print(f"tokenmill build: runner {runner}", file=sys.stderr)
    start = time.perf_counter()
    # On a remote runner the launcher needs no access to the output; the runner's own UI shows progress.
    progress = BuildProgress(spec.output, sizes, mode=spec.run.progress, every=spec.run.progress_every) \
        if local else None
    outcome = runners.execute(pipeline, "tokenmill build", progress)
    if outcome.result is None:
        return outcome.code
    seconds = time.perf_counter() - start
    print(_summary(spec.output, seconds, runner, runners.counters(outcome.result), planned_s))
    return 0


def main() -> None:
    from tokenmill.pipelines.cli import leave

    leave(run())  # as `tokenmill build` does: no interpreter teardown once the build is done


if __name__ == "__main__":
    main()
