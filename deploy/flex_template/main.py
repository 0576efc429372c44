"""Entry point of the tokenmill Dataflow Flex Template.

The template launcher calls `python main.py --config=gs://.../build.yaml
[--overwrite=true] <Dataflow options>`; this hands over to `tokenmill build`,
so a scheduled template run is an incremental build of the spec: only inputs
that are new or changed since the last commit are tokenized. Locally the same
file runs with any Beam runner: `python deploy/flex_template/main.py
--config build.yaml --runner=FnApiRunner`.
"""
from __future__ import annotations

import sys

TRUE = ("1", "true", "yes")


def to_build_argv(argv: list[str]) -> list[str]:
    """Template parameters arrive as --name=value; boolean parameters become switches."""
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        if name == "--overwrite" and eq:
            out += ["--overwrite"] if value.lower() in TRUE else []
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    from tokenmill.pipelines import build

    return build.run(to_build_argv(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
