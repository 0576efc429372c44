"""`tokenmill build`: raw text or image shards → a Parquet token dataset.

    read (ReadTextShards) → decode (DecodeText) → tokenize (TokenizeText)
    → write (WriteTokenShards) → commit (CommitManifest)

with every rejected record routed beside the main path into error shards.
Arguments tokenmill does not know are Beam pipeline options (--runner, ...).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import runners
from pipelines.cli_errors import OneLineArgumentParser, UsageError, usage_errors
from schemas.manifest import DATA_DIR, ERRORS_DIR, MANIFEST_NAME, read_manifest
from schemas.storage import join
from transforms import fs
from transforms.decoders.images import DEFAULT_MAX_PIXELS, DecodeImages, SizePolicy
from transforms.decoders.text import DecodeText
from transforms.sources.images import ReadImageShards
from transforms.sources.text import DEFAULT_BLOCK_BYTES, DEFAULT_MAX_DOC_BYTES, ReadTextShards
from transforms.tokenize import TokenizeImages, TokenizeText
from transforms.tokenizers.base import TokenizerSpecError
from transforms.tokenizers.engines import engine_names
from transforms.tokenizers.spec import (IMAGE_FAMILIES, IMAGE_SPECS, TEXT_SPECS, shared_image_tokenizer,
                                        shared_text_tokenizer)
from transforms.write import CommitManifest, WriteTokenShards, error_to_block, failed_to_block

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
        description="Tokenize text shards (.jsonl, .txt, .parquet; plain, .gz or .zst) or image shards "
                    "(image files, WebDataset tars, Parquet with image bytes), from local paths "
                    "or fsspec URIs, into a Parquet token dataset. Arguments not listed here are "
                    "Apache Beam pipeline options, e.g. --runner, --direct_num_workers.",
        epilog="Tokenizer specs: text: " + ", ".join(TEXT_SPECS) + "; images: " + ", ".join(IMAGE_SPECS)
               + ". Default runner: Beam's FnApiRunner "
               "(local, offline), multi_processing with one worker per CPU core.")
    p.add_argument("--input", action="append", required=True, metavar="GLOB",
                   help="input shard path, glob or URI (repeatable); a folder means all files under it")
    p.add_argument("--output", required=True, metavar="DIR", help="dataset directory or URI to write")
    p.add_argument("--tokenizer", required=True, metavar="SPEC",
                   help="text: tiktoken:cl100k_base | tiktoken:o200k_base | tiktoken:PATH_OR_URI | bytes | "
                        "hf:PATH_OR_URI; images: patch:P | vq:PATH_OR_URI | pca:PATH_OR_URI | "
                        "torchscript:PATH_OR_URI")
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
    p.add_argument("--max-doc-bytes", type=byte_size, default=DEFAULT_MAX_DOC_BYTES, metavar="BYTES",
                   help="whole-file .txt documents larger than this become error rows (default: 64MiB)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --output")
    g = p.add_argument_group("images")
    g.add_argument("--modality", choices=("auto", "text", "image"), default="auto",
                   help="what the inputs hold; auto: from the file names where they are unambiguous "
                        "(Parquet is not), else from the tokenizer (patch:, vq:, pca:, torchscript: are image "
                        "tokenizers)")
    g.add_argument("--size", default="native:1024", metavar="POLICY",
                   help="image size policy: native[:MAX] keeps the size, downscaling so the longer side is at "
                        "most MAX; crop:S center-crops a square and resizes to S; shorter:S resizes the "
                        "shorter side to S (default: native:1024)")
    g.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="images whose header declares more pixels are refused before decoding "
                        f"(decompression bombs; default {DEFAULT_MAX_PIXELS})")
    g.add_argument("--image-field", default="image", metavar="NAME",
                   help="Parquet column with the image bytes (default: image)")
    t = p.add_argument_group("torchscript: encoders")
    t.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    t.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="model input dtype (default: fp32)")
    t.add_argument("--batch-size", type=int, default=8, help="images per model call (default: 8)")
    t.add_argument("--pad-multiple", type=int, default=16,
                   help="pad H and W (edge, bottom/right) to a multiple of this (default: 16)")
    t.add_argument("--vocab-size", type=int, help="codes of a discrete encoder that does not declare them")
    return p


def check_inputs(patterns: Sequence[str]) -> list[str]:
    """Fail fast on globs that match nothing; returns the URIs matched."""
    uris: list[str] = []
    for pattern in patterns:
        try:
            found = fs.match(pattern)
        except Exception as e:
            raise UsageError(f"cannot list input {pattern!r}: {e}") from None
        if not found:
            raise UsageError(f"input {pattern!r} matches no files")
        uris += [f.uri for f in found]
    return uris


def modality_of_files(uris: Sequence[str]) -> str | None:
    """'image' or 'text' when the file names say so unambiguously, else None (Parquet fits both)."""
    from transforms.sources.images import image_kind
    from transforms.sources.text import detect_format

    kinds = set()
    for uri in uris:
        image, text = image_kind(uri), detect_format(uri)
        if image in ("image-files", "tar"):
            kinds.add("image")
        elif text is not None and text[0] != "parquet":
            kinds.add("text")
    return kinds.pop() if len(kinds) == 1 else None


def prepare_output(root: str, overwrite: bool) -> None:
    """Make sure the output is writable and holds no dataset we would silently replace."""
    import fsspec

    try:
        fsys, path = fsspec.core.url_to_fs(root)
        if fsys.exists(join(path, MANIFEST_NAME)) and not overwrite:
            raise UsageError(f"{root} already holds a dataset; pass --overwrite to replace it")
        if fsys.exists(path) and not fsys.isdir(path):
            raise UsageError(f"output {root} exists and is not a directory")
        fsys.makedirs(path, exist_ok=True)
        probe = join(path, ".tokenmill-write-probe")
        fsys.pipe_file(probe, b"")
        fsys.rm(probe)
        # A replaced or crashed build leaves shards behind; remove tokenmill's
        # own files only (part-*.parquet and temp files), never anything else.
        if fsys.exists(join(path, MANIFEST_NAME)):
            fsys.rm(join(path, MANIFEST_NAME))
        for sub in (DATA_DIR, ERRORS_DIR):
            for pattern in ("part-*.parquet", ".part-*.tmp"):
                for stale in fsys.glob(join(path, sub, pattern)):
                    fsys.rm(stale)
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"cannot write to output {root}: {e}") from None


def _read_decode_tokenize(p: beam.Pipeline, args: argparse.Namespace):
    """The modality-specific front of the graph: (read outputs, tokens, decode failures, tokenize failures)."""
    if args.modality == "image":
        read = p | "ReadImageShards" >> ReadImageShards(args.input, image_field=args.image_field)
        decoded, decode_failed = read["blocks"] | "DecodeImages" >> DecodeImages(args.size, args.max_pixels)
        tokens, tokenize_failed = decoded | "TokenizeImages" >> TokenizeImages(args.tokenizer, image_options(args))
    else:
        read = p | "ReadTextShards" >> ReadTextShards(
            args.input, text_field=args.text_field, txt_per_line=args.txt_per_line,
            block_bytes=args.block_size, max_doc_bytes=args.max_doc_bytes)
        decoded, decode_failed = read["blocks"] | "DecodeText" >> DecodeText(args.text_field)
        tokens, tokenize_failed = decoded | "TokenizeText" >> TokenizeText(
            args.tokenizer, bos=args.bos, eos=args.eos, engine=args.engine)
    return read, tokens, decode_failed, tokenize_failed


def build_pipeline(args: argparse.Namespace, options: PipelineOptions, tokenizer_meta: dict[str, Any],
                   pipeline: beam.Pipeline | None = None) -> beam.Pipeline:
    """The un-run Beam graph: read → decode → tokenize → write → commit, errors beside."""
    p = pipeline or beam.Pipeline(runner=runners.make_runner(options), options=options)
    read, tokens, decode_failed, tokenize_failed = _read_decode_tokenize(p, args)

    # The error path gets its own writer: joining it to the main path before
    # writing would keep Beam from fusing tokenize and write into one stage,
    # and every token block would travel through the runner between them.
    rejected = (
        (read["failed"] | "ReadFailuresAsErrors" >> beam.Map(failed_to_block, "read")),
        (decode_failed | "DecodeFailuresAsErrors" >> beam.Map(failed_to_block, "decode")),
        (tokenize_failed | "TokenizeFailuresAsErrors" >> beam.Map(failed_to_block, "tokenize")),
        (read["errors"] | "FileErrorsAsBlocks" >> beam.Map(error_to_block)),
    ) | "JoinRejected" >> beam.Flatten()
    if args.modality == "image":
        options_record = {"image_field": args.image_field, "size_policy": args.size, "max_pixels": args.max_pixels}
    else:
        options_record = {"text_field": args.text_field, "txt_per_line": args.txt_per_line,
                          "block_bytes": args.block_size, "max_doc_bytes": args.max_doc_bytes}
    results = (
        (tokens | "WriteTokenShards" >> WriteTokenShards(args.output)),
        (rejected | "WriteRejectedShards" >> WriteTokenShards(args.output)),
    ) | "JoinShardResults" >> beam.Flatten()
    _ = results | "CommitManifest" >> CommitManifest(
        args.output, read["files"], modality=args.modality, tokenizer=tokenizer_meta, options=options_record)
    return p


def image_options(args: argparse.Namespace) -> tuple[tuple[str, Any], ...]:
    """Options of neural image tokenizers, as a hashable tuple (empty for the others)."""
    if not args.tokenizer.startswith("torchscript:"):
        return ()
    return (("batch_size", args.batch_size), ("device", args.device), ("dtype", args.dtype),
            ("pad_multiple", args.pad_multiple), ("vocab_size", args.vocab_size))


def infer_modality(args: argparse.Namespace, uris: Sequence[str]) -> str:
    """--modality, else the file names where unambiguous, else the tokenizer family.

    A tokenizer of the other modality than the files is a usage error.
    """
    family = args.tokenizer.partition(":")[0]
    by_tokenizer = "image" if family in IMAGE_FAMILIES else "text"
    if args.modality != "auto":
        return args.modality
    by_files = modality_of_files(uris)
    if by_files and by_files != by_tokenizer:
        raise UsageError(f"the inputs are {by_files} files but --tokenizer {args.tokenizer} is a "
                         f"{by_tokenizer} tokenizer (pass --modality to override)")
    return by_files or by_tokenizer


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "k", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.1f} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
        n /= 1000
    return f"{n} {unit}"


def _summary(root: str, seconds: float, runner: str, counters: dict[str, int]) -> str:
    m = read_manifest(root)
    in_bytes = sum(i["size"] for i in m.inputs)
    lines = [
        f"tokenmill build: done in {seconds:.1f} s",
        f"  runner:     {runner}",
        f"  tokenizer:  {m.tokenizer['spec']} ({m.tokenizer['name']}, "
        + (f"vocab {m.tokenizer['vocab_size']}, " if "vocab_size" in m.tokenizer else
           f"dim {m.tokenizer.get('dim')} {m.tokenizer.get('latent_dtype')}, ")
        + (f"engine {m.tokenizer['engine']}, " if "engine" in m.tokenizer else "") + 
        f"{m.token_dtype}, fingerprint {m.tokenizer['fingerprint'][:12]})",
        f"  inputs:     {len(m.inputs)} files, {_human(in_bytes)}",
        f"  rows:       {m.rows}",
        f"  tokens:     {m.tokens}",
        f"  errors:     {m.errors}" + (f"  (rows in {join(root, ERRORS_DIR)}/)" if m.errors else ""),
        f"  throughput: {_human(in_bytes / seconds, 'B/s')}, {_human(m.tokens / seconds, 'tokens/s')}",
        f"  output:     {root}  ({len(m.files)} data shards, manifest {MANIFEST_NAME})",
    ]
    if counters:
        lines.append("  counters:   " + ", ".join(f"{k}={v}" for k, v in sorted(counters.items())))
    return "\n".join(lines)


def make_pipeline(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, beam.Pipeline, str]:
    """Parse and check the command line and build the un-run graph: (args, pipeline, runner description).

    On a remote runner nothing is listed or probed here (see runners.is_local_runner):
    the modality then comes from --modality or the tokenizer. Raises UsageError.
    """
    args, beam_args = make_parser().parse_known_args(argv)
    beam_args, runner = runners.local_defaults(beam_args)
    options = runners.pipeline_options(beam_args)
    runners.one_blas_thread_per_worker(options)
    local = runners.runs_locally(options)
    args.modality = infer_modality(args, check_inputs(args.input) if local else [])
    try:
        if args.modality == "image":
            SizePolicy.parse(args.size)
            tokenizer = shared_image_tokenizer(args.tokenizer, image_options(args))
        else:
            tokenizer = shared_text_tokenizer(args.tokenizer, args.bos, args.eos, args.engine)
    except (TokenizerSpecError, ValueError) as e:
        raise UsageError(str(e)) from None
    args.input = list(args.input)
    args.output = fs.canonical(args.output)
    if local:
        prepare_output(args.output, args.overwrite)
    return args, build_pipeline(args, options, tokenizer.metadata()), runner


def run(argv: Sequence[str] | None = None) -> int:
    """Parse, check, build and run; returns the process exit code."""
    with usage_errors("tokenmill build"):
        args, pipeline, runner = make_pipeline(argv)
    print(f"tokenmill build: runner {runner}", file=sys.stderr)
    start = time.perf_counter()
    result = runners.run_pipeline(pipeline, "tokenmill build")
    if result is None:
        return 1
    if (job := runners.translated_job(result)) is not None:
        print(job.describe())
        return 0
    seconds = time.perf_counter() - start
    print(_summary(args.output, seconds, runner, runners.counters(result)))
    return 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
