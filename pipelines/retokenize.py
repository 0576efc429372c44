"""`tokenmill retokenize DIR --tokenizer SPEC`: a new version of a dataset from its recorded build.

The manifest records the build's spec (`spec`, pipelines/spec.py; manifests
of older tokenmill record `build_args`, read through the same CLI parser).
Retokenizing builds that spec with the options given here replaced, into the
same dataset: a new tokenizer or options make a new version, committed beside
the old one, which readers can still open until `tokenmill gc` removes it.
Inputs are listed again, so files that arrived since the last build are included.
"""
from __future__ import annotations

import sys
from typing import Sequence

from tokenmill.pipelines import build
from tokenmill.pipelines.cli_errors import OneLineArgumentParser, UsageError, usage_errors
from tokenmill.pipelines.spec import BuildSpec, add_options, from_args
from tokenmill.schemas.manifest import Manifest, MultiDatasetRoot, read_manifest


def recorded_spec(manifest: Manifest, root: str) -> BuildSpec:
    """The spec a dataset was built from: its `spec`, else its `build_args` (older manifests)."""
    if manifest.spec:
        return BuildSpec.from_json(manifest.spec, f"{root}: the manifest's spec")
    if not manifest.build_args:
        raise UsageError(f"{root} records no build arguments (built by an older tokenmill); "
                         "run `tokenmill build` with the new tokenizer instead")
    args, extra = build.make_parser().parse_known_args([*manifest.build_args, "--output", root])
    if extra:
        raise UsageError(f"{root}: the manifest's build_args hold unknown options: {' '.join(extra)}")
    spec = from_args(args)
    return spec.resolved(spec.modality) if spec.modality != "auto" else spec


def overrides_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(
        prog="tokenmill retokenize",
        description="Build a new version of a dataset with another tokenizer (or options), from the inputs "
                    "and options its manifest records. Other `tokenmill build` options and Beam options "
                    "may follow and replace the recorded ones.")
    p.add_argument("dir", metavar="DIR", help="dataset directory or URI")
    add_options(p, required=False, suppress=True)
    return p


def run(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with usage_errors("tokenmill retokenize"):
        args, beam_args = overrides_parser().parse_known_args(argv)
        given = {k: v for k, v in vars(args).items() if k != "dir"}
        if "tokenizer" not in given:
            raise UsageError("the following arguments are required: --tokenizer")
        if "output" in given:
            raise UsageError("retokenize writes into DIR: --output is not taken")
        try:
            manifest = read_manifest(args.dir)
        except FileNotFoundError:
            raise UsageError(f"{args.dir}: no _manifest.json (not a tokenmill dataset)") from None
        except MultiDatasetRoot as e:
            raise UsageError(f"{args.dir}: {e}; change the tokenizer in the build spec and run it again") from None
        try:
            spec = recorded_spec(manifest, args.dir).replace({**given, "output": args.dir})
        except ValueError as e:  # SpecError, TokenizerSpecError
            raise UsageError(str(e)) from None
    return build.run_spec(spec, beam_args)


def main() -> None:
    sys.exit(run())
