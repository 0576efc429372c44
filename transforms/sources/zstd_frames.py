"""A zstd stream's frame structure, checked as its compressed bytes pass: a cut-off stream is an error.

Why: zstandard's stream_reader returns a clean EOF when its input ends in the
middle of a frame, so the records after the cut of a truncated `.jsonl.zst`
would vanish with no error row, and a truncated `.txt.zst` would become a
shorter document. `FrameCheckedSource` wraps the compressed file and walks the
frame headers (RFC 8878, section 3.1) as stream_reader reads through it: only
the headers are parsed, each block's body is skipped by its size, so the cost
is a few operations per 128 KiB block. At the end of the input it raises
TruncatedStream unless the last frame is complete.
"""
from __future__ import annotations

from typing import IO

_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE = 0x184D2A50  # to 0x184D2A5F
_FCS_BYTES = (0, 2, 4, 8)
_DICT_BYTES = (0, 1, 2, 4)


class TruncatedStream(EOFError):
    """A compressed stream whose input ends inside a frame."""


class FrameCheckedSource:
    """A readable wrapper over zstd-compressed bytes that checks every frame ends before the input does."""

    def __init__(self, raw: IO[bytes]):
        self._raw = raw
        self._pos = 0  # compressed bytes passed through
        self._buf = b""  # bytes of a header not yet complete
        self._skip = 0  # body bytes to pass before the next header
        self._state = "magic"  # what the next header is: magic, frame_header, block, checksum
        self._need = 4
        self._checksum = False

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        if data:
            self._walk(data)
        elif self._state != "magic" or self._buf or self._skip:
            raise TruncatedStream(f"zstd stream ends inside a frame, after {self._pos} compressed bytes")
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._raw.close()

    def _walk(self, data: bytes) -> None:
        i, n = 0, len(data)
        self._pos += n
        while i < n:
            if self._skip:
                step = min(self._skip, n - i)
                self._skip -= step
                i += step
                continue
            take = min(self._need - len(self._buf), n - i)
            self._buf += data[i:i + take]
            i += take
            if len(self._buf) < self._need:
                return
            self._header(self._buf)
            self._buf = b""

    def _header(self, h: bytes) -> None:
        if self._state == "magic":
            magic = int.from_bytes(h[:4], "little")
            if magic == _ZSTD_MAGIC:
                self._state, self._need = "descriptor", 1
            elif magic & 0xFFFFFFF0 == _SKIPPABLE:
                self._state, self._need = "skippable", 4
            else:  # not zstd at all: the decompressor itself says so
                self._state, self._need = "magic", 4
        elif self._state == "skippable":
            self._skip = int.from_bytes(h, "little")
            self._state, self._need = "magic", 4
        elif self._state == "descriptor":
            d = h[0]
            single = bool(d & 0x20)
            self._checksum = bool(d & 0x04)
            fcs = _FCS_BYTES[d >> 6] or (1 if single else 0)
            rest = (0 if single else 1) + _DICT_BYTES[d & 0x03] + fcs
            if rest:
                self._state, self._need = "frame_rest", rest
            else:
                self._state, self._need = "block", 3
        elif self._state == "frame_rest":
            self._state, self._need = "block", 3
        elif self._state == "block":
            value = int.from_bytes(h, "little")
            last, kind, size = value & 1, (value >> 1) & 3, value >> 3
            self._skip = 1 if kind == 1 else size  # an RLE block holds one byte
            if last:
                self._state, self._need = ("checksum", 4) if self._checksum else ("magic", 4)
        elif self._state == "checksum":
            self._state, self._need = "magic", 4
