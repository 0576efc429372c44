"""The `tokenmill` command: parses the subcommand and hands over to its module."""
from __future__ import annotations

import sys
from typing import Sequence

COMMANDS = {
    "build": ("tokenmill.pipelines.build:run", "tokenize raw shards into a Parquet token dataset"),
    "compare": ("tokenmill.pipelines.compare:run", "run several tokenizers over the same sample, side by side in HTML"),
    "decode": ("tokenmill.pipelines.commands:decode", "turn an image row's tokens back into an image"),
    "files": ("tokenmill.pipelines.commands:files", "list the current version's shards (pyarrow, Polars, DuckDB)"),
    "fit": ("tokenmill.pipelines.fit:run", "fit a vq codebook or a pca bottleneck on your images"),
    "gc": ("tokenmill.pipelines.commands:gc", "remove old versions and unreferenced files of a dataset"),
    "retokenize": ("tokenmill.pipelines.retokenize:run", "build a new version of a dataset with another tokenizer"),
    "inspect": ("tokenmill.pipelines.commands:inspect", "show a dataset's schema, counts and sample rows, tokens marked"),
    "report": ("tokenmill.pipelines.commands:report", "write an HTML report with plots on what the tokens are"),
    "schema": ("tokenmill.pipelines.commands:schema", "print a dataset schema definition (JSON or Arrow)"),
    "serve-workers": ("tokenmill.pipelines.workers:serve_workers",
                      "serve SDK workers with tokenmill for a portable runner's EXTERNAL environment"),
    "validate": ("tokenmill.pipelines.commands:validate", "check a dataset against its manifest and schema"),
}

# Commands that run a build, on this machine unless --runner says otherwise: Beam is imported lean for them
# (pipelines/beam_seam.py).
LOCAL_BUILDS = ("build", "retokenize")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--verbose" in argv:  # every command: tracebacks and worker logs too (workers inherit the variable)
        import os

        argv = [a for a in argv if a != "--verbose"]
        os.environ["TOKENMILL_VERBOSE"] = "1"
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: tokenmill COMMAND [options]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:13s} {text}")
        print("\n'tokenmill COMMAND --help' documents each command; --verbose with any command shows "
              "tracebacks and worker logs beside its one-line errors.")
        sys.exit(0 if argv else 2)
    if argv[0] in ("--version", "-V"):
        from tokenmill.schemas.manifest import tokenmill_version

        print(f"tokenmill {tokenmill_version()}")
        sys.exit(0)
    if argv[0] not in COMMANDS:
        print(f"tokenmill: error: unknown command {argv[0]!r} (commands: {', '.join(COMMANDS)})",
              file=sys.stderr)
        sys.exit(2)
    import importlib

    if argv[0] in LOCAL_BUILDS:
        from tokenmill.pipelines.beam_seam import lean_import

        lean_import(argv[1:])
    from tokenmill.schemas.manifest import MultiDatasetRoot

    module, _, func = COMMANDS[argv[0]][0].partition(":")
    try:
        code = getattr(importlib.import_module(module), func)(argv[1:])
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        code = 0
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except MultiDatasetRoot as e:  # a dataset command pointed at the root of several: misuse
        print(f"tokenmill {argv[0]}: error: {e}; pass one of them", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"tokenmill {argv[0]}: interrupted", file=sys.stderr)
        code = 130
    except Exception as e:  # a failure: one line naming the cause, the traceback only with --verbose
        from tokenmill.pipelines.cli_errors import failure_line, verbose

        if verbose():
            import traceback

            traceback.print_exc()
        print(f"tokenmill {argv[0]}: failed: {failure_line(e)}", file=sys.stderr)
        code = 1
    leave(code or 0)


def leave(code: int) -> None:
    """Exit with `code`, skipping the C-level teardown of the interpreter.

    Why: a process that read Parquet through a Python file object (fsspec) can
    abort at exit ("terminate called without an active exception", exit 134)
    while pyarrow's I/O threads are torn down: seen in about 1 run in 2 of a
    bare read-then-exit script here, and in `tokenmill decode`. The command's
    work is done and flushed by then; atexit handlers still run. It also
    saves the teardown's time: about 0.7 s of CPU after `import apache_beam`
    alone, on this project's VM (docs/benchmarks.md, fixed cost).
    """
    import atexit
    import os

    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # closed (BrokenPipeError above)
                pass
        os._exit(code)


if __name__ == "__main__":
    main()
