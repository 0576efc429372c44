"""Tar shards in WebDataset layout: grouping members into samples, and indexing plain tars to read by byte range.

A sample is a main member (an image or a video) with the sidecars that share its
key (key.json, key.txt), kept as the row's `meta`. Indexing walks the headers
only (tarfile seeks past member data), so a big tar is split into read tasks
that workers run in parallel instead of one worker streaming it end to end.

Nothing in a tar is dropped without an error row:
- members whose path is absolute or climbs out of the archive, and links, are
  rejected (UnsafeMember) and never read;
- a second member for a part of a key already taken is a DuplicateKey row (TarSamples);
- a sidecar that does not parse costs that sidecar only (JSONDecodeError, JSONTooDeep);
- a key with members but no main member (x.json alone, or x.cls beside x.json) is
  a sample without its image or video: a NoMainMember row names its members;
- tarfile takes a bad header for the end of the archive, so where its listing
  stopped is checked against what follows: anything but the end-of-archive
  marker is an error row at that offset (end_of_archive_error).
"""
from __future__ import annotations

import bz2
import collections
import dataclasses
import gzip
import io
import json
import lzma
import posixpath
import tarfile
from typing import IO, Any

from tokenmill.transforms import fs
from tokenmill.transforms.records import ErrorRecord

BLOCK = 512  # a tar header, and the unit member data is padded to
END_MARKER = 2 * BLOCK  # a tar ends with two zero blocks (then zero padding to its record size)
SIDECARS = {".json": "json", ".txt": "txt"}


@dataclasses.dataclass(frozen=True)
class TarSample:
    name: str  # the main member's path in the tar
    offset: int  # where its data starts in the tar file
    size: int
    meta: str | None  # the sidecars, as JSON: {"json": ..., "txt": ...}


def safe_member(name: str) -> bool:
    norm = posixpath.normpath(name)
    return not (name.startswith("/") or norm.startswith("..") or "/../" in f"/{norm}/")


def sidecar_json(part: str, data: bytes) -> str:
    """A sidecar's value as canonical JSON text (sorted keys), ready to sit in a row's `meta`.

    Raises ValueError for a .json that does not parse and RecursionError for one
    nested too deep to parse or write; serializing here, in the same guarded step
    as parsing, means no later step can fail on it.
    """
    if part == "json":
        return json.dumps(json.loads(data), sort_keys=True)
    return json.dumps(data.decode("utf-8", "replace"))


