"""Commands that are not Beam graphs: thin faces over schemas/ and reports/."""
from __future__ import annotations

import json
import sys
from typing import Sequence

from tokenmill.pipelines.cli_errors import OneLineArgumentParser, UsageError, usage_errors
from tokenmill.schemas.tables import DEFINED, KINDS, LATENT_STORAGE, MODALITIES, dataset_schema, describe


def dataset_parser(prog: str, description: str) -> OneLineArgumentParser:
    """A parser for a command on one dataset, with its DIR argument."""
    p = OneLineArgumentParser(prog=prog, description=description)
    p.add_argument("dir", metavar="DIR", help="dataset directory or URI")
    return p


def schema(argv: Sequence[str] | None = None) -> int:
    """`tokenmill schema`: print a schema definition (JSON for any language, or Arrow)."""
    with usage_errors("tokenmill schema"):
        p = OneLineArgumentParser(prog="tokenmill schema",
                                  description="Print the definition of a token dataset schema.")
        p.add_argument("--modality", choices=MODALITIES, required=True)
        p.add_argument("--kind", choices=KINDS, required=True, help="hard (integer IDs) or soft (vectors)")
        p.add_argument("--format", choices=("json", "arrow"), default="json")
        p.add_argument("--token-dtype", choices=("uint8", "uint16", "uint32", "uint64"),
                       help="hard: the ID type (otherwise shown as a parameter)")
        p.add_argument("--latent-dtype", choices=sorted(LATENT_STORAGE), help="soft: the value type")
        p.add_argument("--dim", type=int, help="soft: values per latent vector")
        args = p.parse_args(argv)
        if (args.modality, args.kind) not in DEFINED:
            raise UsageError(f"no {args.modality}/{args.kind} schema; defined: "
                             + ", ".join(f"{m}/{k}" for m, k in sorted(DEFINED)))
        if args.format == "json":
            print(json.dumps(describe(args.modality, args.kind, token_dtype=args.token_dtype,
                                      latent_dtype=args.latent_dtype, dim=args.dim), indent=2))
        else:
            print(dataset_schema(args.modality, args.kind, token_dtype=args.token_dtype or "uint32",
                                 latent_dtype=args.latent_dtype or "float32", dim=args.dim or 8))
    return 0


def validate(argv: Sequence[str] | None = None) -> int:
    """`tokenmill validate DIR`: exit 0 if the dataset is sound, 1 with one line per problem if not.

    A damaged manifest or a failing store is one such line, never a traceback;
    the storage layer's retry warnings show only with --verbose, as the last line names the failure.
    """
    import logging

    from tokenmill.pipelines.cli_errors import verbose
    from tokenmill.schemas.validate import validate as check

    with usage_errors("tokenmill validate"):
        p = dataset_parser("tokenmill validate", "Check every shard of a dataset against its manifest and schema.")
        args = p.parse_args(argv)
    storage_log = logging.getLogger("tokenmill.schemas.storage")
    level = storage_log.level
    if not verbose():
        storage_log.setLevel(logging.ERROR)
    try:
        problems = check(args.dir)
    finally:
        storage_log.setLevel(level)
    for line in problems:
        print(f"tokenmill validate: {line}", file=sys.stderr)
    if not problems:
        print(f"tokenmill validate: {args.dir}: ok")
    return 1 if problems else 0


