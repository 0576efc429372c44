"""The dataset manifest: `DIR/_manifest.json`, written last and atomically.

A dataset exists once its manifest exists. Shards not named by the manifest are
not part of the dataset, so a crashed build never looks complete.

Datasets are versioned (see schemas/versions.py): every version keeps its own
shards under `versions/<id>/` and its latest manifest at
`versions/<id>/_manifest.json`; the root `_manifest.json` is a copy of the
current version's manifest plus the version history. Paths in `files`,
`error_files` and `shards` are relative to the dataset root, so a reader of
either manifest finds the same files.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import re
import typing
from typing import Any

from tokenmill.schemas.storage import join, read_bytes, write_bytes_atomic
from tokenmill.schemas.tables import SCHEMA_VERSION

MANIFEST_NAME = "_manifest.json"
SCHEMA_NAME = "_schema.json"
DATA_DIR = "data"
ERRORS_DIR = "_errors"


def tokenmill_version() -> str:
    try:
        from importlib.metadata import version

        return version("tokenmill")
    except Exception:  # running from a source tree that is not installed
        return "0+unknown"


@dataclasses.dataclass
class Manifest:
    """What `DIR/_manifest.json` holds. Field names are a public contract."""

    modality: str
    tokenizer: dict[str, Any]
    token_dtype: str
    files: list[str]
    error_files: list[str]
    rows: int
    tokens: int
    errors: int
    inputs: list[dict[str, Any]]
    shards: list[dict[str, Any]]
    options: dict[str, Any]
    schema_version: int = SCHEMA_VERSION
    schema_file: str = SCHEMA_NAME
    created_at: str = ""
    tokenmill_version: str = ""
    # Versioning (schemas/versions.py). `version` names the rows (tokenizer,
    # options, schema); `commit` names this exact set of files and inputs.
    version: str = ""
    commit: str = ""
    parent: str = ""
    versions: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    error_shards: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    build_args: list[str] = dataclasses.field(default_factory=list)
    # The BuildSpec's JSON form (pipelines/spec.py); manifests written before it have build_args only.
    spec: dict[str, Any] = dataclasses.field(default_factory=dict)
    # started_at, finished_at and when each block was written (see transforms/write.py run_timing)
    timing: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        """The manifest as JSON. Its fields are plain JSON values, so they are dumped as they are:
        dataclasses.asdict would deep-copy every shard and input entry first (4x the time at 2,000 shards)."""
        return json.dumps({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, indent=2,
                          sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        """The manifest in `text`; ManifestError (a ValueError) if it is not one tokenmill can trust.

        Checked here, once for every reader: a JSON object, every required
        field present with its declared type, and every file path it names
        inside the dataset (see `dataset_path`).
        """
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise ManifestError(f"not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ManifestError(f"not a JSON object but {_json_type(raw)}")
        if "datasets" in raw and "modality" not in raw and isinstance(raw["datasets"], (list, dict)):
            raise MultiDatasetRoot(sorted(map(str, raw["datasets"])))
        _check_fields(cls, raw)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


class ManifestError(ValueError):
    """A manifest tokenmill cannot trust: not a JSON object, a field missing or of the wrong type, or a
    file path outside its dataset. The dataset is damaged; nothing it names is opened."""


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _has_type(value: Any, expected: type) -> bool:
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _check_fields(cls: type, raw: dict[str, Any]) -> None:
    """Each field's JSON type, from the dataclass annotations (list[str] checks the items too)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ManifestError(f"no '{f.name}' field")
            continue
        value, hint = raw[f.name], hints[f.name]
        outer = typing.get_origin(hint) or hint
        if not _has_type(value, outer):
            raise ManifestError(f"'{f.name}' is {_json_type(value)}, not {_json_type(outer())}")
        if outer is list:
            inner = typing.get_args(hint)[0]
            inner = typing.get_origin(inner) or inner
            for i, item in enumerate(value):
                if not _has_type(item, inner):
                    raise ManifestError(f"'{f.name}[{i}]' is {_json_type(item)}, not {_json_type(inner())}")
    for key in ("files", "error_files"):
        for i, path in enumerate(raw[key]):
            check_dataset_path(path, f"'{key}[{i}]'")
    for key in ("shards", "error_shards"):
        for i, entry in enumerate(raw.get(key, [])):
            check_dataset_path(entry.get("path"), f"'{key}[{i}].path'")
            for name in ("rows", "tokens", "errors", "bytes", "sha256"):
                expected = str if name == "sha256" else int
                if name in entry and not _has_type(entry[name], expected):
                    raise ManifestError(f"'{key}[{i}].{name}' is {_json_type(entry[name])}, "
                                        f"not {_json_type(expected())}")
    for i, entry in enumerate(raw.get("versions", [])):
        if not isinstance(entry.get("version"), str):
            raise ManifestError(f"'versions[{i}].version' is {_json_type(entry.get('version'))}, not a string")
    check_dataset_path(raw.get("schema_file", SCHEMA_NAME), "'schema_file'")


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def check_dataset_path(path: Any, what: str = "path") -> str:
    """`path` if it is a relative path that stays inside a dataset, else ManifestError naming it.

    Refused: anything but a non-empty string; absolute paths; `..`, `.` and
    empty segments; backslashes; URL schemes, drive letters and fsspec chains
    (`http://`, `C:`, `a::b`); NUL. The same rule holds for local and
    object-storage roots, so no manifest can make a reader open another file.
    """
    if not isinstance(path, str) or not path:
        reason = "empty" if path == "" else f"{_json_type(path)}, not a path"
    elif path.startswith("/"):
        reason = "an absolute path"
    elif "\\" in path:
        reason = "a backslash in it"
    elif "\0" in path:
        reason = "a NUL character in it"
    elif "://" in path or "::" in path or _SCHEME.match(path):
        reason = "a URL or drive prefix"
    elif any(seg in ("", ".", "..") for seg in path.split("/")):
        reason = "a '..', '.' or empty segment"
    else:
        return path
    raise ManifestError(f"{what} {path!r} is not a path inside the dataset ({reason})")


