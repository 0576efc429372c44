"""Versions and commits of a dataset: how a build becomes visible, safely.

Layout of a dataset root:

    _manifest.json                  the current version's manifest + history (the pointer)
    _schema.json                    the current version's schema
    README.md                       the current commit's dataset card (schemas/card.py)
    versions/<version>/_manifest.json   the latest commit of each version
    versions/<version>/<run>/data/part-*.parquet, .../_errors/part-*.parquet

* A **version** is the fingerprint of everything that changes the rows: the
  modality, the tokenizer fingerprint, the reader and size options and the
  schema version. A new tokenizer means a new version beside the old one.
* A **commit** is one exact set of shards and inputs of a version. An
  incremental run makes a new commit of the same version, reusing the shards of
  unchanged inputs. Its id is a hash of that content, so two runs that produce
  the same dataset produce the same commit.
* A **run** writes its new shards into its own folder, named from the version,
  the commit it builds on and the inputs it processes. Files that the current
  commit names are never rewritten, so a run killed at any point leaves the
  current commit intact, and its rerun writes the same files again.
* Committing is compare-and-swap under a short lease: the root manifest is
  replaced only if it still names the commit this run started from; otherwise
  the run is a no-op (it made the same commit) or fails without writing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import time
from typing import Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tokenmill.schemas.card import publish_card
from tokenmill.schemas.manifest import MANIFEST_NAME, Manifest, read_manifest, write_manifest, write_schema_json
from tokenmill.schemas.storage import join, sync_filesystem, with_retries

VERSIONS_DIR = "versions"
LEASE_NAME = "_commit.lease"
LEASE_STALE_SECONDS = 600  # a commit takes well under a second; older leases are from dead runs
LEASE_WAIT_SECONDS = 60
# A lease whose body stays unreadable this long (empty or half-written: its run died between
# creating and writing it, e.g. kill -9 or a full disk) is broken; a live run writes it in milliseconds.
LEASE_UNREADABLE_SECONDS = 5.0


# The steps of a commit, in order, at which tests/test_faults.py kills the committing process.
FAULT_STEPS = ("before_commit", "after_lease", "after_root_manifest", "after_version_manifest")


def _fault(step: str) -> None:
    """Test seam: with TOKENMILL_FAULT=STEP the process dies by SIGKILL right here (tests/test_faults.py).

    Why a seam: an outside `kill -9` hits an exact commit step only by chance;
    this is the same signal at a chosen step. Unset, it costs one dict lookup.
    """
    if os.environ.get("TOKENMILL_FAULT") == step:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class ConcurrentCommitError(RuntimeError):
    """Another run committed to the dataset after this run started; nothing was written."""


class MissingShardsError(RuntimeError):
    """Shards the run would commit are gone or not the size written (removed by gc, or by hand)."""


def missing_shards(root: str, manifest: Manifest) -> list[str]:
    """The shards `manifest` names that are not there with their recorded size.

    One listing per run folder, not a request per shard: a commit on object
    storage may name thousands of shards, from a handful of runs.
    """
    fs, base = fsspec.core.url_to_fs(root)
    base = base.rstrip("/")
    wanted = {s["path"]: s.get("bytes") for s in manifest.shards}
    wanted.update({s["path"]: None for s in manifest.error_shards})
    folders = sorted({path.rsplit("/", 2)[0] for path in wanted})  # versions/<v>/<run>
    found: dict[str, int] = {}
    for folder in folders:
        with contextlib.suppress(FileNotFoundError):
            for path, info in fs.find(join(base, folder), detail=True).items():
                found[path[len(base) + 1:]] = int(info.get("size") or 0)
    return sorted(p for p, size in wanted.items() if p not in found or (size is not None and found[p] != size))


def version_id(modality: str, tokenizer_fingerprint: str, options: dict[str, Any], schema_version: int) -> str:
    """The id of the rows a build makes (16 hex digits)."""
    key = json.dumps([modality, tokenizer_fingerprint, options, schema_version], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def version_dir(version: str) -> str:
    return f"{VERSIONS_DIR}/{version}"


def commit_id(manifest: Manifest) -> str:
    """Hash of what a reader sees: the version, its files and the inputs they came from."""
    key = json.dumps([manifest.version, manifest.files, manifest.error_files, manifest.inputs],
                     sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def read_current(root: str) -> Manifest | None:
    """The current manifest, or None where there is no dataset yet."""
    try:
        return read_manifest(root)
    except FileNotFoundError:
        return None


def history(previous: Manifest | None, manifest: Manifest) -> list[dict[str, Any]]:
    """The version list after committing `manifest`: one entry per version, latest last."""
    entries = [v for v in (previous.versions if previous else []) if v["version"] != manifest.version]
    entries.append({"version": manifest.version, "commit": manifest.commit, "created_at": manifest.created_at,
                    "tokenizer": manifest.tokenizer.get("spec"),
                    "fingerprint": manifest.tokenizer.get("fingerprint"),
                    "rows": manifest.rows, "tokens": manifest.tokens, "errors": manifest.errors,
                    "inputs": len(manifest.inputs),
                    "manifest": f"{version_dir(manifest.version)}/{MANIFEST_NAME}"})
    return entries


@contextlib.contextmanager
def lease(root: str, wait: float = LEASE_WAIT_SECONDS) -> Iterator[None]:
    """Hold ROOT/_commit.lease while committing: created exclusively, removed after.

    Local disks create it with O_EXCL; object stores with fsspec's exclusive
    mode where the store offers a conditional put (GCS generation match, S3
    If-None-Match). A lease older than LEASE_STALE_SECONDS, or taken on this
    machine by a process that has died, is from a dead run and is broken.
    """
    fs, path = fsspec.core.url_to_fs(join(root, LEASE_NAME))
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
    body = json.dumps(mine).encode()
    deadline = time.monotonic() + wait
    unreadable_since: float | None = None
    # Every call to the store is retried through an outage (with_retries); a create whose reply was lost may
    # have landed, and the retry then finds the lease it took itself: that one is ours.
    while True:
        try:
            with_retries(lambda: _create_exclusive(fs, path, body), "taking the commit lease")
            break
        except FileExistsError:
            try:
                held = json.loads(with_retries(lambda: fs.cat_file(path), "reading the commit lease"))
                unreadable_since = None
                if held == mine:
                    break
                if time.time() - float(held.get("time", 0)) > LEASE_STALE_SECONDS or _dead_here(held):
                    with_retries(lambda: fs.rm(path), "breaking a stale commit lease")
                    continue
            except FileNotFoundError:
                continue  # released between our two calls: take it now
            except (ValueError, TypeError, AttributeError):  # empty, half-written or not a lease at all
                now = time.monotonic()
                unreadable_since = unreadable_since if unreadable_since is not None else now
                if now - unreadable_since >= LEASE_UNREADABLE_SECONDS:
                    with contextlib.suppress(FileNotFoundError):
                        with_retries(lambda: fs.rm(path), "breaking an unreadable commit lease")
                    unreadable_since = None
                    continue
                held = {"host": "unknown (unreadable lease)", "pid": "?"}
            if time.monotonic() > deadline:
                raise ConcurrentCommitError(f"{root}: another run holds the commit lease "
                                            f"({held.get('host')}, pid {held.get('pid')})") from None
            time.sleep(0.2)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            with_retries(lambda: fs.rm(path), "releasing the commit lease")


def _dead_here(held: dict[str, Any]) -> bool:
    """The lease was taken on this machine by a process that no longer runs (killed mid-commit)."""
    if held.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(held.get("pid", 0)), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        return False
    return False


def _create_exclusive(fs: fsspec.AbstractFileSystem, path: str, body: bytes) -> None:
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        return
    try:
        with fs.open(path, "xb") as f:
            f.write(body)
    except (ValueError, NotImplementedError):
        # The store has no conditional create: check, then write. Two commits
        # racing inside this window is the remaining risk on such stores.
        if fs.exists(path):
            raise FileExistsError(path) from None
        fs.pipe_file(path, body)


def commit(root: str, manifest: Manifest, base_commit: str) -> str:
    """Make `manifest` the dataset's current commit; returns "committed" or "unchanged".

    `base_commit` is the commit the run started from ("" for none). If the root
    now names another commit, the run is a no-op when it would commit the same
    content, and otherwise raises ConcurrentCommitError without writing.
    """
    manifest.commit = commit_id(manifest)
    _fault("before_commit")
    with lease(root):
        _fault("after_lease")
        current = read_current(root)
        current_commit = current.commit if current else ""
        if current is not None and current_commit == manifest.commit:
            # Repairs what a run killed right after its flip left behind: its card and version manifest.
            _publish_version(root, current)
            publish_card(root, current)
            return "unchanged"
        if current_commit != base_commit:
            raise ConcurrentCommitError(
                f"{root}: another run committed {current_commit or 'a dataset'} after this run started "
                f"from {base_commit or 'an empty output'}; nothing was committed (run again to build on it)")
        gone = missing_shards(root, manifest)
        if gone:  # never publish a commit whose files are not all there
            raise MissingShardsError(f"{root}: {len(gone)} shard(s) this run wrote are gone or changed (removed "
                                     f"by a gc during the build?), e.g. {gone[0]}; nothing was committed (run "
                                     "again to rewrite them)")
        sync_filesystem(root)  # every shard it names on disk before the manifest that names them
        manifest.parent = current_commit
        manifest.versions = history(current, manifest)
        write_schema_json(root, manifest)
        write_manifest(root, manifest)  # the single atomic step that publishes the commit
        _fault("after_root_manifest")
        # The version's own manifest follows the flip: written first, it would name a commit that a
        # run killed before the flip never published. A kill here leaves it naming the version's
        # previous commit (published), until the next commit of the dataset repairs it.
        _publish_version(root, manifest)
        _fault("after_version_manifest")
        # The card (README.md, what `datasets.load_dataset(DIR)` reads) follows the flip, still
        # under the lease. After, not before: a card written first would name files that a
        # failed flip never publishes (and that gc later removes as unreferenced). So the card
        # only ever names committed files, and the lease keeps two commits from publishing their
        # cards in the opposite order to their manifests. A run killed between the two writes
        # leaves the previous commit's card: `validate` reports it, and the next commit of the
        # dataset (a rerun of the same build is one, "unchanged") or `gc` rewrites it.
        publish_card(root, manifest)
    return "committed"


def _publish_version(root: str, manifest: Manifest) -> None:
    """versions/<version>/_manifest.json (and its schema) for a published commit, where it names another."""
    vdir = join(root, version_dir(manifest.version))
    try:
        if read_manifest(vdir).commit == manifest.commit:
            return
    except (FileNotFoundError, ValueError):
        pass
    write_schema_json(vdir, manifest)
    write_manifest(vdir, manifest)


@dataclasses.dataclass
class GcReport:
    kept: list[str]
    removed_versions: list[str]
    removed_files: list[str]


def referenced(manifest: Manifest) -> set[str]:
    return set(manifest.files) | set(manifest.error_files) | {
        f"{version_dir(manifest.version)}/{name}" for name in (MANIFEST_NAME, manifest.schema_file)}


def gc(root: str, keep: int, grace_seconds: float = 3600.0, dry_run: bool = False) -> GcReport:
    """Remove all but the `keep` latest versions, and files no kept commit names.

    A run folder (versions/<version>/<run>/) whose newest file is younger than
    `grace_seconds` is left whole, whatever its version: a build still in
    progress keeps writing into it, and may commit it (even into a version
    removed here). The commit checks its shards are all there
    (missing_shards), so a build whose files a gc removed fails instead of
    publishing them. The removal runs under the commit lease: no commit lands
    half-way through it.
    """
    if keep < 1:
        raise ValueError("keep must be at least 1 (the current version)")
    read_manifest(root)  # not a dataset: say so before taking any lease
    with (contextlib.nullcontext() if dry_run else lease(root)):
        current = read_manifest(root)
        if not dry_run:  # a card left by a commit killed after its flip must not name files removed here
            publish_card(root, current)
        entries = current.versions or [{"version": current.version}]
        kept = [e["version"] for e in entries[-keep:]]
        if current.version not in kept:
            kept.append(current.version)
        keep_files: set[str] = set()
        for v in kept:
            keep_files |= referenced(current if v == current.version else read_manifest(root, v))
        fs, base = fsspec.core.url_to_fs(root)
        base = base.rstrip("/")
        now = time.time()
        removed_files: list[str] = []
        removed_versions = sorted({e["version"] for e in entries} - set(kept))
        found = fs.find(join(base, VERSIONS_DIR), detail=True) if fs.exists(join(base, VERSIONS_DIR)) else {}
        newest: dict[str, float] = {}  # run folder (or version folder, for its manifest) -> newest mtime
        for path, info in found.items():
            folder = _run_folder(path[len(base) + 1:])
            newest[folder] = max(newest.get(folder, 0.0), _mtime(info))
        for path, info in sorted(found.items()):
            rel = path[len(base) + 1:]
            if rel in keep_files:
                continue
            if now - newest[_run_folder(rel)] < grace_seconds:
                continue  # a run that may still be writing, or about to commit
            removed_files.append(rel)
            if not dry_run:
                fs.rm(path)
        if not dry_run and isinstance(fs, LocalFileSystem):
            for folder, _dirs, _files in sorted(os.walk(join(base, VERSIONS_DIR)), reverse=True):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)  # only empty folders go
        if not dry_run and removed_versions:  # history no longer lists what was removed
            current.versions = [e for e in current.versions if e["version"] not in removed_versions]
            write_manifest(root, current)
    return GcReport(kept, removed_versions, removed_files)


def _run_folder(rel: str) -> str:
    """versions/<v>/<run>/data/x.parquet -> versions/<v>/<run>; versions/<v>/_manifest.json -> versions/<v>."""
    parts = rel.split("/")
    return "/".join(parts[:3]) if len(parts) > 3 else "/".join(parts[:2])


def _mtime(info: dict[str, Any]) -> float:
    for key in ("mtime", "LastModified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if hasattr(value, "timestamp"):
            return value.timestamp()
        try:
            import datetime as _dt

            return _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
    return 0.0