class TarSamples:
    """Groups a tar's members, in tar order, into samples, and writes an error row for each member it drops.

    Duplicate keys (dup.jpg twice; twin.jpg beside twin.png; a second dup.json):
    the first member to take a part of a key (its main member, its .json, its
    .txt) keeps it, and each later one is a DuplicateKey error row naming that
    member. First-wins is what a stream can honour (the first may be tokenized
    before the second is seen), so a plain tar read by range and a compressed
    one streamed give the same rows, and which member wins depends only on the
    order of the tar.

    `streaming`: members are seen once, in order, so the samples open when a
    new key arrives are closed (WebDataset keeps a sample's members together)
    and handed out by `take`; a later member of a closed key is a DuplicateKey
    row too. An index sees the whole listing and closes everything at the end.
    Sample values are whatever the caller stores for the main member.
    """

    def __init__(self, source: str, extensions: tuple[str, ...], streaming: bool = False):
        self.source, self.extensions, self.streaming = source, extensions, streaming
        self.errors: list[ErrorRecord] = []
        self._open: dict[str, dict[str, Any]] = {}  # key → {"names": {part: member}, "main": value, "meta": {...}}
        self._closed: set[str] = set()
        self._done: list[tuple[Any, str | None]] = []
        self._erred: set[str] = set()  # keys with an error row already: a sample lost there needs no second one

    def error(self, name: str, kind: str, message: str) -> None:
        self.errors.append(ErrorRecord(self.source, f"member:{name}", "read", kind, message))
        self._erred.add(posixpath.splitext(name)[0])

    def part(self, member: tarfile.TarInfo, file_size: int | None = None) -> tuple[str, str] | None:
        """(key, part) for a member the caller must read: part is 'main', 'json' or 'txt'.

        None for a member not to read: unsafe, duplicate, or (with `file_size`, the
        tar's size) cut off by the end of the file, each with its error row; or a
        directory, a hidden file, or a file of another extension, which are no
        part of a sample.
        """
        name = member.name
        if not safe_member(name) or member.issym() or member.islnk():
            self.error(name, "UnsafeMember", "tar member path escapes the archive, or is a link; not read")
            return None
        if not member.isfile():
            return None
        if file_size is not None and member.offset_data + member.size > file_size:
            self.error(name, "TruncatedTar", f"the tar ends {member.offset_data + member.size - file_size} bytes "
                                             "before the end of this member; it and anything after it are lost")
            return None
        if posixpath.basename(name).startswith("."):
            return None
        key, ext = posixpath.splitext(name)
        if self.streaming and key not in self._open:
            for done in list(self._open):
                self._close(done)
        part = "main" if ext.lower() in self.extensions else SIDECARS.get(ext.lower())
        if part is None:
            if key not in self._closed:  # no part of a sample, but its key must still find a main member
                self._open.setdefault(key, {"names": {}, "meta": {}, "others": []})["others"].append(name)
            return None
        if key in self._closed:
            self.error(name, "DuplicateKey", f"key {key!r} came earlier in the tar, apart from this member (a "
                                             "sample's members must sit together in a stream); not read")
            return None
        names = self._open.setdefault(key, {"names": {}, "meta": {}, "others": []})["names"]
        if part in names:
            self.error(name, "DuplicateKey", f"{names[part]} (earlier in the tar) already holds the "
                                             f"{'main member' if part == 'main' else part + ' sidecar'} of "
                                             f"key {key!r}; only the first is read")
            return None
        names[part] = name
        return key, part

    def set_main(self, key: str, value: Any) -> None:
        self._open[key]["main"] = value

    def set_sidecar(self, key: str, part: str, data: bytes) -> None:
        """Keeps a sidecar in its sample's meta, or writes its error row: a bad sidecar costs only itself."""
        entry = self._open[key]
        try:
            entry["meta"][part] = sidecar_json(part, data)
        except RecursionError:
            self.error(entry["names"][part], "JSONTooDeep", "sidecar nests too deep to parse; its sample is kept "
                                                            "without it")
        except ValueError as e:
            self.error(entry["names"][part], "JSONDecodeError", f"sidecar is not JSON: {e}")

    def _close(self, key: str) -> None:
        entry = self._open.pop(key)
        self._closed.add(key)
        if "main" in entry:
            meta = entry["meta"]
            # The same text json.dumps({...}, sort_keys=True) gives, from the parts serialized when read.
            text = "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in sorted(meta.items())) + "}" if meta else None
            self._done.append((entry["main"], text))
        elif key not in self._erred and "main" not in entry["names"]:  # a main member not read has its own row
            members = sorted(entry["names"].values()) + entry.get("others", [])
            shown = ", ".join(members[:4]) + (f" and {len(members) - 4} more" if len(members) > 4 else "")
            self.error(members[0], "NoMainMember", f"key {key!r} has {shown} but no member of the kind "
                                                   f"built ({' '.join(self.extensions)}); its sample is lost")

    def take(self, finish: bool = False) -> list[tuple[Any, str | None]]:
        """The samples closed so far as (main value, meta JSON or None), in tar order; `finish` closes the rest."""
        if finish:
            for key in list(self._open):
                self._close(key)
        done, self._done = self._done, []
        return done


def end_of_archive_error(source: str, stop: int, rest: IO[bytes]) -> ErrorRecord | None:
    """An error row at `stop`, where tarfile's listing ended, unless the end-of-archive marker is there.

    `rest` reads the tar from `stop` on. tarfile ends its listing, without a
    word, at a zero block, at a header that does not parse, and at the end of
    the file; only the first is the end of a well-formed tar, and then all that
    follows is zero padding, at least two blocks of it.
    """
    seen, nonzero = 0, None  # bytes read after `stop`; where the first non-zero one is
    while chunk := rest.read(1 << 20):
        if tail := chunk.lstrip(b"\0"):
            nonzero = seen + len(chunk) - len(tail)
            seen += len(chunk) + len(rest.read(BLOCK))  # enough to tell a cut-off header
            break
        seen += len(chunk)
    where = f"offset:{stop}"
    if nonzero is None and seen < END_MARKER:
        return ErrorRecord(source, where, "read", "TruncatedTar",
                           f"the tar ends at offset {stop + seen} without its end-of-archive marker: it was cut off "
                           "there, and members from here on are lost")
    if nonzero is not None and seen < BLOCK:
        return ErrorRecord(source, where, "read", "TruncatedTar",
                           f"the tar ends inside the header at offset {stop}; members from here on are lost")
    if nonzero is not None:
        return ErrorRecord(source, where, "read", "CorruptTar",
                           f"the tar listing stops at offset {stop}, but what follows is neither a valid header nor "
                           f"the end of the archive (a non-zero byte at {stop + nonzero}); members from here on "
                           "are lost")
    return None