def dataset_path(root: str, relative: str) -> str:
    """ROOT/relative for a file that a manifest names; ManifestError if the path could leave ROOT.

    Every reader opens manifest-named files through this (data and error
    shards, older versions' manifests), whatever the storage of ROOT.
    """
    return join(root, check_dataset_path(relative))


class MultiDatasetRoot(ValueError):
    """The root of a `build --config` output: one dataset per source, below it."""

    def __init__(self, names: list[str]):
        self.names = names
        super().__init__(f"this is the root of a multi-source build; its datasets are the folders "
                         f"{', '.join(names)}")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_manifest(root: str, manifest: Manifest) -> str:
    """Write the manifest atomically; it is the last file a build writes."""
    final = join(root, MANIFEST_NAME)
    write_bytes_atomic(final, manifest.to_json().encode())
    return final


def write_schema_json(root: str, manifest: Manifest) -> str:
    """The dataset's schema as JSON (see schemas.tables.describe), next to its manifest."""
    from tokenmill.schemas.tables import describe

    tok = manifest.tokenizer
    kind = tok.get("kind", "hard")
    definition = describe(manifest.modality, kind, token_dtype=manifest.token_dtype if kind == "hard" else None,
                          latent_dtype=tok.get("latent_dtype"), dim=tok.get("dim"), metadata=tok)
    path = join(root, SCHEMA_NAME)
    write_bytes_atomic(path, (json.dumps(definition, indent=2, sort_keys=True) + "\n").encode())
    return path


def read_manifest(root: str, version: str | None = None) -> Manifest:
    """The current manifest of the dataset at `root`, or that of an older `version`.

    FileNotFoundError where there is none; ManifestError (naming the file) where it is damaged.
    """
    path = join(root, MANIFEST_NAME) if not version else dataset_path(root, f"versions/{version}/{MANIFEST_NAME}")
    data = read_bytes(path)
    try:
        return Manifest.from_json(data.decode())
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: damaged: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ManifestError as e:
        raise ManifestError(f"{path}: damaged: {e}") from None
