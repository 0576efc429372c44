"""Fuzzing the image readers (hypothesis): random WebDataset tars, plain and gzip, damaged at random, and damaged
image bytes.

Through the same pure functions the pipeline runs (plan_image_tasks → split_image_task → read_image_task →
decode_image_block), so hundreds of inputs cost seconds. Invariants:
- no exception escapes, and nothing hangs (hypothesis' deadline);
- no (source, locator) twice among rows and error rows;
- an intact archive comes back exactly: every sample a row, in order, with its sidecar;
- a damaged one keeps every sample that lies wholly before the damage, as a row;
- a damaged image is a row or an error row, never an exception;
- a member or image that claims to be huge costs no memory to reject.
"""
from __future__ import annotations

import gzip
import io
import json
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from tokenmill.transforms.decoders.images import SizePolicy, decode_image, decode_image_block
from tokenmill.transforms.records import InputFile
from tokenmill.transforms.sources.images import plan_image_tasks, read_image_task, split_image_task

POLICY = SizePolicy.parse("native:64")
MAX_PIXELS = 1 << 20


def _image(kind: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (6 + seed % 5, 7 + seed % 3, 3), dtype=np.uint8)).save(buf, kind)
    return buf.getvalue()


IMAGES = {k: [_image(k, s) for s in range(4)] for k in ("PNG", "JPEG")}


def _tar(samples: list[tuple[str, str, int, bool]]) -> tuple[bytes, dict[str, int]]:
    """A WebDataset tar: per sample KEY.EXT (+ KEY.json when asked). Returns the bytes and, per key, the
    offset where its last member's data ends."""
    buf = io.BytesIO()
    ends = {}
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, kind, seed, sidecar in samples:
            members = [(f"{key}.{'png' if kind == 'PNG' else 'jpg'}", IMAGES[kind][seed])]
            if sidecar:
                members.append((f"{key}.json", json.dumps({"caption": key}).encode()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                ends[key] = buf.tell()
    return buf.getvalue(), ends


def _run(path: Path):
    """(rows as (locator, meta), error rows as (locator, stage, type)) of one input file, as the pipeline reads it."""
    tasks, listing_errors = plan_image_tasks([InputFile(str(path), path.stat().st_size, "x")], 8)
    rows, errors = [], [(e.locator, e.stage, e.error_type) for e in listing_errors]
    for task in tasks:
        split = split_image_task(task, 3)
        finer, split_errors = split if split is not None else ([task], [])
        errors += [(e.locator, e.stage, e.error_type) for e in split_errors]
        for t in finer:
            for raw in read_image_task(t, "image", 3):
                block = decode_image_block(raw, POLICY, MAX_PIXELS)
                rows += list(zip(block.locators, block.metas))
                errors += [(e.locator, e.stage, e.error_type) for e in block.errors]
    return rows, errors


SAMPLES = st.lists(st.tuples(st.sampled_from(["PNG", "JPEG"]), st.integers(0, 3), st.booleans()),
                   min_size=1, max_size=7)
DAMAGE = st.one_of(
    st.none(),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("overwrite"), st.floats(0, 1), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=700)),
)


def _damage(data: bytes, damage) -> tuple[bytes, int]:
    """The damaged bytes, and the offset before which the original bytes are untouched."""
    if damage is None:
        return data, len(data)
    if damage[0] == "truncate":
        at = int(damage[1] * len(data))
        return data[:at], at
    if damage[0] == "overwrite":
        at = int(damage[1] * (len(data) - 1))
        patch = damage[2]
        return data[:at] + patch + data[at + len(patch):], at
    return data + damage[1], len(data)


