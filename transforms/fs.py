"""Filesystem access for every URI a user can give.

fsspec rather than Beam's FileSystems: one API covers local paths, gs://, s3://
(including S3-compatible endpoints), http(s):// and memory://, with the same
file objects that pyarrow, gzip and zstandard read from. Beam's registry lacks
several of these schemes and per-store options such as a custom endpoint.
"""
from __future__ import annotations

import collections
import fnmatch
import os
import stat
from typing import IO, Any

import fsspec

from tokenmill.schemas.storage import with_retries
from tokenmill.transforms.records import InputFile

GLOB_CHARS = "*?["


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def canonical(uri: str) -> str:
    """Absolute local path, or the URI unchanged."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return os.path.abspath(uri) if is_local(uri) else uri


def _change_token(info: dict) -> str:
    for key in ("ETag", "etag", "md5Hash", "crc32c", "mtime", "LastModified", "updated", "created"):
        if info.get(key) is not None:
            return f"{key}={info[key]}"
    return ""


# Bounds on one listing, so that a tree no walk can finish (a mount loop, a
# filesystem without stable inode numbers) fails in one line instead of hanging.
MAX_LIST_DEPTH = 256  # folder levels below where the walk starts
MAX_LIST_FILES = 10_000_000


class ListingError(ValueError):
    """An input listing that tokenmill refuses: past a bound, or a folder it cannot read."""


def match(pattern: str) -> list[InputFile]:
    """Files matching a glob (or one path/URI), each once, sorted by URI. Directories are expanded.

    A path that exists as a file names that file even if it holds glob
    characters (`[a].jsonl`); only otherwise is it a glob. Local walks follow
    symlinks but enter each folder once, so a link to an ancestor adds nothing.
    """
    if is_local(pattern):
        return unique([InputFile(name, st.st_size, f"mtime={st.st_mtime_ns}")
                       for name, st in _list_local(canonical(pattern))])
    fs, _ = fsspec.core.url_to_fs(pattern)
    protocol = pattern.split("://", 1)[0]
    found = with_retries(lambda: _list_remote(fs, pattern), f"listing {pattern}")
    if len(found) > MAX_LIST_FILES:
        raise ListingError(f"listing {pattern} found more than {MAX_LIST_FILES} files; list narrower globs")
    out = []
    for path, info in found.items():
        if info.get("type") == "directory":
            continue
        if "://" not in path:  # give URIs back in the form the user wrote them
            path = path.lstrip("/") if not pattern.split("://", 1)[1].startswith("/") else path
        uri = path if "://" in path else f"{protocol}://{path}"
        out.append(InputFile(uri, int(info.get("size") or 0), _change_token(info)))
    return sorted(out, key=lambda f: f.uri)


def match_all(patterns: list[str]) -> list[InputFile]:
    """Every file any pattern matches, once (see `unique`), sorted by URI."""
    return unique([f for pattern in patterns for f in match(pattern)])


def unique(files: list[InputFile]) -> list[InputFile]:
    """`files` without repeats, sorted by URI: local files by what they resolve to, others by URI.

    A local file is known by its device and inode (its real path where the
    filesystem has no inode numbers): the same file whatever symlinks lead to
    it, for a stat each (realpath costs a syscall per path component). Of
    names for one file, the one through the fewest symlinks is kept (then the
    shortest), so a link beside its target changes nothing.
    """
    by_key: dict[object, list[InputFile]] = {}
    for f in files:
        by_key.setdefault(_file_key(f.uri) if is_local(f.uri) else f.uri, []).append(f)
    kept = [group[0] if len(group) == 1 else min(group, key=lambda f: (
        _links_in(canonical(f.uri)) if is_local(f.uri) else 0, len(f.uri), f.uri)) for group in by_key.values()]
    return sorted(kept, key=lambda f: f.uri)


def _file_key(uri: str) -> object:
    path = canonical(uri)
    try:
        return _identity(path, os.stat(path))
    except OSError:
        return path


def _links_in(path: str) -> int:
    """How many components of an absolute local path are symlinks."""
    parts = path.split("/")
    return sum(os.path.islink("/".join(parts[:i])) for i in range(2, len(parts) + 1))


def _list_local(path: str) -> list[tuple[str, os.stat_result]]:
    """The files a local path or glob names (absolute `path`) and their stat, repeats possible."""
    kind, st = _kind(path)
    if kind == "file":  # the literal name wins over a glob reading of it
        return [(path, st)]
    if kind == "dir":
        return _walk(path, ["**"])
    parts = path.split("/")
    first = next((i for i, part in enumerate(parts) if _magic(part)), None)
    if first is None:
        return []
    return _walk("/".join(parts[:first]) or "/", parts[first:])


def _magic(part: str) -> bool:
    return any(c in part for c in GLOB_CHARS)


def _identity(path: str, st: os.stat_result) -> object:
    """What makes two paths the same file or folder: device and inode where the filesystem has them."""
    return (st.st_dev, st.st_ino) if st.st_ino else os.path.realpath(path)


def _walk(base: str, parts: list[str]) -> list[tuple[str, os.stat_result]]:
    """Files under folder `base` whose relative path matches `parts`, glob's way.

    One glob component per part (`*`, `?` and `[...]` within a name, `**` for
    any number of folders; names starting with a dot only where the part does).
    Symlinks are followed, except one to a folder that holds it (an
    ancestor); each folder is entered once per pattern position, whatever the
    route, so loops end. Folders reached through a symlink wait until every
    folder reachable without one is done, so files keep their plain names.
    """
    files: list[tuple[str, os.stat_result]] = []
    seen: set[tuple[object, int]] = set()
    plain: list[tuple[str, int, int]] = [(base, 0, 0)]  # (folder, pattern position, depth)
    linked: collections.deque[tuple[str, int, int]] = collections.deque()
    while plain or linked:
        folder, i, depth = plain.pop() if plain else linked.popleft()
        try:
            key = (_identity(folder, os.stat(folder)), i)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if key in seen:
            continue
        seen.add(key)
        if depth > MAX_LIST_DEPTH:
            raise ListingError(f"listing {base} went more than {MAX_LIST_DEPTH} folders deep (at {folder}); "
                               "list a narrower glob")
        part, last = parts[i], i == len(parts) - 1
        if part == "**" and not last:
            plain.append((folder, i + 1, depth))  # ** as no folder at all
        entries: list[tuple[str, tuple[str, Any], bool]] = []  # (path, (kind, stat), is a symlink)
        if _magic(part):
            try:
                with os.scandir(folder) as it:
                    for e in it:
                        if part == "**":
                            wanted = not e.name.startswith(".")
                        else:
                            wanted = fnmatch.fnmatchcase(e.name, part) and (
                                not e.name.startswith(".") or part.startswith("."))
                        if wanted:
                            entries.append((e.path, _kind(e.path), e.is_symlink()))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:
                raise ListingError(f"cannot list {folder}: {e.strerror or e}") from None
        else:
            path = os.path.join(folder, part)
            entries.append((path, _kind(path), os.path.islink(path)))
        for path, (kind, st), link in entries:
            if kind == "file" and last:
                files.append((path, st))
                if len(files) > MAX_LIST_FILES:
                    raise ListingError(f"listing {base} found more than {MAX_LIST_FILES} files; "
                                       "list narrower globs")
            elif kind == "dir" and (part == "**" or not last):
                if link and _is_ancestor(os.path.realpath(path), os.path.realpath(folder)):
                    continue  # a link up the tree (ln -s .. loop) holds nothing new, only a loop
                (linked.append if link else plain.append)((path, i if part == "**" else i + 1, depth + 1))
    return files


def _is_ancestor(folder: str, of: str) -> bool:
    """Whether real path `folder` is `of` or holds it."""
    return of == folder or of.startswith(folder.rstrip("/") + "/")


def _kind(path: str) -> tuple[str, Any]:
    """("file" | "dir" | "", stat) following symlinks; "" for missing, a dangling or looping link, a device, a FIFO."""
    try:
        st = os.stat(path)
    except OSError:
        return "", None
    return ("file" if stat.S_ISREG(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else ""), st


def _list_remote(fs: fsspec.AbstractFileSystem, pattern: str) -> dict[str, dict]:
    fs.invalidate_cache()  # a retry must not see a listing cut short by the failure
    path = fs._strip_protocol(pattern)
    magic = any(c in path for c in GLOB_CHARS)
    if magic and fs.isfile(path):  # the literal name wins over a glob reading of it
        return {path: fs.info(path)}
    found = fs.glob(pattern, detail=True) if magic else {}
    if not found:
        if fs.isdir(path):
            found = fs.find(path, detail=True)
        elif fs.exists(path):
            found = {path: fs.info(path)}
    return found


def open_binary(uri: str) -> IO[bytes]:
    """A seekable binary file object for reading; remote reads survive transient failures."""
    if is_local(uri):
        return open(canonical(uri), "rb")
    return RetryingReader(uri)  # type: ignore[return-value]


class RetryingReader:
    """A remote file opened for reading whose reads are retried (schemas.storage.with_retries).

    fsspec's buffered files leave their position unchanged when a range request
    fails, so a failed read is tried again from the same offset. Other
    attributes pass through to the fsspec file.
    """

    def __init__(self, uri: str):
        self._uri = uri
        self._f = with_retries(lambda: fsspec.open(uri, "rb").open(), f"opening {uri}")

    def _retried(self, method: str, *args: Any) -> Any:
        pos = self._f.tell()

        def attempt() -> Any:
            self._f.seek(pos)
            return getattr(self._f, method)(*args)

        return with_retries(attempt, f"reading {self._uri}")

    def read(self, size: int = -1) -> bytes:
        return self._retried("read", size)

    def readline(self) -> bytes:  # fsspec's readline takes no size
        return self._retried("readline")

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> "RetryingReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()
