"""`tokenmill compare`: several tokenizers over the same sample of documents or images, as one Beam graph.

    read → decode (the build's own transforms) → [sample] → measure with every tokenizer → merge → write

Reading and decoding are the modality plug-in's (transforms/modalities/), so
compare reads every input form a build reads, on the same runners
(pipelines/runners.py). Measuring is reports/compare.py's pure functions in a
DoFn that loads every tokenizer once per worker; the tallies merge by addition
(`MergeTallies`), and one step writes the figures to a staging file in the output
folder. The launcher then writes compare.json and draws index.html from it, or,
when no record could be measured (every one failed or was refused), exits 1 with
the first error and writes neither.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import uuid
from typing import Any, Iterator, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from tokenmill.pipelines import runners
from tokenmill.pipelines.cli_errors import OneLineArgumentParser, UsageError, usage_errors
from tokenmill.pipelines.spec import BuildSpec, TokenizerRef, reader_options
from tokenmill.transforms import fs, registry
from tokenmill.transforms.tokenizers.base import TokenizerSpecError

RESULT_NAME = "compare.json"
PAGE_NAME = "index.html"
SAMPLE_BATCH_BYTES = 1 << 20  # sampled documents are measured in batches of about this many bytes
SAMPLE_BATCH_IMAGES = 16
SAMPLE_BATCH_CLIPS = 4
# The build's reading options that compare takes too (the modality plug-ins declare them).
READER_OPTIONS = ("text_field", "txt_per_line", "max_doc_bytes", "size", "max_pixels", "image_field", "fps",
                  "clip_frames", "clip_stride", "max_clips", "start", "end", "decode_timeout", "decoder")
MODALITIES = ("text", "image", "video")


@dataclasses.dataclass(frozen=True)
class ComparePlan:
    """One compare, checked: a BuildSpec for reading (its tokenizer is the first spec), every spec, the sample."""

    spec: BuildSpec  # resolved: modality, inputs and output (the --out folder) canonical
    specs: tuple[str, ...]
    sample: int | None
    show: int
    local: bool
    runner: str  # how the runner is described to the user
    # The workers write the merged figures to this file in the output folder; the launcher reads it, removes
    # it, and writes compare.json and index.html only when something was measured.
    staging: str = dataclasses.field(default_factory=lambda: f".compare-{uuid.uuid4().hex}.json")


def make_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(
        prog="tokenmill compare",
        description="Run several text tokenizers (or several image, or video, tokenizers) over the same "
                    "deterministic sample of your inputs and write a self-contained HTML page and compare.json: "
                    "tokens per character and per byte (overall, per source, per script), long tokens, the "
                    "spelling-risk list, the same text drawn token by token, vocabulary usage; for images, tokens "
                    "and bytes per image and reconstruction PSNR and SSIM; for video, the same per clip, tokens "
                    "per second, and contact sheets of the frames. Exits 1 when no record could be measured. "
                    "Arguments not listed here are Beam pipeline options.")
    p.add_argument("--input", action="append", required=True, metavar="GLOB",
                   help="input shard path, glob or URI (repeatable), as for tokenmill build")
    p.add_argument("--tokenizer", action="append", required=True, metavar="SPEC",
                   help="a tokenizer to compare (repeat it: two or more); all of one modality")
    p.add_argument("--out", required=True, metavar="DIR", help="folder (or URI) to write index.html and compare.json")
    p.add_argument("--sample", type=int, metavar="N",
                   help="measure N documents (or images, or clips), chosen by a hash of where each comes from: "
                        "the same N on every run and runner (default: all)")
    p.add_argument("--show", type=int, default=6, metavar="N",
                   help="text: documents drawn token by token, one per script first (default: 6)")
    p.add_argument("--modality", choices=("auto", *MODALITIES), default="auto",
                   help="what the inputs hold (default: from the file names, else the tokenizers)")
    group = p.add_argument_group("reading the inputs (as tokenmill build)")
    for o in reader_options():
        if o.name not in READER_OPTIONS:
            continue
        kwargs: dict[str, Any] = {"dest": o.name, "help": o.help, "default": o.default}
        if o.type is None:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=o.type, metavar=o.metavar)
        group.add_argument(o.flag, **kwargs)
    return p


def plan(argv: Sequence[str]) -> tuple[ComparePlan, PipelineOptions]:
    """Parse and check a compare command line: the plan and the Beam options. Raises UsageError."""
    from tokenmill.pipelines.build import check_inputs, infer_modality

    args, beam_args = make_parser().parse_known_args(list(argv))
    specs = list(dict.fromkeys(args.tokenizer))
    if len(specs) < 2:
        raise UsageError("compare needs two or more different --tokenizer specs")
    if args.sample is not None and args.sample < 1:
        raise UsageError(f"--sample must be 1 or more, not {args.sample}")
    if args.show < 0:
        raise UsageError(f"--show must be 0 or more, not {args.show}")
    reader = {k: getattr(args, k) for k in READER_OPTIONS if hasattr(args, k)}
    beam_args, runner = runners.local_defaults(beam_args)
    options = runners.pipeline_options(beam_args)
    local = runners.runs_locally(options)
    files = check_inputs(args.input) if local else []
    try:
        base = BuildSpec(inputs=tuple(args.input), output=args.out, tokenizer=TokenizerRef(specs[0]),
                         modality=args.modality, reader=tuple(sorted(reader.items())))
        modality = infer_modality(base, [f.uri for f in files])
        if modality not in MODALITIES:
            raise UsageError(f"compare measures text, image or video tokenizers; {specs[0]} is a {modality} "
                             "tokenizer")
        spec = base.resolved(modality, [fs.canonical(i) for i in args.input], fs.canonical(args.out))
        registry.modality(modality).check(spec.reader_options)
        for s in specs:  # each must load, for this modality: a usage error now, not a failed job later
            registry.shared_tokenizer(s, modality, ())
    except (TokenizerSpecError, ValueError) as e:
        raise UsageError(str(e)) from None
    return ComparePlan(spec, tuple(specs), args.sample, args.show, local, runner), options


# -- the graph ------------------------------------------------------------------------------------------


def _tokenizers(specs: Sequence[str], modality: str) -> dict[str, Any]:
    return {s: registry.shared_tokenizer(s, modality, ()) for s in specs}


class _MeasureBatches(beam.DoFn):
    """Measures each batch with every tokenizer (loaded once per worker): one tally per batch."""

    def __init__(self, specs: Sequence[str], modality: str, show: int):
        self._specs, self._modality, self._show = tuple(specs), modality, show

    def setup(self) -> None:
        self._toks = _tokenizers(self._specs, self._modality)

    def process(self, batch: Any) -> Iterator[Any]:
        from tokenmill.reports import compare

        if self._modality == "text":
            tally = compare.measure_texts(self._toks, batch["sources"], batch["locators"], batch["texts"],
                                         self._show)
        else:
            tally = compare.measure_images(self._toks, batch["sources"], batch["locators"], batch["images"],
                                           batch.get("infos"))
        tally.errors.add(batch.get("errors", []))
        yield tally


def _empty_tally(specs: Sequence[str], modality: str, show: int):
    from tokenmill.reports.compare import ImageTally, TextTally

    return TextTally(tuple(specs), show=show) if modality == "text" else ImageTally(tuple(specs), modality=modality)


class MergeTallies(beam.CombineFn):
    """Tallies added up: the figures of every batch, in any order."""

    def __init__(self, specs: Sequence[str], modality: str, show: int):
        self._specs, self._modality, self._show = tuple(specs), modality, show

    def create_accumulator(self):
        return _empty_tally(self._specs, self._modality, self._show)

    def add_input(self, acc, tally):
        return acc.merge(tally)

    def merge_accumulators(self, accs):
        accs = iter(accs)
        out = next(accs)
        for a in accs:
            out = out.merge(a)
        return out

    def extract_output(self, acc):
        return acc


def _batch_of(block: Any, modality: str) -> dict[str, Any]:
    """A decoded block as a batch to measure: its records, and the errors it carries."""
    if modality == "text":
        return {"sources": [block.source] * len(block.texts), "locators": block.locators, "texts": block.texts,
                "errors": block.errors}
    if modality == "video":  # clips are measured as images are, with their timing
        return {"sources": block.sources, "locators": block.locators, "images": block.clips, "infos": block.infos,
                "errors": block.errors}
    return {"sources": block.sources, "locators": block.locators, "images": block.images, "errors": block.errors}


def _payloads(batch: dict[str, Any], modality: str) -> list[Any]:
    """A batch's records without their place: texts, images, or (clip, timing) pairs."""
    if modality == "video":
        return list(zip(batch["images"], batch["infos"], strict=True))
    return batch["texts" if modality == "text" else "images"]


