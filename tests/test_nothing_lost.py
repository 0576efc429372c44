"""Root fixes from the 'nothing lost, nothing hangs' pass: a wedged lease, a shard path written twice."""
from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import read_errors, read_rows, run_build, write_jsonl
from tokenmill.schemas.manifest import read_manifest
from tokenmill.schemas.validate import validate


def test_an_empty_lease_left_by_a_dead_run_is_broken_not_waited_on_forever(tmp_path):
    """kill -9 between creating the lease and writing it (or ENOSPC on the write) left an empty file."""
    from tokenmill.schemas.versions import LEASE_NAME, LEASE_UNREADABLE_SECONDS, lease

    write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    out = tmp_path / "ds"
    argv = ["--input", str(tmp_path / "a.jsonl"), "--output", str(out), "--tokenizer", "bytes", "--progress", "none"]
    assert run_build(argv) == 0
    (out / LEASE_NAME).write_bytes(b"")
    start = time.monotonic()
    assert run_build([*argv, "--overwrite"]) == 0
    assert time.monotonic() - start < LEASE_UNREADABLE_SECONDS + 30
    assert not (out / LEASE_NAME).exists() and validate(str(out)) == []
    # A lease that is not JSON at all is treated alike, and while it lasts it is waited for (with sleeps).
    (tmp_path / LEASE_NAME).write_bytes(b"\x00garbage")
    start = time.process_time()
    with lease(str(tmp_path), wait=60):
        pass
    assert time.process_time() - start < 1.0  # waited, did not spin


def _corrupt_second_row_group(path: Path) -> None:
    md = pq.read_metadata(path)
    offset = md.row_group(1).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset:offset + 40] = b"\xab" * 40
    path.write_bytes(bytes(data))


def test_a_read_task_that_fails_after_yielding_blocks_writes_its_own_error_shard(tmp_path):
    """Row group 0 holds null texts (error rows of block 0); row group 1 is corrupt, so the task fails after
    yielding block 0. Its dead-letter shard used to take block 0's error-shard path too."""
    src = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": pa.array([None, "kept", None, "also kept"], pa.string())}), src, row_group_size=2,
                   compression="none")
    _corrupt_second_row_group(src)
    out = tmp_path / "ds"
    assert run_build(["--input", str(src), "--output", str(out), "--tokenizer", "bytes", "--block-size", "100MiB",
                      "--progress", "none", "--max-error-fraction", "1"]) == 0
    m = read_manifest(str(out))
    assert len(m.error_files) == len(set(m.error_files)) == 2 and validate(str(out)) == []
    errors = read_errors(out)
    assert [(e["locator"], e["stage"]) for e in errors] == [("row:0", "decode"), ("row_groups:0-2", "read")]
    assert read_rows(out).column("locator").to_pylist() == ["row:1"]


def test_the_commit_refuses_a_shard_path_named_twice():
    from tokenmill.transforms.records import InputFile, ShardResult
    from tokenmill.transforms.write import build_manifest

    twin = ShardResult("s", 0, None, "_errors/part-x-000000.parquet", 0, 0, 1, 0, "", "h", "f")
    with pytest.raises(RuntimeError, match="written twice"):
        build_manifest([twin, twin], [InputFile("s", 1, "")], modality="text", options={},
                       tokenizer={"fingerprint": "f", "token_dtype": "uint16"})


@pytest.mark.parametrize("args,message", [
    (["--tokenizer", "patch:16", "--max-pixels", "0"], "--max-pixels must be 1 or more"),
    (["--tokenizer", "patch:2,16", "--modality", "video", "--decode-timeout", "0"], "--decode-timeout must be"),
    (["--tokenizer", "bytes", "--runner=Nope"], "--runner=Nope: Unexpected pipeline runner: Nope"),
])
def test_options_that_would_fail_every_record_are_one_line_usage_errors(tmp_path, args, message):
    from tests.conftest import run_cli

    (tmp_path / "a.png").write_bytes(b"")
    proc = run_cli("tokenmill.pipelines.cli", "build", "--input", str(tmp_path / "a.png"), "--output",
                   str(tmp_path / "o"), *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"tokenmill build: error: {message}"), \
        proc.stderr


