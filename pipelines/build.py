"""`tokenmill build`: raw text, image or video shards → a Parquet token dataset.

    read (ReadTextShards) → decode (DecodeText) → tokenize (TokenizeText)
    → write (WriteTokenShards) → commit (CommitManifest)

with every rejected record routed beside the main path into error shards.
Arguments tokenmill does not know are Beam pipeline options (--runner, ...).
"""
from __future__ import annotations

import argparse
import sys
import time
import uuid
from typing import Any, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import runners
from pipelines.cli_errors import OneLineArgumentParser, UsageError, usage_errors
from pipelines.progress import MODES as PROGRESS_MODES, BuildProgress, human
from schemas.manifest import MANIFEST_NAME, read_manifest
from schemas.storage import join
from schemas.tables import SCHEMA_VERSION
from schemas.versions import version_id
from transforms import fs
from transforms.decoders.images import DEFAULT_MAX_PIXELS, DecodeImages, SizePolicy
from transforms.decoders.text import DecodeText
from transforms.decoders.video import DECODERS, DEFAULT_DECODE_TIMEOUT, ClipSpec, DecodeVideos
from transforms.sources.images import ReadImageShards
from transforms.sources.text import DEFAULT_BLOCK_BYTES, DEFAULT_MAX_DOC_BYTES, ReadTextShards
from transforms.sources.videos import ReadVideoShards
from transforms.tokenize import TokenizeImages, TokenizeText, TokenizeVideos
from transforms.tokenizers.base import TokenizerSpecError
from transforms.tokenizers.engines import engine_names
from transforms.tokenizers.spec import (IMAGE_FAMILIES, IMAGE_SPECS, TEXT_SPECS, VIDEO_SPECS, shared_image_tokenizer,
                                        shared_text_tokenizer, shared_video_tokenizer)
from transforms.incremental import Incremental
from transforms.records import InputFile
from transforms.write import (DEFAULT_ROW_GROUP_BYTES, DEFAULT_SHARD_BYTES, CarryOverShards, CommitManifest,
                              ShardLayout, WriteTokenShards, error_to_block, failed_to_block, parse_compression,
                              default_compression)

_SIZE_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
MAX_BYTES = 1 << 30  # keeps a block's token offsets within Arrow's 32-bit list offsets


