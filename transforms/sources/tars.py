"""Plain tar shards in WebDataset layout, indexed so that their members can be read by byte range.

A sample is a main member (an image or a video) with the sidecars that share its
key (key.json, key.txt), kept as the row's `meta`. Indexing walks the headers
only (tarfile seeks past member data), so a big tar is split into read tasks
that workers run in parallel instead of one worker streaming it end to end.
Members whose path is absolute or climbs out of the archive, and links, are
rejected as error rows and never read.
"""
from __future__ import annotations

import dataclasses
import json
import posixpath
import tarfile

from tokenmill.transforms import fs
from tokenmill.transforms.records import ErrorRecord


@dataclasses.dataclass(frozen=True)
class TarSample:
    name: str  # the main member's path in the tar
    offset: int  # where its data starts in the tar file
    size: int
    meta: str | None  # the sidecars, as JSON: {"json": ..., "txt": ...}


def safe_member(name: str) -> bool:
    norm = posixpath.normpath(name)
    return not (name.startswith("/") or norm.startswith("..") or "/../" in f"/{norm}/")


def index_tar(uri: str, extensions: tuple[str, ...]) -> tuple[list[TarSample], list[ErrorRecord]]:
    """The samples of a plain tar whose main member has one of `extensions`, in tar order, and the errors."""
    entries: dict[str, dict] = {}  # key → {"main": (name, offset, size), "meta": {...}}, in tar order
    errors: list[ErrorRecord] = []
    with fs.open_binary(uri) as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for member in tar:
                    if not safe_member(member.name) or member.issym() or member.islnk():
                        errors.append(ErrorRecord(uri, f"member:{member.name}", "read", "UnsafeMember",
                                                  "tar member path escapes the archive, or is a link; not read"))
                        continue
                    if not member.isfile() or member.name.rsplit("/", 1)[-1].startswith("."):
                        continue
                    key, dot, ext = member.name.rpartition(".")
                    ext = "." + ext.lower() if dot else ""
                    entry = entries.setdefault(key, {"meta": {}})
                    if ext in extensions:
                        entry["main"] = (member.name, member.offset_data, member.size)
                    elif ext == ".json":
                        try:
                            entry["meta"]["json"] = json.loads(tar.extractfile(member).read())
                        except ValueError as e:
                            errors.append(ErrorRecord(uri, f"member:{member.name}", "read", "JSONDecodeError",
                                                      f"sidecar is not JSON: {e}"))
                    elif ext == ".txt":
                        entry["meta"]["txt"] = tar.extractfile(member).read().decode("utf-8", "replace")
        except (tarfile.TarError, EOFError, OSError) as e:
            errors.append(ErrorRecord(uri, "file", "read", type(e).__name__,
                                      f"tar cannot be listed to its end ({e}); members after the break are lost"))
    samples = [TarSample(*entry["main"], json.dumps(entry["meta"], sort_keys=True) if entry["meta"] else None)
               for entry in entries.values() if "main" in entry]
    return samples, errors