def _batch_from(records: list[tuple], modality: str) -> dict[str, Any]:
    """(key, source, locator, payload) records as one batch to measure."""
    batch = {"sources": [r[1] for r in records], "locators": [r[2] for r in records]}
    if modality == "video":
        batch.update(images=[r[3][0] for r in records], infos=[r[3][1] for r in records])
    else:
        batch["texts" if modality == "text" else "images"] = [r[3] for r in records]
    return batch


def _keyed_records(block: Any, modality: str, n: int) -> Iterator[tuple]:
    """The block's `n` records with the smallest sample keys, as (key, source, locator, payload)."""
    from tokenmill.reports.compare import sample_key

    batch = _batch_of(block, modality)
    payloads = _payloads(batch, modality)
    places = zip(batch["sources"], batch["locators"], strict=True)
    keyed = sorted((sample_key(s, loc), i) for i, (s, loc) in enumerate(places))
    for key, i in keyed[:n]:
        yield key, batch["sources"][i], batch["locators"][i], payloads[i]


def _rebatch(records: list[tuple], modality: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """The sampled records in key order, cut into batches to measure in parallel: (batch number, batch)."""
    out: list[tuple] = []
    size, number = 0, 0
    limit = {"text": SAMPLE_BATCH_BYTES, "image": SAMPLE_BATCH_IMAGES, "video": SAMPLE_BATCH_CLIPS}[modality]
    for rec in records:
        out.append(rec)
        size += len(rec[3]) if modality == "text" else 1
        if size >= limit:
            yield number, _batch_from(out, modality)
            out, size, number = [], 0, number + 1
    if out:
        yield number, _batch_from(out, modality)


def _first(record: tuple) -> int:
    return record[0]


class SampleRecords(beam.PTransform):
    """Decoded blocks → batches of the `n` records with the smallest sample keys (a hash of source and
    locator), so the sample is the same on every run and runner; errors pass on in their own batches."""

    def __init__(self, modality: str, n: int):
        super().__init__()
        self._modality, self._n = modality, n

    def expand(self, blocks):
        modality, n = self._modality, self._n
        errors = (blocks | "KeepBlockErrors" >> beam.Filter(lambda b: bool(b.errors))
                  | "ErrorsAsBatches" >> beam.Map(lambda b: {"sources": [], "locators": [], "texts": [], "images": [],
                                                             "errors": b.errors}))
        sampled = (blocks
                   | "SmallestKeysOfEachBlock" >> beam.FlatMap(_keyed_records, modality, n)
                   | "SmallestKeysOverall" >> beam.combiners.Top.Smallest(n, key=_first)
                   | "CutIntoBatches" >> beam.FlatMap(_rebatch, modality)
                   | "GroupByBatch" >> beam.GroupByKey()
                   | "Batches" >> beam.FlatMap(lambda kv: kv[1]))
        return (sampled, errors) | "JoinSampleAndErrors" >> beam.Flatten()


def _failed_batch(failed: Any, stage: str) -> dict[str, Any]:
    from tokenmill.transforms.write import failed_to_block

    return {"sources": [], "locators": [], "texts": [], "images": [], "errors": failed_to_block(failed, stage).errors}


def _file_errors_batch(errors: Any) -> dict[str, Any]:
    from tokenmill.transforms.write import error_to_block

    return {"sources": [], "locators": [], "texts": [], "images": [], "errors": error_to_block(errors).errors}


class _WriteComparison(beam.DoFn):
    """The merged tally → the run's staging file in the output folder (on the worker: the output may be object
    storage); the launcher turns it into compare.json and index.html, or into a failure."""

    def __init__(self, specs: Sequence[str], modality: str, out: str, show: int, inputs: Sequence[str],
                 sample: int | None, name: str = RESULT_NAME):
        self._specs, self._modality, self._out, self._show = tuple(specs), modality, out, show
        self._inputs, self._sample, self._name = list(inputs), sample, name

    def process(self, tally: Any) -> Iterator[str]:
        from tokenmill.reports import compare
        from tokenmill.schemas.storage import join, write_bytes_atomic

        toks = _tokenizers(self._specs, self._modality)
        result = (compare.summarize_text(tally, toks, show=self._show) if self._modality == "text"
                  else compare.summarize_images(tally, toks))
        result.update({"inputs": self._inputs, "sample": self._sample})
        path = join(self._out, self._name)
        write_bytes_atomic(path, json.dumps(_finite(result), ensure_ascii=False).encode())
        yield path


def _finite(value: Any) -> Any:
    """JSON has no infinity: an infinite PSNR (lossless) is written as the string "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf" if value < 0 else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class CompareTokenizers(beam.PTransform):
    """Inputs → compare.json: the modality's read and decode, the sample, every tokenizer, one merged tally."""

    def __init__(self, spec: BuildSpec, specs: Sequence[str], sample: int | None, show: int, threads: int = 1,
                 result_name: str = RESULT_NAME):
        super().__init__()
        self._spec, self._specs, self._sample, self._show, self._threads = spec, list(specs), sample, show, threads
        self._result_name = result_name

    def expand(self, pbegin):
        spec, modality = self._spec, self._spec.modality
        read, decoded, decode_failed = registry.modality(modality).read_and_decode(pbegin, spec, None, self._threads)
        if self._sample is None:
            batches = decoded | "BlocksAsBatches" >> beam.Map(_batch_of, modality)
        else:
            batches = decoded | "Sample" >> SampleRecords(modality, self._sample)
        rejected = (
            (read["failed"] | "ReadFailuresAsBatches" >> beam.Map(_failed_batch, "read")),
            (decode_failed | "DecodeFailuresAsBatches" >> beam.Map(_failed_batch, "decode")),
            (read["errors"] | "FileErrorsAsBatches" >> beam.Map(_file_errors_batch)),
        ) | "JoinRejected" >> beam.Flatten()
        # A batch that fails to measure is a failure of a tokenizer, not a bad record: the run stops.
        tallies = ((batches, rejected) | "JoinBatches" >> beam.Flatten()
                   | "MeasureWithEveryTokenizer" >> beam.ParDo(_MeasureBatches(self._specs, modality, self._show)))
        return (tallies
                | "MergeTallies" >> beam.CombineGlobally(MergeTallies(self._specs, modality, self._show))
                | "WriteComparison" >> beam.ParDo(_WriteComparison(self._specs, modality, spec.output, self._show,
                                                                   spec.inputs, self._sample, self._result_name)))


def build_pipeline(planned: ComparePlan, options: PipelineOptions) -> beam.Pipeline:
    """The un-run Beam graph of a compare."""
    p = beam.Pipeline(runner=runners.make_runner(options), options=options)
    _ = p | "CompareTokenizers" >> CompareTokenizers(planned.spec, planned.specs, planned.sample, planned.show,
                                                     result_name=planned.staging)
    return p


def take_result(out: str, name: str) -> dict[str, Any]:
    """The figures the workers wrote to OUT/NAME (the run's staging file), which is removed."""
    import fsspec

    from tokenmill.schemas.storage import join, read_bytes, with_retries

    path = join(out, name)
    result = json.loads(read_bytes(path))
    fsys, local = fsspec.core.url_to_fs(path)
    with_retries(lambda: fsys.rm(local), f"removing {path}")
    return result


def measured(result: dict[str, Any]) -> int:
    """How many documents, images or clips the figures cover."""
    return int(result[UNITS[result["kind"]][1]])


# kind -> (one, the result's count of them)
UNITS = {"text": ("document", "documents"), "image": ("image", "images"), "video": ("clip", "clips")}


def nothing_measured(result: dict[str, Any]) -> str:
    """Why a compare measured nothing, in one line: the first error, and the refusals where there were any
    (with a text tokenizer's first)."""
    one, many = UNITS[result["kind"]]
    errors = result["errors"]
    parts = []
    if errors["count"]:
        e = errors["examples"][0]
        parts.append(f"{errors['count']} record(s) failed; the first: {e['source']} {e['locator']}: "
                     f"{e['error_type']}: {e['message']}")
    refused = [t for t in result["tokenizers"] if t.get("refused")]
    if refused:
        first = refused[0].get("first_refusal")
        parts.append(f"every {one} {'left ' if parts else ''}was refused by a tokenizer: "
                     + ", ".join(f"{t['spec']} refused {t['refused']}" for t in refused)
                     + (f" (the first: {first['source']} {first['locator']}: {first['message']})" if first else ""))
    return f"no {one} could be measured: " + "; ".join(parts) if parts else f"the inputs hold no {many}"


def write_page(out: str, result: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """index.html drawn from `result` (written to OUT/compare.json first) or from OUT/compare.json: (its path,
    the result it drew)."""
    from tokenmill.reports.compare_page import compare_html
    from tokenmill.schemas.storage import join, read_bytes, write_bytes_atomic

    if result is None:
        result = json.loads(read_bytes(join(out, RESULT_NAME)))
    else:
        write_bytes_atomic(join(out, RESULT_NAME), json.dumps(result, ensure_ascii=False).encode())
    path = join(out, PAGE_NAME)
    title = f"tokenmill compare: {', '.join(t['spec'] for t in result['tokenizers'])}"
    write_bytes_atomic(path, compare_html(result, title).encode("utf-8"))
    return path, result


def run(argv: Sequence[str] | None = None) -> int:
    """Parse, check, run the graph, draw the page; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with usage_errors("tokenmill compare"):
        planned, options = plan(argv)
        if planned.local:
            from tokenmill.pipelines.build import prepare_output

            prepare_output(planned.spec.output)
    print(f"tokenmill compare: runner {planned.runner}", file=sys.stderr)
    start = time.perf_counter()
    runners.tune_local(options)
    outcome = runners.execute(build_pipeline(planned, options), "tokenmill compare")
    if outcome.result is None:
        return outcome.code
    result = take_result(planned.spec.output, planned.staging)
    if not measured(result):  # a page of nothing teaches nothing: fail as a build that commits nothing does
        print(f"tokenmill compare: error: {nothing_measured(result)}", file=sys.stderr)
        return 1
    path, result = write_page(planned.spec.output, result)
    print(f"tokenmill compare: {_summary(result)} in {time.perf_counter() - start:.1f} s -> {path}")
    return 0


def _summary(result: dict[str, Any]) -> str:
    if result["kind"] == "text":
        figures = ", ".join(f"{t['spec']} {t['tokens_per_char']:.3f}" for t in result["tokenizers"])
        return f"{result['documents']} documents; tokens/char: {figures}"
    one, many = UNITS[result["kind"]]
    figures = ", ".join(f"{t['spec']} {t[f'tokens_per_{one}']:.0f}" for t in result["tokenizers"])
    return f"{result[many]} {many}; tokens/{one}: {figures}"
