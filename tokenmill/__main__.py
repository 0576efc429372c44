"""`python -m tokenmill COMMAND ...`, the same as the `tokenmill` command."""
from tokenmill.pipelines.cli import main

main()