def byte_size(text: str) -> int:
    """'8MiB', '512k', '1048576' → bytes."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = _SIZE_SUFFIXES.get(t[-1:], 1)
    try:
        value = int(float(t[:-1] if t[-1:] in _SIZE_SUFFIXES else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 8MiB, 512k)") from None
    if not 0 < value <= MAX_BYTES:
        raise argparse.ArgumentTypeError(f"size must be between 1 byte and 1GiB: {text!r}")
    return value


def make_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="tokenmill build",
        description="Tokenize text shards (.jsonl, .txt, .parquet; plain, .gz or .zst), image shards "
                    "(image files, WebDataset tars, Parquet with image bytes) or video shards (video files, "
                    "WebDataset tars), from local paths "
                    "or fsspec URIs, into a Parquet token dataset. Arguments not listed here are "
                    "Apache Beam pipeline options, e.g. --runner, --direct_num_workers.",
        epilog="Tokenizer specs: text: " + ", ".join(TEXT_SPECS) + "; images: " + ", ".join(IMAGE_SPECS)
               + "; videos: " + ", ".join(VIDEO_SPECS) + ". Default runner: Beam's FnApiRunner "
               "(local, offline), multi_processing with one worker per CPU core.")
    p.add_argument("--config", metavar="BUILD.yaml",
                   help="build every source declared in a YAML build spec instead (see README: Build specs); "
                        "then only --overwrite and Beam options may be given beside it")
    p.add_argument("--input", action="append", required=True, metavar="GLOB",
                   help="input shard path, glob or URI (repeatable); a folder means all files under it")
    p.add_argument("--output", required=True, metavar="DIR", help="dataset directory or URI to write")
    p.add_argument("--tokenizer", required=True, metavar="SPEC",
                   help="text: tiktoken:cl100k_base | tiktoken:o200k_base | tiktoken:PATH_OR_URI | bytes | "
                        "hf:PATH_OR_URI; images: patch:P | vq:PATH_OR_URI | pca:PATH_OR_URI | "
                        "torchscript:PATH_OR_URI; videos: patch:T,P | vq: | pca: | torchscript:")
    p.add_argument("--engine", choices=engine_names(), default="tiktoken",
                   help="BPE engine for tiktoken vocabularies: tiktoken (the reference, default) or "
                        "bpe-openai (faster, extra tokenmill[fast]; verified against tiktoken before and "
                        "during the build, which stops on any difference). IDs and fingerprint are the same.")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="JSON field or Parquet column holding the text; dots address nested JSON "
                        "fields (default: text)")
    p.add_argument("--eos", action="store_true", help="append the tokenizer's EOS token to every document")
    p.add_argument("--bos", action="store_true", help="prepend the tokenizer's BOS token to every document")
    p.add_argument("--txt-per-line", action="store_true",
                   help=".txt files hold one document per line (default: one document per file)")
    p.add_argument("--block-size", type=byte_size, default=DEFAULT_BLOCK_BYTES, metavar="BYTES",
                   help="input bytes per work unit and output shard (default: 8MiB)")
    p.add_argument("--shard-size", type=byte_size, default=DEFAULT_SHARD_BYTES, metavar="BYTES",
                   help="a data shard holds at most this many bytes of rows: a block with more is written as "
                        "several shards (default: 256MiB)")
    p.add_argument("--row-group-size", type=byte_size, default=DEFAULT_ROW_GROUP_BYTES, metavar="BYTES",
                   help="bytes of rows per Parquet row group, the unit the training reader shuffles and splits "
                        "among workers (default: 16MiB)")
    p.add_argument("--compression", default="auto", metavar="CODEC[:LEVEL]",
                   help="Parquet codec of the data shards: auto (default: zstd for token IDs, lz4 for soft latents, "
                        "which compress little and are read at training speed), zstd, zstd:LEVEL, lz4, snappy, "
                        "gzip, brotli or none")
    p.add_argument("--direct-io", choices=("auto", "off"), default="auto",
                   help="auto (default): write local data shards of 8MiB or more with O_DIRECT, past the page "
                        "cache, where the filesystem allows it; off: always through the page cache")
    p.add_argument("--max-doc-bytes", type=byte_size, default=DEFAULT_MAX_DOC_BYTES, metavar="BYTES",
                   help="whole-file .txt documents larger than this become error rows (default: 64MiB)")
    p.add_argument("--overwrite", action="store_true",
                   help="tokenize every input again instead of reusing the rows of unchanged ones "
                        "(the result is a new commit; older versions stay until `tokenmill gc`)")
    p.add_argument("--progress", choices=PROGRESS_MODES, default="auto",
                   help="live progress on stderr: a bar, periodic log lines, or none (default auto: a bar on "
                        "a terminal, else log lines)")
    p.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS",
                   help="seconds between progress log lines (default: 10)")
    g = p.add_argument_group("images")
    g.add_argument("--modality", choices=("auto", "text", "image", "video"), default="auto",
                   help="what the inputs hold; auto: from the file names where they are unambiguous "
                        "(Parquet and tar are not), else from the tokenizer (patch:T,P is a video tokenizer; "
                        "patch:P, vq:, pca:, torchscript: are image tokenizers, and serve video files too)")
    g.add_argument("--size", default="native:1024", metavar="POLICY",
                   help="image size policy: native[:MAX] keeps the size, downscaling so the longer side is at "
                        "most MAX; crop:S center-crops a square and resizes to S; shorter:S resizes the "
                        "shorter side to S (default: native:1024)")
    g.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="images whose header declares more pixels are refused before decoding "
                        f"(decompression bombs; default {DEFAULT_MAX_PIXELS})")
    g.add_argument("--image-field", default="image", metavar="NAME",
                   help="Parquet column with the image bytes (default: image)")
    g.add_argument("--decode-threads", type=int, metavar="N",
                   help="decoding in parallel in each worker: threads that decode a block's images, or videos "
                        "decoded at once (default: for patch:, the CPU cores per worker on a local runner, else "
                        "1; remote runners run a worker per core)")
    v = p.add_argument_group("video")
    v.add_argument("--fps", type=float, metavar="F", help="sample clips at F frames per second (default: the "
                   "source frames as they are)")
    v.add_argument("--clip-frames", type=int, default=16, metavar="N", help="frames per clip (default: 16)")
    v.add_argument("--clip-stride", type=int, metavar="N", help="sampled frames between clip starts; less than "
                   "--clip-frames overlaps clips (default: --clip-frames)")
    v.add_argument("--max-clips", type=int, metavar="N", help="clips per video at most (default: all)")
    v.add_argument("--start", type=float, default=0.0, metavar="SECONDS", help="skip the video before this time")
    v.add_argument("--end", type=float, metavar="SECONDS", help="stop at this time (default: the end)")
    v.add_argument("--decode-timeout", type=float, default=DEFAULT_DECODE_TIMEOUT, metavar="SECONDS",
                   help=f"per-video decode time limit; a video over it ends as an error row "
                        f"(default: {DEFAULT_DECODE_TIMEOUT:g})")
    v.add_argument("--decoder", choices=DECODERS, default="decord",
                   help="video decoder; PyAV stands in where decord is missing or fails (default: decord)")
    v.add_argument("--temporal-factor", type=int, default=8, metavar="N",
                   help="torchscript: video encoders: clips are edge-padded to 1 + k x N frames (default: 8)")
    t = p.add_argument_group("torchscript: encoders")
    t.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    t.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="model input dtype (default: fp32)")
    t.add_argument("--batch-size", type=int, default=8, help="images per model call (default: 8)")
    t.add_argument("--pad-multiple", type=int, default=16,
                   help="pad H and W (edge, bottom/right) to a multiple of this (default: 16)")
    t.add_argument("--vocab-size", type=int, help="codes of a discrete encoder that does not declare them")
    return p


def check_inputs(patterns: Sequence[str]) -> list[InputFile]:
    """Fail fast on globs that match nothing; returns every file matched, once, sorted by URI."""
    found: dict[str, InputFile] = {}
    for pattern in patterns:
        try:
            matched = fs.match(pattern)
        except Exception as e:
            raise UsageError(f"cannot list input {pattern!r}: {e}") from None
        if not matched:
            raise UsageError(f"input {pattern!r} matches no files")
        found.update((f.uri, f) for f in matched)
    return [found[uri] for uri in sorted(found)]


def modality_of_files(uris: Sequence[str]) -> str | None:
    """'image', 'video' or 'text' when the file names say so unambiguously, else None (Parquet and tar fit several)."""
    from transforms.sources.images import image_kind
    from transforms.sources.videos import video_kind
    from transforms.sources.text import detect_format

    kinds = set()
    for uri in uris:
        image, text = image_kind(uri), detect_format(uri)
        if image == "image-files":
            kinds.add("image")
        elif video_kind(uri) == "video-file":
            kinds.add("video")
        elif image == "tar":
            continue  # images or videos
        elif text is not None and text[0] != "parquet":
            kinds.add("text")
    return kinds.pop() if len(kinds) == 1 else None


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


def _read_decode_tokenize(p: beam.Pipeline, args: argparse.Namespace, incremental: Incremental):
    """The modality-specific front of the graph: (read outputs, tokens, decode failures, tokenize failures)."""
    # patch: is cheap next to decoding, so decoding gets the worker's cores; vq:,
    # pca: and torchscript: keep them busy with BLAS or torch threads already,
    # and decode threads would only contend with them (measured: vq slower).
    threads = args.decode_threads or (runners.cores_per_worker(getattr(p, "pipeline", p).options)
                                      if args.tokenizer.startswith("patch:") else 1)
    if args.modality == "video":
        read = p | "ReadVideoShards" >> ReadVideoShards(args.input, incremental=incremental)
        decoded, decode_failed = read["blocks"] | "DecodeVideos" >> DecodeVideos(
            clip_spec(args), args.size, decoder=args.decoder, timeout=args.decode_timeout, decoders=threads)
        tokens, tokenize_failed = decoded | "TokenizeVideos" >> TokenizeVideos(
            args.tokenizer, video_options(args), runners.cores_per_worker(getattr(p, "pipeline", p).options))
    elif args.modality == "image":
        read = p | "ReadImageShards" >> ReadImageShards(args.input, image_field=args.image_field,
                                                        incremental=incremental)
        decoded, decode_failed = read["blocks"] | "DecodeImages" >> DecodeImages(args.size, args.max_pixels, threads)
        tokens, tokenize_failed = decoded | "TokenizeImages" >> TokenizeImages(
            args.tokenizer, image_options(args), runners.cores_per_worker(getattr(p, "pipeline", p).options))
    else:
        read = p | "ReadTextShards" >> ReadTextShards(
            args.input, text_field=args.text_field, txt_per_line=args.txt_per_line,
            block_bytes=args.block_size, max_doc_bytes=args.max_doc_bytes, incremental=incremental)
        decoded, decode_failed = read["blocks"] | "DecodeText" >> DecodeText(args.text_field)
        tokens, tokenize_failed = decoded | "TokenizeText" >> TokenizeText(
            args.tokenizer, bos=args.bos, eos=args.eos, engine=args.engine)
    return read, tokens, decode_failed, tokenize_failed


def options_record(args: argparse.Namespace) -> dict[str, Any]:
    """The reader and size options that shape the rows (part of the version id)."""
    if args.modality == "video":
        return {"size_policy": args.size, "decoder": args.decoder, "decode_timeout": args.decode_timeout,
                **clip_spec(args).record()}
    if args.modality == "image":
        return {"image_field": args.image_field, "size_policy": args.size, "max_pixels": args.max_pixels}
    return {"text_field": args.text_field, "txt_per_line": args.txt_per_line, "max_doc_bytes": args.max_doc_bytes}


def dataset_version(args: argparse.Namespace, tokenizer_meta: dict[str, Any]) -> str:
    return version_id(args.modality, tokenizer_meta["fingerprint"], options_record(args), SCHEMA_VERSION)


def to_tokenize(args: argparse.Namespace, tokenizer_meta: dict[str, Any], files: list[InputFile]) -> dict[str, int]:
    """The inputs (URI -> bytes) this run will tokenize, for the progress display.

    The pipeline decides this itself (transforms/incremental.py); the launcher
    repeats the same pure planning on what it listed, to show a true total.
    """
    from schemas.versions import read_current
    from transforms.incremental import plan_run

    try:
        previous = read_current(args.output)
    except ValueError:  # not a dataset tokenmill can build upon; the pipeline will say why
        previous = None
    plan = plan_run(previous, files, Incremental(args.output, dataset_version(args, tokenizer_meta), args.overwrite))
    return {f.uri: f.size for f in plan.todo}


class BuildDataset(beam.PTransform):
    """One dataset: read → decode → tokenize → write, carry over unchanged inputs, commit.

    Rejected records go beside the main path into error shards. Outputs the
    commit's outcome (see CommitManifest).
    """

    def __init__(self, args: argparse.Namespace, tokenizer_meta: dict[str, Any], build_args: list[str]):
        super().__init__()
        self._args, self._meta, self._build_args = args, tokenizer_meta, build_args

    def expand(self, pbegin):
        args, options = self._args, options_record(self._args)
        version = dataset_version(args, self._meta)
        incremental = Incremental(args.output, version, rebuild=args.overwrite)
        read, tokens, decode_failed, tokenize_failed = _read_decode_tokenize(pbegin, args, incremental)
        # The error path gets its own writer: joining it to the main path before
        # writing would keep Beam from fusing tokenize and write into one stage,
        # and every token block would travel through the runner between them.
        rejected = (
            (read["failed"] | "ReadFailuresAsErrors" >> beam.Map(failed_to_block, "read")),
            (decode_failed | "DecodeFailuresAsErrors" >> beam.Map(failed_to_block, "decode")),
            (tokenize_failed | "TokenizeFailuresAsErrors" >> beam.Map(failed_to_block, "tokenize")),
            (read["errors"] | "FileErrorsAsBlocks" >> beam.Map(error_to_block)),
        ) | "JoinRejected" >> beam.Flatten()
        compression = args.compression if args.compression != "auto" else \
            default_compression(self._meta.get("kind", "hard"))
        layout = ShardLayout(args.shard_size, args.row_group_size, compression, args.direct_io == "auto")
        results = (
            (tokens | "WriteTokenShards" >> WriteTokenShards(args.output, read["plan"], layout)),
            (rejected | "WriteRejectedShards" >> WriteTokenShards(args.output, read["plan"], layout)),
            (read["plan"] | "CarryOverUnchanged" >> CarryOverShards(args.output, self._meta["fingerprint"])),
        ) | "JoinShardResults" >> beam.Flatten()
        return results | "CommitManifest" >> CommitManifest(
            args.output, read["files"], read["plan"], modality=args.modality, tokenizer=self._meta,
            options={**options, "block_bytes": args.block_size, "shard_bytes": args.shard_size,
                     "row_group_bytes": args.row_group_size}, build_args=self._build_args,
            started_at=round(time.time(), 3))


def build_pipeline(args: argparse.Namespace, options: PipelineOptions, tokenizer_meta: dict[str, Any],
                   pipeline: beam.Pipeline | None = None, build_args: list[str] | None = None) -> beam.Pipeline:
    """The un-run Beam graph of a one-source build."""
    p = pipeline or beam.Pipeline(runner=runners.make_runner(options), options=options)
    _ = p | "BuildDataset" >> BuildDataset(args, tokenizer_meta, build_args or [])
    return p


def image_options(args: argparse.Namespace) -> tuple[tuple[str, Any], ...]:
    """Options of neural image tokenizers, as a hashable tuple (empty for the others)."""
    if not args.tokenizer.startswith("torchscript:"):
        return ()
    return (("batch_size", args.batch_size), ("device", args.device), ("dtype", args.dtype),
            ("pad_multiple", args.pad_multiple), ("vocab_size", args.vocab_size))


def clip_spec(args: argparse.Namespace) -> ClipSpec:
    """How --fps, --clip-frames, --clip-stride, --max-clips, --start and --end sample clips."""
    return ClipSpec(frames=args.clip_frames, fps=args.fps, stride=args.clip_stride, max_clips=args.max_clips,
                    start=args.start, end=args.end)


def video_options(args: argparse.Namespace) -> tuple[tuple[str, Any], ...]:
    """Options of neural video tokenizers: the image ones and the temporal factor."""
    options = image_options(args)
    return options + (("temporal_factor", args.temporal_factor),) if options else ()


def infer_modality(args: argparse.Namespace, uris: Sequence[str]) -> str:
    """--modality, else the file names where unambiguous, else the tokenizer family.

    A tokenizer of the other modality than the files is a usage error.
    """
    family, _, arg = args.tokenizer.partition(":")
    by_tokenizer = ("video" if family == "patch" and "," in arg else
                    "image" if family in IMAGE_FAMILIES else "text")
    if args.modality != "auto":
        return args.modality
    by_files = modality_of_files(uris)
    if by_files == "video" and by_tokenizer == "image" and family != "patch":
        return "video"  # vq:, pca: and torchscript: tokenize images and clips alike
    if by_files and by_files != by_tokenizer:
        raise UsageError(f"the inputs are {by_files} files but --tokenizer {args.tokenizer} is a "
                         f"{by_tokenizer} tokenizer (pass --modality to override)")
    return by_files or by_tokenizer


def recorded_args(args: argparse.Namespace) -> list[str]:
    """The tokenmill options of this build, as CLI arguments (for `tokenmill retokenize`).

    Everything but --output and --overwrite, and only what differs from the defaults.
    """
    out: list[str] = []
    for action in make_parser()._actions:
        if not action.option_strings or action.dest in ("help", "output", "overwrite", "config"):
            continue
        value = getattr(args, action.dest, None)
        if value == action.default or value is None:
            continue
        flag = action.option_strings[-1]
        if action.nargs == 0:
            out.append(flag)
        else:
            for v in value if isinstance(value, list) else [value]:
                out += [flag, str(v)]
    return out


def _summary(root: str, seconds: float, runner: str, counters: dict[str, int]) -> str:
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
        f"  throughput: {human(in_bytes / seconds, 'B/s')}, {human(m.tokens / seconds, 'tokens/s')}",
        f"  output:     {root}  ({len(m.files)} data shards, manifest {MANIFEST_NAME})",
    ]
    if counters:
        lines.append("  counters:   " + ", ".join(f"{k}={v}" for k, v in sorted(counters.items())))
    return "\n".join(lines)


def prepare_source(args: argparse.Namespace, local: bool = True) -> tuple[dict[str, Any], list[InputFile]]:
    """Check one source's tokenizer (and, on a local runner, its inputs and output) on the launcher.

    Returns the tokenizer's metadata and the files listed; fills in
    args.modality and canonical args.input / args.output. On a remote runner
    nothing is listed or probed here (see runners.is_local_runner): the
    pipeline lists its inputs itself, and the modality comes from --modality or
    the tokenizer. Raises UsageError.
    """
    files = check_inputs(args.input) if local else []
    args.modality = infer_modality(args, [f.uri for f in files])
    try:
        if args.modality == "video":
            SizePolicy.parse(args.size)
            clip_spec(args)
            tokenizer = shared_video_tokenizer(args.tokenizer, video_options(args))
        elif args.modality == "image":
            SizePolicy.parse(args.size)
            tokenizer = shared_image_tokenizer(args.tokenizer, image_options(args))
        else:
            tokenizer = shared_text_tokenizer(args.tokenizer, args.bos, args.eos, args.engine)
    except (TokenizerSpecError, ValueError) as e:
        raise UsageError(str(e)) from None
    args.input = [fs.canonical(i) for i in args.input]
    args.output = fs.canonical(args.output)
    if local:
        prepare_output(args.output)
    return tokenizer.metadata(), files


def make_pipeline(argv: Sequence[str] | None = None
                  ) -> tuple[argparse.Namespace, beam.Pipeline, str, dict[str, int]]:
    """Parse and check the command line and build the un-run graph.

    Returns (args, pipeline, runner description, sizes of the inputs to tokenize,
    for the progress display). Raises UsageError.
    """
    args, beam_args = make_parser().parse_known_args(argv)
    if not args.progress_every > 0:
        raise UsageError(f"--progress-every must be a positive number of seconds, not {args.progress_every}")
    try:
        if args.compression != "auto":
            parse_compression(args.compression)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.decode_threads is not None and args.decode_threads < 1:
        raise UsageError(f"--decode-threads must be 1 or more, not {args.decode_threads}")
    beam_args, runner = runners.local_defaults(beam_args)
    options = runners.pipeline_options(beam_args)
    runners.one_blas_thread_per_worker(options)
    local = runners.runs_locally(options)
    meta, files = prepare_source(args, local)
    args.local = local
    sizes = to_tokenize(args, meta, files) if local else {}
    return args, build_pipeline(args, options, meta, build_args=recorded_args(args)), runner, sizes


def run(argv: Sequence[str] | None = None) -> int:
    """Parse, check, build and run; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        from pipelines.build_spec import run_config

        return run_config(argv)
    with usage_errors("tokenmill build"):
        args, pipeline, runner, sizes = make_pipeline(argv)
    print(f"tokenmill build: runner {runner}", file=sys.stderr)
    start = time.perf_counter()
    # On a remote runner the launcher needs no access to the output; the runner's own UI shows progress.
    progress = BuildProgress(args.output, sizes, mode=args.progress, every=args.progress_every) if args.local else None
    result = runners.execute(pipeline, "tokenmill build", progress)
    if isinstance(result, int):
        return result
    seconds = time.perf_counter() - start
    print(_summary(args.output, seconds, runner, runners.counters(result)))
    return 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
