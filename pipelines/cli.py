"""The `tokenmill` command: parses the subcommand and hands over to its module."""
from __future__ import annotations

import sys
from typing import Sequence

COMMANDS = {
    "build": ("pipelines.build", "tokenize raw shards into a Parquet token dataset"),
}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: tokenmill COMMAND [options]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:10s} {text}")
        print("\n'tokenmill COMMAND --help' documents each command.")
        sys.exit(0 if argv else 2)
    if argv[0] not in COMMANDS:
        print(f"tokenmill: error: unknown command {argv[0]!r} (commands: {', '.join(COMMANDS)})",
              file=sys.stderr)
        sys.exit(2)
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    sys.exit(module.run(argv[1:]))


if __name__ == "__main__":
    main()