def test_tokenmill_version():
    from tests.conftest import run_cli

    proc = run_cli("tokenmill", "--version")
    assert proc.returncode == 0 and proc.stdout.startswith("tokenmill ")


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".jsonl.gz"])
def test_a_truncated_compressed_stream_ends_in_an_error_row_at_the_break(tmp_path, suffix):
    """zstandard's stream reader ends cleanly on a cut-off frame: the records after the cut used to vanish."""
    import gzip

    import zstandard

    lines = b"".join(b'{"text": "record %05d"}\n' % i for i in range(20000))
    compress = zstandard.ZstdCompressor().compress if suffix.endswith("zst") else gzip.compress
    whole = compress(lines)
    src = tmp_path / f"cut{suffix}"
    src.write_bytes(whole[: len(whole) * 2 // 3])
    out = tmp_path / "ds"
    assert run_build(["--input", str(src), "--output", str(out), "--tokenizer", "bytes", "--block-size", "64KiB",
                      "--progress", "none"]) == 0
    kept = read_rows(out).num_rows
    [error] = read_errors(out)
    assert error["stage"] == "read" and error["error_type"] in ("TruncatedStream", "EOFError")
    assert "stream ended early" in error["message"]
    assert 0 < kept < 20000 and error["locator"] == f"offset:{kept * len(lines) // 20000}"
    # The whole stream reads whole.
    src.write_bytes(whole)
    assert run_build(["--input", str(src), "--output", str(out), "--tokenizer", "bytes", "--progress", "none"]) == 0
    assert read_rows(out).num_rows == 20000 and read_errors(out) == []


def test_a_truncated_zstd_text_file_is_an_error_not_a_shorter_document(tmp_path):
    import zstandard

    whole = zstandard.ZstdCompressor().compress(("all of it " * 20000).encode())
    (tmp_path / "doc.txt.zst").write_bytes(whole[:-10])
    (tmp_path / "ok.txt.zst").write_bytes(whole)
    out = tmp_path / "ds"
    assert run_build(["--input", str(tmp_path / "*.txt.zst"), "--output", str(out), "--tokenizer", "bytes",
                      "--progress", "none"]) == 0
    rows = read_rows(out).to_pylist()
    assert [r["source"].rsplit("/", 1)[-1] for r in rows] == ["ok.txt.zst"] and rows[0]["num_tokens"] == 200000
    [error] = read_errors(out)
    assert error["source"].endswith("doc.txt.zst") and error["locator"] == "file" and "ends inside a frame" in \
        error["message"]


def _three_versions(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "a.jsonl", [{"text": f"document {i}"} for i in range(30)])
    out = tmp_path / "ds"
    for spec in ("bytes", "tiktoken:cl100k_base", "tiktoken:o200k_base"):
        assert run_build(["--input", str(tmp_path / "a.jsonl"), "--output", str(out), "--tokenizer", spec,
                          "--progress", "none"]) == 0
    return out


def test_a_commit_refuses_to_publish_shards_that_are_gone(tmp_path):
    """gc (or a person) removed a shard between writing and committing: the commit fails and writes nothing."""
    from tokenmill.schemas.versions import MissingShardsError, commit

    out = _three_versions(tmp_path)
    m = read_manifest(str(out))
    (out / m.files[0]).unlink()
    m.inputs = m.inputs + [{"uri": "another input", "size": 1, "change_token": "x"}]  # a new commit's content
    before = (out / "_manifest.json").read_bytes()
    with pytest.raises(MissingShardsError, match=r"1 shard\(s\) this run wrote are gone"):
        commit(str(out), m, base_commit=m.commit)
    assert (out / "_manifest.json").read_bytes() == before


def test_gc_leaves_a_run_in_progress_alone_even_in_a_version_it_removes(tmp_path):
    """The shipped crontab runs gc without the build's lock: a run writing into an old version keeps its files."""
    import shutil

    from tokenmill.schemas.versions import gc

    import os

    out = _three_versions(tmp_path)
    hours_ago = time.time() - 7200
    for f in (out / "versions").rglob("*"):
        os.utime(f, (hours_ago, hours_ago))  # built two hours ago
    m = read_manifest(str(out))
    first = m.versions[0]["version"]
    old_run = next(p for p in (out / "versions" / first).iterdir() if p.is_dir())
    live = out / "versions" / first / "run-in-progress"
    shutil.copytree(old_run, live, copy_function=shutil.copy)  # fresh files: a rebuild of the first version, still writing
    report = gc(str(out), keep=1)
    assert first in report.removed_versions and not old_run.exists()
    assert live.exists() and sorted(p.name for p in (live / "data").iterdir())
    assert validate(str(out)) == []
    report = gc(str(out), keep=1, grace_seconds=0)  # once it is old (a dead run), it goes
    assert not live.exists() and validate(str(out)) == []


def test_gc_racing_a_build_never_yields_a_commit_with_missing_files(tmp_path):
    """gc with no grace at all, in a loop, while a build runs: the build either commits every file or fails in
    one line; the dataset validates after either."""
    import subprocess
    import sys

    from tests.conftest import REPO

    out = _three_versions(tmp_path)
    big = tmp_path / "big"
    big.mkdir()
    for i in range(6):
        write_jsonl(big / f"part-{i}.jsonl", [{"text": f"shard {i} line {j} " * 30} for j in range(2000)])
    build = subprocess.Popen([sys.executable, "-m", "tokenmill", "build", "--input", str(big), "--output", str(out),
                              "--tokenizer", "bytes", "--block-size", "256KiB", "--progress", "none",
                              "--runner=FnApiRunner", "--direct_num_workers=1", "--direct_running_mode=in_memory"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    gcs = 0
    while build.poll() is None:
        subprocess.run([sys.executable, "-m", "tokenmill", "gc", str(out), "--keep", "1", "--grace", "0"], cwd=REPO,
                       capture_output=True, timeout=120)
        gcs += 1
    _, err = build.communicate(timeout=300)
    assert gcs >= 1
    if build.returncode == 0:
        assert read_manifest(str(out)).rows == 6 * 2000
    else:
        assert build.returncode == 1 and "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("tokenmill build: failed: "), err
    assert validate(str(out)) == []


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl"])
def test_one_huge_record_is_an_error_row_skipped_in_linear_time_and_bounded_memory(tmp_path, suffix):
    """A 120 MB line: buffering once grew quadratically (a 1 GB line ran past 240 s) and held it all in memory."""
    import gzip

    src = tmp_path / f"huge{suffix}"
    size = 120 << 20
    # Written in pieces: this test's own memory must stay small for the peak RSS check below to mean anything.
    with (gzip.open(src, "wb", compresslevel=1) if suffix.endswith(".gz") else open(src, "wb")) as f:
        f.write(b'{"text": "before"}\n{"text": "')
        for _ in range(size >> 20):
            f.write(b"x" * (1 << 20))
        f.write(b'"}\n{"text": "after"}\n')
    huge = b'{"text": "' + b'"}\n'  # the long line's length, below, without holding it
    rss_before = _peak_rss_mib()
    start = time.monotonic()
    out = tmp_path / "ds"
    assert run_build(["--input", str(src), "--output", str(out), "--tokenizer", "bytes", "--max-doc-bytes", "1MiB",
                      "--block-size", "64KiB", "--progress", "none"]) == 0
    seconds = time.monotonic() - start
    assert sorted(read_rows(out).column("locator").to_pylist()) == ["offset:0", f"offset:{19 + len(huge) + size}"]
    [error] = read_errors(out)
    assert (error["locator"], error["error_type"]) == ("offset:19", "DocumentTooLarge")
    assert "--max-doc-bytes=1048576" in error["message"]
    assert seconds < 60  # linear: seconds here; the quadratic buffer took minutes
    assert _peak_rss_mib() - rss_before < 150  # never the whole line (or more) in memory


def test_max_doc_bytes_applies_to_parquet_text_values(tmp_path):
    src = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["short", "y" * 5000, None, "also short"]}), src)
    out = tmp_path / "ds"
    assert run_build(["--input", str(src), "--output", str(out), "--tokenizer", "bytes", "--max-doc-bytes", "4KiB",
                      "--progress", "none"]) == 0
    assert sorted(read_rows(out).column("locator").to_pylist()) == ["row:0", "row:3"]
    assert [(e["locator"], e["error_type"]) for e in read_errors(out)] == [("row:1", "DocumentTooLarge"),
                                                                          ("row:2", "NonStringText")]