def _check_image_out(path: str) -> None:
    """An --out that PIL can write, in a folder that exists: checked before any work (a usage error)."""
    import os

    from PIL import Image

    Image.init()
    ext = os.path.splitext(path)[1].lower()
    if ext not in Image.registered_extensions() or Image.registered_extensions()[ext] not in Image.SAVE:
        known = sorted(e for e, fmt in Image.registered_extensions().items() if fmt in Image.SAVE)
        raise UsageError(f"--out {path}: cannot write {ext or 'a file without an extension'} images "
                         f"(use .png, .jpg or .webp; PIL writes {', '.join(known[:12])}, ...)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"--out {path}: no folder {folder}")


def duckdb_expression(paths: Sequence[str]) -> str:
    """`read_parquet(['a', 'b'])`: SQL string literals, each ' doubled (DuckDB strings have no other escape)."""
    quoted = ", ".join("'" + p.replace("'", "''") + "'" for p in paths)
    return f"read_parquet([{quoted}])"


def files(argv: Sequence[str] | None = None) -> int:
    """`tokenmill files DIR`: the shards of the current commit (or a version's latest), for other readers.

    Several versions, and runs not committed, share `versions/`: a glob of it
    mixes them. These are the files one commit names, joined with DIR.
    """
    from tokenmill.schemas.manifest import MultiDatasetRoot, dataset_path, read_manifest

    with usage_errors("tokenmill files"):
        p = dataset_parser("tokenmill files", "Print the data shards of a dataset's current version (or of "
                                              "--version), to read them with pyarrow, Polars, DuckDB or any "
                                              "Parquet reader: a glob of versions/ mixes versions.")
        p.add_argument("--version", metavar="V", help="a version kept in the dataset's history (default: the "
                                                      "current one)")
        p.add_argument("--format", choices=("list", "json", "duckdb"), default="list",
                       help="list: one path per line (default); json: version, commit, counts, files and "
                            "error_files; duckdb: a read_parquet([...]) expression")
        p.add_argument("--errors", action="store_true",
                       help="the error shards instead of the data shards (json always holds both)")
        args = p.parse_args(argv)
        try:
            manifest = read_manifest(args.dir)
        except FileNotFoundError:
            raise UsageError(f"{args.dir}: no _manifest.json (not a tokenmill dataset)") from None
        except MultiDatasetRoot as e:
            raise UsageError(f"{args.dir}: {e}; run files on each") from None
        if args.version and args.version != manifest.version:
            kept = [e["version"] for e in manifest.versions] or [manifest.version]
            try:
                if args.version not in kept:
                    raise FileNotFoundError(args.version)
                manifest = read_manifest(args.dir, args.version)
            except FileNotFoundError:
                raise UsageError(f"{args.dir} has no version {args.version!r} (kept: {', '.join(kept)})") from None
    data = [dataset_path(args.dir, f) for f in manifest.files]
    errors = [dataset_path(args.dir, f) for f in manifest.error_files]
    chosen = errors if args.errors else data
    if args.format == "json":
        print(json.dumps({"root": args.dir, "version": manifest.version, "commit": manifest.commit,
                          "rows": manifest.rows, "tokens": manifest.tokens, "errors": manifest.errors,
                          "files": data, "error_files": errors}, indent=2, ensure_ascii=False))
    elif args.format == "duckdb":
        if not chosen:  # DuckDB's read_parquet refuses an empty list: say so here instead
            print(f"tokenmill files: {args.dir}: commit {manifest.commit} has no "
                  f"{'error' if args.errors else 'data'} shards", file=sys.stderr)
            return 1
        print(duckdb_expression(chosen))
    else:
        for path in chosen:
            print(path)
    return 0


def decode(argv: Sequence[str] | None = None) -> int:
    """`tokenmill decode DIR --id ID --out FILE.png`: the image (or clip) a row's tokens stand for."""
    from PIL import Image

    from tokenmill.reports.dataset import DatasetView
    from tokenmill.reports.render import contact_sheet
    from tokenmill.transforms.tokenizers.spec import load_image_tokenizer, load_video_tokenizer, recorded_options

    with usage_errors("tokenmill decode"):
        p = dataset_parser("tokenmill decode", "Turn an image row's tokens (patches, vq codes, pca latents) "
                                               "back into an image, or a video row's into a contact sheet of "
                                               "its frames, to see what the tokens keep.")
        p.add_argument("--id", required=True, help="row id")
        p.add_argument("--out", required=True, metavar="FILE", help="image file to write (.png keeps it exact)")
        args = p.parse_args(argv)
        _check_image_out(args.out)
        try:
            view = DatasetView(args.dir)
        except FileNotFoundError:
            raise UsageError(f"{args.dir}: no _manifest.json") from None
        manifest = view.manifest
        if manifest.modality not in ("image", "video"):
            raise UsageError(f"{args.dir} is a {manifest.modality} dataset; decode turns image and video rows "
                             "into pictures")
        try:
            load = load_image_tokenizer if manifest.modality == "image" else load_video_tokenizer
            tok = load(manifest.tokenizer["spec"], **recorded_options(manifest))
        except ValueError as e:
            raise UsageError(str(e)) from None
        if tok.fingerprint() != manifest.tokenizer["fingerprint"]:
            raise UsageError(f"{manifest.tokenizer['spec']} no longer matches the dataset's fingerprint")
    row = view.row(args.id)
    if row is None:
        print(f"tokenmill decode: error: no row with id {args.id}", file=sys.stderr)
        return 2
    try:
        image = view.reconstruction(row, tok)
    except NotImplementedError as e:
        print(f"tokenmill decode: error: {e}", file=sys.stderr)
        return 2
    if view.modality == "video":
        image = contact_sheet(image)
    Image.fromarray(image).save(args.out)
    print(f"tokenmill decode: {args.id} ({row['source']} {row['locator']}, grid {tuple(row['grid'])}) -> {args.out}")
    return 0


def gc(argv: Sequence[str] | None = None) -> int:
    """`tokenmill gc DIR --keep N`: remove old versions and files no kept commit names."""
    from tokenmill.schemas.manifest import MultiDatasetRoot
    from tokenmill.schemas.versions import gc as collect

    with usage_errors("tokenmill gc"):
        p = OneLineArgumentParser(prog="tokenmill gc",
                                  description="Remove all but the N latest versions of a dataset, and files "
                                              "that no kept version names (leftovers of replaced or dead runs).")
        p.add_argument("dir", metavar="DIR", help="dataset directory or URI")
        p.add_argument("--keep", type=int, required=True, metavar="N", help="versions to keep (at least 1)")
        p.add_argument("--grace", type=float, default=3600.0, metavar="SECONDS",
                       help="leave unreferenced files younger than this: a run may still be writing them "
                            "(default: 3600)")
        p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
        args = p.parse_args(argv)
        if args.keep < 1:
            raise UsageError("--keep must be at least 1")
        try:
            report = collect(args.dir, args.keep, args.grace, args.dry_run)
        except FileNotFoundError:
            raise UsageError(f"{args.dir}: no _manifest.json (not a tokenmill dataset)") from None
        except MultiDatasetRoot as e:
            raise UsageError(f"{args.dir}: {e}; run gc on each") from None
    verb = "would remove" if args.dry_run else "removed"
    for path in report.removed_files:
        print(f"  {verb} {path}")
    print(f"tokenmill gc: kept {len(report.kept)} version(s) ({', '.join(report.kept)}); {verb} "
          f"{len(report.removed_versions)} version(s) and {len(report.removed_files)} file(s)")
    return 0


def inspect(argv: Sequence[str] | None = None) -> int:
    """`tokenmill inspect DIR`: schema, metadata, versions, counts and sample rows."""
    import tempfile

    from tokenmill.reports.inspect import format_inspection, inspect_dataset

    with usage_errors("tokenmill inspect"):
        p = dataset_parser("tokenmill inspect", "Show a dataset's schema, metadata, version history and counts, "
                                                "and sample rows as a person reads them: text with token "
                                                "boundaries, IDs and lengths; images and videos with their grid, "
                                                "codes and a PNG reconstruction.")
        p.add_argument("--rows", type=int, default=3, help="sample rows to show (default: 3)")
        p.add_argument("--id", help="show this row instead of the first ones")
        p.add_argument("--out", metavar="DIR", help="where reconstructions are written (default: a new temp dir)")
        p.add_argument("--json", action="store_true", help="print machine-readable JSON")
        args = p.parse_args(argv)
        if args.rows < 0:
            raise UsageError(f"--rows must be 0 or more, not {args.rows}")
        out_dir = args.out or tempfile.mkdtemp(prefix="tokenmill-inspect-")
        try:
            result = inspect_dataset(args.dir, rows=args.rows, row_id=args.id, out_dir=out_dir)
        except FileNotFoundError:
            raise UsageError(f"{args.dir}: no _manifest.json") from None
        except KeyError:
            raise UsageError(f"no row with id {args.id} in {args.dir}") from None
    print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else format_inspection(result))
    return 0


def report(argv: Sequence[str] | None = None) -> int:
    """`tokenmill report DIR --out report/`: a self-contained HTML page with plots."""
    import os

    from tokenmill.reports.html import write_report
    from tokenmill.schemas.manifest import read_manifest

    with usage_errors("tokenmill report"):
        p = dataset_parser("tokenmill report", "Write a self-contained HTML report (PNG plots embedded, no "
                                               "network needed) on what a dataset's tokens are.")
        p.add_argument("--out", required=True, metavar="DIR", help="folder to write index.html into")
        p.add_argument("--samples", type=int, default=8, help="images to reconstruct (default: 8)")
        args = p.parse_args(argv)
        if args.samples < 0:
            raise UsageError(f"--samples must be 0 or more, not {args.samples}")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise UsageError(f"output {args.out} exists and is not a directory")
        try:  # only a missing manifest is misuse: a shard missing later is a failure that names it
            read_manifest(args.dir)
        except FileNotFoundError:
            raise UsageError(f"{args.dir}: no _manifest.json") from None
    path = write_report(args.dir, args.out, samples=args.samples)
    print(f"tokenmill report: {args.dir} -> {path}")
    return 0
