"""The dataset card, `DIR/README.md`: what Hugging Face `datasets` and the Hub read to find the data files.

Its YAML front matter lists the current commit's data shards under `configs`,
so `datasets.load_dataset(DIR)` reads exactly that commit, and the folder can
be pushed to a Hub repository as it is. Without it, `datasets` would take
every file of the folder: `_manifest.json`, and every version at once.

`versions.commit` rewrites the card right after it publishes a commit, under
the commit lease (the why is there). A README.md without CARD_MARKER is the
user's own and is never replaced.
"""
from __future__ import annotations

import glob
import logging

import yaml

from tokenmill.schemas.manifest import Manifest
from tokenmill.schemas.storage import join, read_bytes, write_bytes_atomic

CARD_NAME = "README.md"
# The first line after the front matter of every card tokenmill writes: a file that has
# it is tokenmill's to rewrite; one without it is the user's.
CARD_MARKER = "<!-- tokenmill:card"
_MARKER_LINE = (f"{CARD_MARKER}: rewritten by tokenmill at every commit of this dataset; "
                "delete this line to keep your own README.md (tokenmill then leaves it alone) -->")

_LOG = logging.getLogger(__name__)


def card_paths(manifest: Manifest) -> list[str]:
    """The card's `data_files` entries: the commit's data shards, relative to DIR.

    `datasets` reads each entry as a glob pattern; tokenmill's shard names hold no
    glob characters, and glob.escape keeps any other name literal.
    """
    return [glob.escape(f) for f in manifest.files]


def card_text(manifest: Manifest) -> str:
    """The README.md of a commit: YAML front matter for `datasets` and the Hub, then a short body."""
    front = yaml.safe_dump({"configs": [{"config_name": "default", "data_files": [
        {"split": "train", "path": card_paths(manifest)}]}]}, sort_keys=False, allow_unicode=True)
    tok = manifest.tokenizer
    detail = (f"vocab {tok['vocab_size']}, {manifest.token_dtype} IDs" if "vocab_size" in tok
              else f"dim {tok.get('dim')} {tok.get('latent_dtype')} latents")
    body = [
        _MARKER_LINE, "",
        f"# {manifest.modality} tokens: `{tok.get('spec')}`", "",
        f"- modality: {manifest.modality}",
        (f"- tokenizer: `{tok.get('spec')}` ({tok.get('name')}, {detail}, "
         f"fingerprint {str(tok.get('fingerprint', ''))[:12]})"),
        f"- rows: {manifest.rows}, tokens: {manifest.tokens}, error rows: {manifest.errors}",
        (f"- version {manifest.version}, commit {manifest.commit}, {len(manifest.files)} data shard(s), "
         f"created {manifest.created_at}"),
        "",
        (f"Built by tokenmill (schema version {manifest.schema_version}). The `configs` above list this "
         "commit's data shards; other versions share `versions/`, so read the listed files, never a glob "
         "of `versions/`:"),
        "",
        "```python",
        "from datasets import load_dataset",
        'ds = load_dataset("path/to/this/folder")["train"]',
        "```",
        "",
        "```",
        "tokenmill files DIR                   # one shard per line (pyarrow, Polars); --errors: error shards",
        "tokenmill files DIR --format duckdb   # read_parquet([...]) to paste into DuckDB",
        "```",
        "",
    ]
    return f"---\n{front}---\n" + "\n".join(body)


def card_files(text: str) -> list[str] | None:
    """The `train` data files of a card's default config, or None where it names none."""
    lines = text.splitlines()
    if not lines or lines[0] != "---" or "---" not in lines[1:]:
        return None
    try:
        front = yaml.safe_load("\n".join(lines[1:lines.index("---", 1)]))
        config = next(c for c in front["configs"] if c.get("config_name") == "default")
        paths = next(d["path"] for d in config["data_files"] if d.get("split") == "train")
    except (yaml.YAMLError, KeyError, TypeError, StopIteration, AttributeError):
        return None
    return [paths] if isinstance(paths, str) else list(paths)


def _read_card(root: str) -> str | None:
    try:
        return read_bytes(join(root, CARD_NAME)).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None


def card_state(root: str, manifest: Manifest) -> str:
    """"current", "stale" (a tokenmill card naming other files), "foreign" (the user's README.md) or "missing"."""
    text = _read_card(root)
    if text is None:
        return "missing"
    if CARD_MARKER not in text:
        return "foreign"
    return "current" if card_files(text) == card_paths(manifest) else "stale"


def publish_card(root: str, manifest: Manifest) -> str:
    """Make DIR/README.md the card of `manifest`: "written", "current" (already was) or "foreign" (left alone)."""
    text = card_text(manifest)
    existing = _read_card(root)
    if existing is not None and CARD_MARKER not in existing:
        _LOG.warning("tokenmill: %s is not a tokenmill dataset card: left as it is; `datasets.load_dataset` "
                     "reads what it says, not necessarily commit %s (`tokenmill files` lists its shards)",
                     join(root, CARD_NAME), manifest.commit)
        return "foreign"
    if existing == text:
        return "current"
    write_bytes_atomic(join(root, CARD_NAME), text.encode())
    return "written"
