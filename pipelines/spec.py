"""BuildSpec: what one `tokenmill build` makes, as a frozen typed value.

The command line, a YAML build spec (`--config`) and a recorded manifest all
become a BuildSpec, validated by one option table: the core options below plus
those each modality and tokenizer family declares (transforms/registry.py).
argparse stops at the CLI; the graph, the manifest (`spec`) and `retokenize`
("the recorded spec with these fields replaced") work on the BuildSpec.

Its JSON form, which a scheduler may write directly (docs/user-guide.md,
"The build spec as JSON"):

    {"spec_version": 1,
     "inputs": ["gs://bucket/raw/*.jsonl.zst"], "output": "gs://bucket/ds",
     "modality": "text",                                  # or image, video, auto
     "tokenizer": {"spec": "tiktoken:cl100k_base", "options": {"eos": true}},
     "reader": {"text_field": "text"},                    # the modality's options
     "layout": {"block_size": 8388608, "compression": "auto"},
     "overwrite": false,
     "run": {"progress": "auto"}}

Omitted options take their defaults; unknown keys are an error.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Iterable, Mapping, Sequence

from tokenmill.pipelines.progress import MODES as PROGRESS_MODES
from tokenmill.transforms import registry
from tokenmill.transforms.registry import Option, byte_size
from tokenmill.transforms.sources.text import DEFAULT_BLOCK_BYTES
from tokenmill.transforms.write import DEFAULT_ROW_GROUP_BYTES, DEFAULT_SHARD_BYTES

SPEC_VERSION = 1

# The options that are neither a modality's nor a tokenizer family's, by where they land in the spec.
INPUT = Option("input", "input shard path, glob or URI (repeatable); a folder means all files under it",
               repeat=True, metavar="GLOB")
OUTPUT = Option("output", "dataset directory or URI to write", metavar="DIR")
TOKENIZER = Option("tokenizer", "the tokenizer (see the spec forms below)", metavar="SPEC")
MODALITY = Option("modality", "what the inputs hold; auto: from the file names where they are unambiguous "
                  "(Parquet and tar are not), else from the tokenizer", default="auto",
                  choices=("auto", *registry.MODALITIES))
OVERWRITE = Option("overwrite", "tokenize every input again instead of reusing the rows of unchanged ones (the "
                   "result is a new commit; older versions stay until `tokenmill gc`)", type=None, default=False)
LAYOUT = (
    Option("block_size", "input bytes per work unit and output shard (default: 8MiB)", type=byte_size,
           default=DEFAULT_BLOCK_BYTES, metavar="BYTES"),
    Option("shard_size", "a data shard holds at most this many bytes of rows: a block with more is written as "
           "several shards (default: 256MiB)", type=byte_size, default=DEFAULT_SHARD_BYTES, metavar="BYTES"),
    Option("row_group_size", "bytes of rows per Parquet row group, the unit the training reader shuffles and "
           "splits among workers (default: 16MiB)", type=byte_size, default=DEFAULT_ROW_GROUP_BYTES,
           metavar="BYTES"),
    Option("compression", "Parquet codec of the data shards: auto (default: zstd for token IDs, lz4 for soft "
           "latents, which compress little and are read at training speed), zstd, zstd:LEVEL, lz4, snappy, "
           "gzip, brotli or none", default="auto", metavar="CODEC[:LEVEL]"),
    Option("direct_io", "auto (default): write local data shards of 8MiB or more with O_DIRECT, past the page "
           "cache, where the filesystem allows it; off: always through the page cache", default="auto",
           choices=("auto", "off")),
)
RUN = (
    Option("progress", "live progress on stderr: a bar, periodic log lines, or none (default auto: a bar on a "
           "terminal, else log lines)", default="auto", choices=PROGRESS_MODES),
    Option("progress_every", "seconds between progress log lines (default: 10)", type=float, default=10.0,
           metavar="SECONDS"),
    Option("decode_threads", "decoding in parallel in each worker: threads that decode a block's images, or "
           "videos decoded at once (default: for patch:, the CPU cores per worker on a local runner, else 1; "
           "remote runners run a worker per core)", type=int, metavar="N"),
    Option("max_error_fraction", "fail the build, committing nothing, when more than this fraction of the records "
           "become error rows (default: 0.5; 1 never fails)", type=float, default=0.5, metavar="F"),
)
CORE = (INPUT, OUTPUT, TOKENIZER, MODALITY, OVERWRITE)


class SpecError(ValueError):
    """A build spec that cannot work, with a one-line reason (a usage error)."""


def reader_options() -> list[Option]:
    """Every modality's options, once each (the image and video `size` is one option)."""
    seen: dict[str, Option] = {}
    for name in registry.MODALITIES:
        for o in registry.modality(name).options:
            seen.setdefault(o.name, o)
    return list(seen.values())