class TarStream(io.RawIOBase):
    """The tar inside a gzip, bzip2 or xz file (told by its magic bytes), or in a plain one, read front to back.

    It remembers its last bytes, so that the header tarfile consumed where its
    listing stopped can be read again (`since`) to check the end of the archive.
    """

    KEEP = 1 << 16  # tarfile's stream reads 10 kB records and is at most one header past where it stopped

    def __init__(self, f: IO[bytes]):
        super().__init__()
        magic = f.read(6)
        f.seek(0)
        if magic.startswith(b"\x1f\x8b"):
            f = gzip.GzipFile(fileobj=f, mode="rb")
        elif magic.startswith(b"BZh"):
            f = bz2.BZ2File(f)
        elif magic.startswith(b"\xfd7zXZ\x00"):
            f = lzma.LZMAFile(f)
        self._raw, self._pos = f, 0
        self._chunks: collections.deque[bytes] = collections.deque()  # the last reads, at least KEEP bytes of them
        self._kept = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._pos += len(data)
        self._chunks.append(data)
        self._kept += len(data)
        while self._kept - len(self._chunks[0]) >= self.KEEP:
            self._kept -= len(self._chunks.popleft())
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def since(self, offset: int) -> IO[bytes]:
        """The tar from `offset` on: the remembered bytes, then the rest of the stream."""
        start = self._pos - self._kept
        if offset < start:
            raise ValueError(f"offset {offset} is no longer remembered (kept from {start})")
        return io.BufferedReader(_Chained(b"".join(self._chunks)[offset - start:], self._raw))


class _Chained(io.RawIOBase):
    def __init__(self, head: bytes, raw: IO[bytes]):
        super().__init__()
        self._head, self._raw = head, raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._head[:len(buffer)] if self._head else self._raw.read(len(buffer))
        self._head = self._head[len(data):]
        buffer[:len(data)] = data
        return len(data)


def cut_in_padding(source: str, tar: tarfile.TarFile, size: int) -> ErrorRecord | None:
    """The listing went past the end of a `size`-byte file: the member that ran off it has its own error row
    (TruncatedTar, when read), but a cut in the padding after a whole member needs this one."""
    last = tar.members[-1] if tar.members else None
    if last is not None and last.offset_data + last.size > size:
        return None
    return ErrorRecord(source, f"offset:{size}", "read", "TruncatedTar",
                       f"the tar ends at offset {size}, in the padding after its last member, without its "
                       "end-of-archive marker: it was cut off there, and members after it are lost")


def index_tar(uri: str, extensions: tuple[str, ...]) -> tuple[list[TarSample], list[ErrorRecord]]:
    """The samples of a plain tar whose main member has one of `extensions`, in tar order, and the errors."""
    groups = TarSamples(uri, extensions)
    with fs.open_binary(uri) as f:
        size = f.seek(0, 2)
        f.seek(0)
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except (tarfile.TarError, EOFError, OSError) as e:
            return [], [ErrorRecord(uri, "file", "read", type(e).__name__, f"not a readable tar: {e}")]
        with tar:
            try:
                for member in tar:
                    got = groups.part(member, size)
                    if got is None:
                        continue
                    key, part = got
                    if part == "main":
                        groups.set_main(key, (member.name, member.offset_data, member.size))
                    else:
                        groups.set_sidecar(key, part, tar.extractfile(member).read())
            except (tarfile.TarError, EOFError, OSError) as e:
                if tar.offset <= size:
                    groups.errors.append(ErrorRecord(uri, f"offset:{tar.offset}", "read", type(e).__name__,
                                                     f"tar cannot be listed past offset {tar.offset} ({e}); "
                                                     "members from here on are lost"))
                elif (err := cut_in_padding(uri, tar, size)) is not None:
                    groups.errors.append(err)
            else:
                if tar.offset <= size:
                    f.seek(tar.offset)
                    if (err := end_of_archive_error(uri, tar.offset, f)) is not None:
                        groups.errors.append(err)
                elif (err := cut_in_padding(uri, tar, size)) is not None:
                    groups.errors.append(err)
    samples = [TarSample(*main, meta) for main, meta in groups.take(finish=True)]
    return samples, groups.errors
