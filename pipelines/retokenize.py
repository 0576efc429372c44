"""`tokenmill retokenize DIR --tokenizer SPEC`: a new version of a dataset from its recorded sources.

The manifest records the build's own arguments (`build_args`: inputs as globs,
reader and size options, tokenizer). Retokenizing replays them with the options
given here replacing the recorded ones, into the same dataset: a new tokenizer
or options make a new version, committed beside the old one, which readers can
still open until `tokenmill gc` removes it. Inputs are listed again, so files
that arrived since the last build are included.
"""
from __future__ import annotations

import sys
from typing import Sequence

from pipelines import build
from pipelines.cli_errors import OneLineArgumentParser, UsageError, usage_errors
from schemas.manifest import MultiDatasetRoot, read_manifest


def merged_args(recorded: list[str], overrides: list[str]) -> list[str]:
    """`recorded` build arguments with every option that `overrides` sets replaced by its value there."""
    actions = {s: a for a in build.make_parser()._actions for s in a.option_strings}
    given = {actions[a.split("=", 1)[0]].dest for a in overrides if a.split("=", 1)[0] in actions}
    out, i = [], 0
    while i < len(recorded):
        action = actions.get(recorded[i])
        width = 1 if action is not None and action.nargs == 0 else 2
        if action is None or action.dest not in given:
            out += recorded[i:i + width]
        i += width
    return out + overrides


def run(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with usage_errors("tokenmill retokenize"):
        p = OneLineArgumentParser(
            prog="tokenmill retokenize",
            description="Build a new version of a dataset with another tokenizer (or options), from the inputs "
                        "and options its manifest records. Other `tokenmill build` options and Beam options "
                        "may follow and replace the recorded ones.")
        p.add_argument("dir", metavar="DIR", help="dataset directory or URI")
        p.add_argument("--tokenizer", required=True, metavar="SPEC", help="the new tokenizer")
        args, rest = p.parse_known_args(argv)
        try:
            manifest = read_manifest(args.dir)
        except FileNotFoundError:
            raise UsageError(f"{args.dir}: no _manifest.json (not a tokenmill dataset)") from None
        except MultiDatasetRoot as e:
            raise UsageError(f"{args.dir}: {e}; change the tokenizer in the build spec and run it again") from None
        if not manifest.build_args:
            raise UsageError(f"{args.dir} records no build arguments (built by an older tokenmill); "
                             "run `tokenmill build` with the new tokenizer instead")
    ours = {s: a for a in build.make_parser()._actions for s in a.option_strings}
    overrides, beam_args, i = [], [], 0
    while i < len(rest):  # tokenmill options (with their value) replace recorded ones; the rest is Beam's
        flag = rest[i].split("=", 1)[0]
        takes_value = int(flag in ours and ours[flag].nargs != 0 and "=" not in rest[i])
        (overrides if flag in ours else beam_args).extend(rest[i:i + 1 + takes_value])
        i += 1 + takes_value
    return build.run(merged_args(manifest.build_args, ["--tokenizer", args.tokenizer, *overrides])
                     + ["--output", args.dir, *beam_args])


def main() -> None:
    sys.exit(run())
