"""Writing shards: direct I/O and its fallback, the render buffer, the pooled column buffers, allocator settings."""
from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tokenmill.schemas.manifest import read_manifest
from tokenmill.schemas.storage import RenderBuffer, write_file_direct
from tests.conftest import REPO, read_rows, run_build
from tokenmill.transforms.buffers import BufferPool
from tokenmill.transforms.write import DIRECT_MIN_BYTES, write_parquet_shard


def patch_table(rows: int, row_bytes: int, seed: int = 0) -> pa.Table:
    """Rows of incompressible bytes, like noisy patches, with a few plain columns."""
    rng = np.random.default_rng(seed)
    flat = rng.integers(0, 256, rows * row_bytes, dtype=np.uint8)
    offsets = (np.arange(rows + 1) * row_bytes).astype(np.int32)
    latents = pa.BinaryArray.from_buffers(pa.binary(), rows, [None, pa.py_buffer(offsets), pa.py_buffer(flat)])
    return pa.table({"id": pa.array([f"row{i}" for i in range(rows)]), "latents": latents,
                     "num_tokens": pa.array(np.full(rows, 7, np.int32))})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("compression", ["lz4", "zstd", "none"])
def test_direct_and_buffered_shards_are_byte_identical(tmp_path, compression):
    table = patch_table(12, 1 << 20)  # 12 MiB: over DIRECT_MIN_BYTES
    assert table.nbytes >= DIRECT_MIN_BYTES
    direct = write_parquet_shard(str(tmp_path / "direct.parquet"), table, 5, compression, direct_io=True)
    buffered = write_parquet_shard(str(tmp_path / "buffered.parquet"), table, 5, compression, direct_io=False)
    assert direct == buffered
    size, digest, groups = direct
    assert groups == (5, 5, 2)
    for name in ("direct.parquet", "buffered.parquet"):
        path = tmp_path / name
        assert path.stat().st_size == size and sha256(path) == digest  # the tail padding is cut off again
        assert pq.read_table(path).equals(table)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["buffered.parquet", "direct.parquet"]  # no temp files


def test_direct_write_uses_o_direct_and_refuses_what_it_cannot_do(tmp_path):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except OSError as e:
        pytest.skip(f"the filesystem under {tmp_path} refuses O_DIRECT ({e})")
    view = RenderBuffer().reserve(3 * 4096)
    view[:10000] = bytes(range(256)) * 39 + bytes(range(16))
    assert write_file_direct(str(tmp_path / "f"), view, 10000)
    assert (tmp_path / "f").read_bytes() == bytes(view[:10000])
    # no room to pad the tail to the alignment: refused, nothing written that stays
    assert not write_file_direct(str(tmp_path / "g"), view[:10000], 10000)


def test_direct_io_falls_back_where_the_filesystem_refuses_it(tmp_path, monkeypatch):
    """Filesystems without O_DIRECT (FUSE, some network ones; tmpfs before Linux 6.6) refuse it at open with EINVAL."""
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    real_open, refused = os.open, []

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    table = patch_table(10, 1 << 20)
    size, digest, _ = write_parquet_shard(str(tmp_path / "s.parquet"), table, None, "lz4", direct_io=True)
    assert refused and sha256(tmp_path / "s.parquet") == digest and (tmp_path / "s.parquet").stat().st_size == size
    assert pq.read_table(tmp_path / "s.parquet").equals(table)
    assert [p.name for p in tmp_path.iterdir()] == ["s.parquet"]


def test_render_buffer_grows_when_the_file_outgrows_it(tmp_path):
    """A table whose Parquet file is much bigger than its Arrow size (a row group per 10 bytes) still fits."""
    from tokenmill.transforms.write import _render_parquet

    table = pa.table({"v": pa.array(np.arange(1 << 20) % 3, pa.int8())})
    view, size = _render_parquet(table, 10, "none")
    assert size > 4 * table.nbytes
    assert pq.read_table(pa.BufferReader(pa.py_buffer(view[:size]))).equals(table)


def test_buffer_pool_reuses_a_buffer_only_once_nothing_holds_it():
    pool = BufferPool(keep=2)
    a = pool.empty(3 << 20, np.uint16)
    assert a.shape == (3 << 20,) and a.dtype == np.uint16
    address = a.__array_interface__["data"][0]
    column = pa.BinaryArray.from_buffers(pa.binary(), 1, [None, pa.py_buffer(np.array([0, 16], np.int32)),
                                                          pa.py_buffer(a[8:])])
    del a
    b = pool.empty(3 << 20, np.uint16)  # the column still holds the first: a new one
    assert b.__array_interface__["data"][0] != address
    del b, column
    c = pool.empty(6 << 20, np.uint8)  # same bytes, another type: the first buffer again
    assert c.__array_interface__["data"][0] == address
    small = pool.empty(100, np.int32)  # small arrays are plain numpy ones
    assert small.base is None and pool.pooled_bytes() == 2 * (8 << 20)  # 6 MiB, in 4 MiB steps


def test_direct_io_build_equals_a_page_cache_build(tmp_path):
    """Blocks over DIRECT_MIN_BYTES go through O_DIRECT; the shards and the manifest's hashes are the same."""
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (1024, 768, 3), dtype=np.uint8)).save(src / f"noise{i}.png")
    shards = {}
    for mode in ("auto", "off"):
        out = tmp_path / mode
        assert run_build(["--input", str(src / "*.png"), "--output", str(out), "--tokenizer", "patch:16",
                          "--block-size", "16MiB", "--direct-io", mode]) == 0
        m = read_manifest(str(out))
        assert m.rows == 6 and max(s["bytes"] for s in m.shards) >= DIRECT_MIN_BYTES
        for s in m.shards:
            assert sha256(out / s["path"]) == s["sha256"] and (out / s["path"]).stat().st_size == s["bytes"]
        shards[mode] = sorted((Path(s["path"]).name, s["sha256"]) for s in m.shards)
        assert read_rows(out).num_rows == 6
    assert shards["auto"] == shards["off"]


def test_freed_memory_settings_apply_once_and_can_be_turned_off():
    code = ("import ctypes; from tokenmill.pipelines.local import keep_freed_memory as k; "
            "print(k(), k())")
    on = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    off = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "TOKENMILL_MALLOC_TUNING": "0"})
    import platform

    assert on.stdout.split() == (["True", "True"] if platform.libc_ver()[0] == "glibc" else ["False", "False"])
    assert off.stdout.split() == ["False", "False"]