@settings(max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(samples=SAMPLES, damage=DAMAGE, compressed=st.booleans())
def test_damaged_tars_keep_every_intact_sample_and_account_for_the_rest(tmp_path_factory, samples, damage,
                                                                        compressed):
    folder = tmp_path_factory.mktemp("tar")
    keyed = [(f"s{i:02d}", kind, seed, sidecar) for i, (kind, seed, sidecar) in enumerate(samples)]
    original, ends = _tar(keyed)
    data, intact = _damage(original, damage)
    if compressed:
        # The damage hits the stream a reader sees: the gzip's own bytes, not the tar inside it.
        packed = gzip.compress(original, mtime=0)
        data, intact_packed = _damage(packed, damage)
        intact = len(original) if intact_packed >= len(packed) else -1  # where inside the tar: unknown
    path = folder / ("shard.tar.gz" if compressed else "shard.tar")
    path.write_bytes(data)
    if not data:
        return  # a zero-byte file: planning's EmptyFile, covered elsewhere

    rows, errors = _run(path)

    seen = [loc for loc, _ in rows] + [loc for loc, _, _ in errors]
    assert len(seen) == len(set(seen)), f"a locator twice: {seen}"
    by_key = {loc.split(":", 1)[1].rsplit(".", 1)[0]: meta for loc, meta in rows if loc.startswith("member:")}
    whole = [key for key, *_ in keyed if ends[key] <= intact]
    if damage is None or (damage[0] == "append" and not compressed):
        assert [loc for loc, _ in rows] == [f"member:{k}.{'png' if kind == 'PNG' else 'jpg'}"
                                            for k, kind, _, _ in keyed]
        for key, _, _, sidecar in keyed:
            assert (json.loads(by_key[key])["json"] == {"caption": key}) if sidecar else by_key[key] is None
    for key in whole[:-1]:  # the last whole sample may still lose a sidecar that came after the damage
        assert key in by_key, f"{key} lay before the damage at {intact} but is not a row: {rows} {errors}"
    marker_end = -(-max(ends.values()) // 512) * 512 + 1024  # the end-of-archive marker (zeros after it pad)
    if damage is not None and damage[0] == "truncate" and len(data) < marker_end and not compressed:
        assert errors, f"a tar cut at {len(data)} of {marker_end} ended without an error row"


@settings(max_examples=200, deadline=5000)
@given(kind=st.sampled_from(["PNG", "JPEG"]), seed=st.integers(0, 3), at=st.floats(0, 1),
       patch=st.binary(min_size=1, max_size=32), cut=st.booleans())
def test_a_damaged_image_is_a_row_or_an_error_row(tmp_path_factory, kind, seed, at, patch, cut):
    original = IMAGES[kind][seed]
    i = int(at * (len(original) - 1))
    data = original[:i] if cut else original[:i] + patch + original[i + len(patch):]
    path = tmp_path_factory.mktemp("img") / f"x.{'png' if kind == 'PNG' else 'jpg'}"
    path.write_bytes(data)
    if not data:
        return
    rows, errors = _run(path)
    assert len(rows) + len(errors) == 1, (rows, errors)
    if errors:
        assert errors[0][1] in ("read", "decode")


def test_a_member_that_claims_gigabytes_costs_no_memory(tmp_path):
    """A tar header may say 8 GB; the reader must not try to hold it (a truncated member is an error row)."""
    header = tarfile.TarInfo("huge.jpg")
    header.size = 8 << 30
    data = header.tobuf(format=tarfile.GNU_FORMAT) + IMAGES["JPEG"][0]  # GNU: a base-256 size field
    path = tmp_path / "huge.tar"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        rows, errors = _run(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rows == [] and errors, errors
    assert peak < 32 << 20, f"{peak / 2**20:.0f} MiB to reject one member"


def test_an_image_that_claims_gigapixels_is_rejected_before_decoding():
    """A PNG header of 100000 x 100000 pixels over a few bytes of data: refused by its header, no decode."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))
    tracemalloc.start()
    try:
        try:
            decode_image(bomb, POLICY, MAX_PIXELS)
            raised = None
        except Exception as e:  # noqa: BLE001 - the type is what is checked
            raised = e
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert type(raised).__name__ == "DecompressionBomb", raised
    assert peak < 16 << 20