def all_options() -> dict[str, Option]:
    """The one option table of the CLI, YAML and JSON: name -> Option."""
    table: dict[str, Option] = {}
    for o in (*CORE, *LAYOUT, *RUN, *reader_options(), *registry.tokenizer_options()):
        table.setdefault(o.name, o)
    return table


def _pairs(values: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(values.items()))


@dataclasses.dataclass(frozen=True)
class TokenizerRef:
    """A tokenizer spec string and the options of its family (sorted (name, value) pairs, hashable)."""

    spec: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def family(self) -> str:
        return self.spec.partition(":")[0]


@dataclasses.dataclass(frozen=True)
class Layout:
    """How rows become files: work-unit size, shard and row-group size, codec, direct I/O."""

    block_size: int = DEFAULT_BLOCK_BYTES
    shard_size: int = DEFAULT_SHARD_BYTES
    row_group_size: int = DEFAULT_ROW_GROUP_BYTES
    compression: str = "auto"
    direct_io: str = "auto"


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How this run behaves; nothing here changes a row or a file name."""

    progress: str = "auto"
    progress_every: float = 10.0
    decode_threads: int | None = None
    max_error_fraction: float = 0.5


@dataclasses.dataclass(frozen=True)
class BuildSpec:
    """One dataset to build. `modality` may be "auto" until `resolved()` (see pipelines/build.prepare)."""

    inputs: tuple[str, ...]
    output: str
    tokenizer: TokenizerRef
    modality: str = "auto"
    reader: tuple[tuple[str, Any], ...] = ()  # the modality's reader options, as (name, value) pairs
    layout: Layout = Layout()
    overwrite: bool = False
    run: RunOptions = RunOptions()

    @property
    def reader_options(self) -> dict[str, Any]:
        return dict(self.reader)

    # -- making one ----------------------------------------------------------
    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> "BuildSpec":
        """From option values by name (parsed CLI arguments, or YAML/JSON keys after Option.parse).

        Options left out take their defaults. Reader and tokenizer options are
        kept as given until `resolved()` knows the modality and fills in the rest.
        """
        table = all_options()
        unknown = sorted(set(values) - set(table))
        if unknown:
            raise SpecError(f"unknown option(s) {', '.join(unknown)}")
        missing = [o.flag for o in (INPUT, OUTPUT, TOKENIZER) if not values.get(o.name)]
        if missing:  # worded as argparse words it on the command line
            raise SpecError(f"the following arguments are required: {', '.join(missing)}")

        def given(options: Iterable[Option]) -> dict[str, Any]:
            return {o.name: values[o.name] for o in options if o.name in values}

        def filled(options: Iterable[Option]) -> dict[str, Any]:
            return {o.name: values.get(o.name, o.default) for o in options}

        inputs = values["input"]
        return cls(inputs=tuple([inputs] if isinstance(inputs, str) else inputs), output=values["output"],
                   tokenizer=TokenizerRef(values["tokenizer"], _pairs(given(registry.tokenizer_options()))),
                   modality=values.get("modality", "auto"), reader=_pairs(given(reader_options())),
                   layout=Layout(**filled(LAYOUT)), overwrite=bool(values.get("overwrite", False)),
                   run=RunOptions(**filled(RUN)))

    def resolved(self, modality: str, inputs: Sequence[str] | None = None, output: str | None = None) -> "BuildSpec":
        """This spec for `modality`: its reader and tokenizer options complete, with their defaults."""
        plugin = registry.modality(modality)
        reader = {o.name: o.default for o in plugin.options}
        reader.update((k, v) for k, v in self.reader if k in reader)
        family = registry.family_of(self.tokenizer.spec)
        options = {o.name: o.default for o in family.options}
        strict = {o.name for o in registry.tokenizer_options() if o.strict}
        # Options of other families are dropped, but a strict one set stays, for load() to refuse.
        options.update((k, v) for k, v in self.tokenizer.options if k in options or k in strict)
        return dataclasses.replace(self, modality=modality, reader=_pairs(reader),
                                   tokenizer=TokenizerRef(self.tokenizer.spec, _pairs(options)),
                                   inputs=tuple(inputs if inputs is not None else self.inputs),
                                   output=output if output is not None else self.output)

    def replace(self, values: Mapping[str, Any]) -> "BuildSpec":
        """This spec with the options in `values` (by option name) replaced: `retokenize`'s rule."""
        flat = self.values()
        if "tokenizer" in values and values["tokenizer"] != self.tokenizer.spec:
            # Another family: the options only the old one takes no longer apply.
            try:
                keep = {o.name for o in registry.family_of(values["tokenizer"]).options}
            except ValueError as e:
                raise SpecError(str(e)) from None
            for o in registry.family_of(self.tokenizer.spec).options:
                if o.name not in keep:
                    flat.pop(o.name, None)
        flat.update(values)
        return BuildSpec.from_values(flat)

    def values(self) -> dict[str, Any]:
        """Option values by name (the inverse of from_values)."""
        return {"input": list(self.inputs), "output": self.output, "tokenizer": self.tokenizer.spec,
                "modality": self.modality, "overwrite": self.overwrite, **dict(self.tokenizer.options),
                **dict(self.reader), **dataclasses.asdict(self.layout), **dataclasses.asdict(self.run)}

    # -- JSON ------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"spec_version": SPEC_VERSION, "inputs": list(self.inputs), "output": self.output,
                "modality": self.modality,
                "tokenizer": {"spec": self.tokenizer.spec, "options": dict(self.tokenizer.options)},
                "reader": dict(self.reader), "layout": dataclasses.asdict(self.layout),
                "overwrite": self.overwrite, "run": dataclasses.asdict(self.run)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "spec") -> "BuildSpec":
        """From the JSON form (see the module docstring); raises SpecError with a one-line reason."""
        if not isinstance(data, Mapping):
            raise SpecError(f"{where}: expected a JSON object")
        if data.get("spec_version", SPEC_VERSION) != SPEC_VERSION:
            raise SpecError(f"{where}: spec_version {data.get('spec_version')} is not supported "
                            f"(this tokenmill reads {SPEC_VERSION})")
        sections = {"tokenizer", "reader", "layout", "run"}
        top = {"spec_version", "inputs", "output", "modality", "overwrite"} | sections
        unknown = sorted(set(data) - top)
        if unknown:
            raise SpecError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(top))})")
        tok = data.get("tokenizer")
        if isinstance(tok, str):
            tok = {"spec": tok}
        if not isinstance(tok, Mapping) or not isinstance(tok.get("spec"), str):
            raise SpecError(f"{where}: tokenizer must be {{\"spec\": \"SPEC\", \"options\": {{...}}}}")
        flat: dict[str, Any] = {"tokenizer": tok["spec"]}
        for key, name in (("inputs", "input"), ("output", "output")):
            if key in data:
                flat[name] = data[key]
        for key in ("modality", "overwrite"):
            if key in data:
                flat[key] = data[key]
        groups = {"reader": {o.name for o in reader_options()}, "layout": {o.name for o in LAYOUT},
                  "run": {o.name for o in RUN}, "tokenizer.options": {o.name for o in registry.tokenizer_options()}}
        for section, allowed in groups.items():
            part = tok.get("options", {}) if section == "tokenizer.options" else data.get(section, {})
            if not isinstance(part, Mapping):
                raise SpecError(f"{where}: {section} must be an object")
            extra = sorted(set(part) - allowed)
            if extra:
                raise SpecError(f"{where}: {section}: unknown key(s) {', '.join(extra)}")
            flat.update(part)
        return from_loose_values(flat, where)

    # -- the CLI form ------------------------------------------------------------
    def to_argv(self) -> list[str]:
        """The spec's options that differ from the defaults, as `tokenmill build` arguments.

        Without --output and --overwrite: this is the manifest's `build_args`, kept
        for tools that read it (the spec itself is recorded as `spec`).
        """
        out: list[str] = []
        values = self.values()
        table = all_options()
        order = [n for n in _BUILD_ARGS_ORDER if n in table] + [n for n in table if n not in _BUILD_ARGS_ORDER]
        for name in order:
            o = table[name]
            if name in ("output", "overwrite"):
                continue
            value = values.get(name, o.default)
            if value == o.default or value is None:
                continue
            if o.type is None:
                out.append(o.flag)
            else:
                for v in value if isinstance(value, list) else [value]:
                    out += [o.flag, str(v)]
        return out


