"""Tar shards lose no sample silently: duplicate keys, a listing that stops early, a sidecar too deep to parse.

Each case runs a real build over a real tar (plain, read by byte range; gzip, streamed) and checks
that every main member ends as a data row or as its own error row, and a break as an error row at
its offset.
"""
from __future__ import annotations

import fractions
import gzip
import io
import json
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from tests.conftest import read_errors, read_rows, run_build

DEEP_JSON = b"[" * 100_000 + b"]" * 100_000


def jpeg(h: int, w: int, shade: int = 0) -> bytes:
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, shade)], -1)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def png(h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> tuple[bytes, list[int]]:
    """A plain tar of `members` in order (names may repeat), and the header offset of each."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    return data, offsets


def write_shard(folder: Path, data: bytes, compression: str) -> Path:
    if compression == "gz":
        path = folder / "shard.tar.gz"
        path.write_bytes(gzip.compress(data))
    else:
        path = folder / "shard.tar"
        path.write_bytes(data)
    return path


def build_images(path: Path, out: Path) -> tuple[dict, dict]:
    """Rows and errors of an image build over one shard, keyed by locator."""
    assert run_build(["--input", str(path), "--output", str(out), "--tokenizer", "patch:8", "--progress", "none",
                      "--max-error-fraction", "1"]) == 0
    rows = {r["locator"]: r for r in read_rows(out).to_pylist()}
    errors = {e["locator"]: e for e in read_errors(out)}
    assert all(e["source"] == str(path) for e in errors.values())
    return rows, errors


@pytest.mark.parametrize("compression", ["", "gz"])
def test_every_member_of_a_duplicate_key_is_a_row_or_a_duplicate_key_error(tmp_path, compression):
    """dup.jpg twice and twin.jpg beside twin.png used to keep one image of each key and drop the other."""
    data, _ = tar_bytes([("dup.jpg", jpeg(16, 24)), ("dup.json", b'{"n": 1}'), ("dup.jpg", jpeg(8, 40)),
                         ("dup.json", b'{"n": 2}'), ("twin.jpg", jpeg(24, 16)), ("twin.png", png(8, 8)),
                         ("ok.jpg", jpeg(8, 8))])
    rows, errors = build_images(write_shard(tmp_path, data, compression), tmp_path / "ds")
    assert sorted(rows) == ["member:dup.jpg", "member:ok.jpg", "member:twin.jpg"]
    # The first member of a key is the sample, with the first sidecar; later ones are error rows.
    dup = rows["member:dup.jpg"]
    assert (dup["height"], dup["width"], json.loads(dup["meta"])) == (16, 24, {"json": {"n": 1}})
    assert (rows["member:twin.jpg"]["height"], rows["member:twin.jpg"]["width"]) == (24, 16)
    assert {loc: (e["stage"], e["error_type"]) for loc, e in errors.items()} == {
        "member:dup.jpg": ("read", "DuplicateKey"), "member:dup.json": ("read", "DuplicateKey"),
        "member:twin.png": ("read", "DuplicateKey")}
    assert "twin.jpg" in errors["member:twin.png"]["message"]


def _corrupt_header(data: bytes, offset: int) -> bytes:
    bad = bytearray(data)
    bad[offset + 148:offset + 156] = b"nonsense"  # the header checksum
    return bytes(bad)


# How a tar can stop early: a header that is not one, the file cut at a header, or cut inside one.
BREAKS = {
    "corrupt-header": (lambda data, at: _corrupt_header(data, at), "CorruptTar"),
    "cut-at-header": (lambda data, at: data[:at], "TruncatedTar"),
    "cut-in-header": (lambda data, at: data[:at + 100], "TruncatedTar"),
    "junk-after-end": (lambda data, at: data + b"junk" * 10, "CorruptTar"),
}


@pytest.mark.parametrize("compression", ["", "gz"])
@pytest.mark.parametrize("kind", sorted(BREAKS))
def test_a_tar_that_stops_early_keeps_what_came_before_and_says_where_it_stopped(tmp_path, kind, compression):
    """tarfile reads a bad header mid-archive as the end of the archive: the listing used to end silently."""
    members = [(f"s{k}.jpg", jpeg(8, 8 + 8 * k, k)) for k in range(4)]
    data, offsets = tar_bytes(members)
    if kind == "junk-after-end":
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            last = tar.getmembers()[-1]
        stop = last.offset_data + -(-last.size // 512) * 512  # the end marker; the junk after it is no padding
        kept = [name for name, _ in members]
    else:
        stop = offsets[2]
        kept = ["s0.jpg", "s1.jpg"]
    broken, error_type = BREAKS[kind]
    rows, errors = build_images(write_shard(tmp_path, broken(data, stop), compression), tmp_path / "ds")
    assert sorted(rows) == [f"member:{name}" for name in kept]
    assert rows["member:s1.jpg"]["width"] == 16
    assert {loc: (e["stage"], e["error_type"]) for loc, e in errors.items()} == {
        f"offset:{stop}": ("read", error_type)}


@pytest.mark.parametrize("compression", ["", "gz"])
def test_a_tar_cut_inside_a_member_is_an_error_row_for_that_member(tmp_path, compression):
    """A stream cut inside s2.jpg used to say 'member-after:s1.jpg' ReadError; an index and a stream now agree."""
    data, offsets = tar_bytes([(f"s{k}.jpg", jpeg(8, 8 + 8 * k, k)) for k in range(4)])
    rows, errors = build_images(write_shard(tmp_path, data[:offsets[2] + 600], compression), tmp_path / "ds")
    assert sorted(rows) == ["member:s0.jpg", "member:s1.jpg"]
    assert [(loc, e["error_type"]) for loc, e in errors.items()] == [("member:s2.jpg", "TruncatedTar")]


def test_a_tar_without_its_end_marker_ends_in_an_error_row_after_its_last_sample(tmp_path):
    data, offsets = tar_bytes([("a.jpg", jpeg(8, 8)), ("b.jpg", jpeg(8, 8))])
    end = offsets[1] + 512 + -(-len(jpeg(8, 8)) // 512) * 512
    rows, errors = build_images(write_shard(tmp_path, data[:end], ""), tmp_path / "ds")
    assert sorted(rows) == ["member:a.jpg", "member:b.jpg"]
    assert [(loc, e["error_type"]) for loc, e in errors.items()] == [(f"offset:{end}", "TruncatedTar")]


@pytest.mark.parametrize("compression", ["", "gz"])
def test_a_sidecar_too_deep_to_parse_costs_only_its_own_sample(tmp_path, compression):
    """json.loads raised RecursionError on a sidecar nested 100k deep, which made the whole tar one error row."""
    data, _ = tar_bytes([("a.jpg", jpeg(8, 8)), ("a.json", DEEP_JSON), ("b.jpg", jpeg(8, 16)),
                         ("b.json", b'{"caption": "kept"}'), ("c.jpg", jpeg(8, 24)), ("c.json", b"{not json")])
    rows, errors = build_images(write_shard(tmp_path, data, compression), tmp_path / "ds")
    assert sorted(rows) == ["member:a.jpg", "member:b.jpg", "member:c.jpg"]
    assert rows["member:a.jpg"]["meta"] is None and rows["member:c.jpg"]["meta"] is None
    assert json.loads(rows["member:b.jpg"]["meta"]) == {"json": {"caption": "kept"}}
    assert {loc: e["error_type"] for loc, e in errors.items()} == {"member:a.json": "JSONTooDeep",
                                                                   "member:c.json": "JSONDecodeError"}


def tiny_mp4(n: int) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt, s.options = 32, 16, "yuv420p", {"preset": "ultrafast"}
        for i in range(n):
            f = av.VideoFrame.from_ndarray(np.full((16, 32, 3), 20 * i, np.uint8), format="rgb24")
            f.pts, f.time_base = i, fractions.Fraction(1, 10)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return buf.getvalue()


def test_a_video_tar_loses_no_sample_to_duplicates_deep_sidecars_or_a_bad_header(tmp_path):
    clip = tiny_mp4(4)
    data, offsets = tar_bytes([("a.mp4", clip), ("a.json", DEEP_JSON), ("a.mp4", tiny_mp4(2)), ("b.mp4", clip),
                               ("b.avi", clip), ("c.mp4", clip), ("d.mp4", clip)])
    path = tmp_path / "videos.tar"
    path.write_bytes(_corrupt_header(data, offsets[6]))
    out = tmp_path / "ds"
    assert run_build(["--input", str(path), "--output", str(out), "--tokenizer", "patch:2,16", "--clip-frames", "4",
                      "--modality", "video", "--progress", "none", "--max-error-fraction", "1"]) == 0
    rows = read_rows(out).to_pylist()
    assert sorted(r["locator"] for r in rows) == ["member:a.mp4#clip:0", "member:b.mp4#clip:0", "member:c.mp4#clip:0"]
    assert {r["locator"]: len(r["frame_indices"]) for r in rows}["member:a.mp4#clip:0"] == 4  # the first a.mp4
    assert {e["locator"]: e["error_type"] for e in read_errors(out)} == {
        "member:a.json": "JSONTooDeep", "member:a.mp4": "DuplicateKey", "member:b.avi": "DuplicateKey",
        f"offset:{offsets[6]}": "CorruptTar"}


@pytest.mark.parametrize("compression", ["", "gz"])
def test_a_key_without_its_image_is_an_error_row_not_a_silent_skip(tmp_path, compression):
    """x.json alone (a sidecar whose image never came) was skipped without a word; so was a key of unknown members.

    A member of an unknown kind beside a main member stays ignored (WebDataset samples carry extra parts), and a
    key whose main member already has an error row gets no second row.
    """
    data, _ = tar_bytes([("a.jpg", jpeg(8, 8)), ("a.cls", b"3"), ("lost.json", b'{"caption": "no image"}'),
                         ("lost.txt", b"no image"), ("b.jpg", jpeg(8, 16)), ("only.cls", b"7"),
                         ("link.jpg", b""), ("link.json", b"{}"), ("c.jpg", jpeg(8, 24))])
    data = _make_link(data, "link.jpg")
    rows, errors = build_images(write_shard(tmp_path, data, compression), tmp_path / "ds")
    assert sorted(rows) == ["member:a.jpg", "member:b.jpg", "member:c.jpg"]
    assert {loc: e["error_type"] for loc, e in errors.items()} == {
        "member:lost.json": "NoMainMember", "member:only.cls": "NoMainMember", "member:link.jpg": "UnsafeMember"}
    assert "lost.json, lost.txt" in errors["member:lost.json"]["message"]


def _make_link(data: bytes, name: str) -> bytes:
    """The tar with member `name` turned into a symlink (to /etc/passwd), its header checksum redone."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data)) as src, tarfile.open(fileobj=buf, mode="w") as dst:
        for m in src.getmembers():
            if m.name == name:
                m.type, m.linkname, m.size = tarfile.SYMTYPE, "/etc/passwd", 0
                dst.addfile(m)
            else:
                dst.addfile(m, src.extractfile(m))
    return buf.getvalue()
