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
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        raw = json.loads(text)
        if "datasets" in raw and "modality" not in raw:
            raise MultiDatasetRoot(sorted(raw["datasets"]))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


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
    """The current manifest of the dataset at `root`, or that of an older `version`."""
    path = join(root, MANIFEST_NAME) if not version else join(root, "versions", version, MANIFEST_NAME)
    return Manifest.from_json(read_bytes(path).decode())