# build_args keeps the flag order of the parser before the option table, so that the
# manifests of a dataset stay comparable across the change; options added later follow.
_BUILD_ARGS_ORDER = (
    "input", "tokenizer", "engine", "text_field", "eos", "bos", "txt_per_line", "block_size", "shard_size",
    "row_group_size", "compression", "direct_io", "max_doc_bytes", "progress", "progress_every", "modality", "size",
    "max_pixels", "image_field", "decode_threads", "fps", "clip_frames", "clip_stride", "max_clips", "start", "end",
    "decode_timeout", "decoder", "temporal_factor", "device", "dtype", "batch_size", "pad_multiple", "vocab_size")


def from_loose_values(values: Mapping[str, Any], where: str) -> BuildSpec:
    """A spec from YAML or JSON values: each checked and converted by its Option, as the CLI does."""
    table = all_options()
    unknown = sorted(set(values) - set(table))
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(table))})")
    try:
        parsed = {k: table[k].parse(v, where) for k, v in values.items()}
        return BuildSpec.from_values(parsed)
    except SpecError as e:
        raise SpecError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
    except ValueError as e:
        raise SpecError(str(e)) from None


def add_options(parser: argparse.ArgumentParser, *, required: bool = True, suppress: bool = False) -> None:
    """Add every build option to `parser`, in groups (the one place the CLI flags come from).

    `suppress`: options not given are absent from the namespace (for overrides).
    """
    def add(group, o: Option, **extra: Any) -> None:
        kwargs: dict[str, Any] = {"help": o.help, "dest": o.name}
        if o.type is None:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=o.type, metavar=o.metavar)
            if o.choices:
                kwargs.update(choices=o.choices)
                kwargs.pop("metavar")
        if o.repeat:
            kwargs["action"] = "append"
        kwargs["default"] = argparse.SUPPRESS if suppress else (o.default if not o.repeat else None)
        group.add_argument(o.flag, **kwargs, **extra)

    for o in CORE:
        add(parser, o, **({"required": True} if required and o in (INPUT, OUTPUT, TOKENIZER) else {}))
    for o in LAYOUT + RUN:
        add(parser, o)
    seen: set[str] = set()
    for name in registry.MODALITIES:
        group = parser.add_argument_group(f"{name} inputs")
        for o in registry.modality(name).options:
            if o.name not in seen:
                seen.add(o.name)
                add(group, o)
    group = parser.add_argument_group("tokenizer options (each applies to the families named)")
    for o in registry.tokenizer_options():
        takers = ", ".join(f.prefix + ("" if f.bare else ":") for f in registry.families()
                           if any(x.name == o.name for x in f.options))
        add(group, dataclasses.replace(o, help=f"[{takers}] {o.help}"))


def from_args(args: argparse.Namespace) -> BuildSpec:
    """The spec of parsed `tokenmill build` arguments (argparse stops here).

    Reader and tokenizer options at their defaults are left out, as if not given:
    argparse cannot tell them apart, and `resolved()` fills them in again.
    """
    table = all_options()
    optional = {o.name for o in (*reader_options(), *registry.tokenizer_options())}
    return BuildSpec.from_values({k: v for k, v in vars(args).items()
                                  if k in table and not (k in optional and v == table[k].default)})


def tokenizer_epilog() -> str:
    return ("Tokenizer specs: " + "; ".join(f"{m}: " + ", ".join(registry.usage(m)) for m in registry.MODALITIES)
            + ". Default runner: Beam's FnApiRunner (local, offline), multi_processing with one worker per CPU core.")
