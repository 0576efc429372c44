"""Fault injection: a build killed (SIGKILL) at each step of its commit leaves the previous commit intact, nothing
hangs, and a rerun equals an uninterrupted build.

The kill comes from a test seam in schemas/versions.py (TOKENMILL_FAULT=STEP): a real SIGKILL of the
process running the commit, at an exact step, which an outside `kill -9` can only hit by chance.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, read_rows, write_jsonl
from tokenmill.schemas.manifest import read_manifest
from tokenmill.schemas.validate import validate
from tokenmill.schemas.versions import FAULT_STEPS

IN_MEMORY = ["--runner=FnApiRunner", "--direct_num_workers=1", "--direct_running_mode=in_memory"]
TWO_PROCESSES = ["--runner=FnApiRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing"]


def _build(src, out, *extra, fault: str | None = None, runner=IN_MEMORY, timeout: float = 180):
    env = {k: v for k, v in os.environ.items() if k != "TOKENMILL_FAULT"}
    if fault:
        env["TOKENMILL_FAULT"] = fault
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tokenmill", "build", "--input", str(src), "--output", str(out),
                           "--tokenizer", "bytes", "--progress", "none", *extra, *runner],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    return proc, time.monotonic() - start


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    first, second = root / "first", root / "second"
    first.mkdir()
    write_jsonl(first / "a.jsonl", [{"text": f"first {i}"} for i in range(50)])
    second.mkdir()
    write_jsonl(second / "a.jsonl", [{"text": f"first {i}"} for i in range(50)])
    write_jsonl(second / "b.jsonl", [{"text": f"second {i}"} for i in range(70)])
    clean = root / "clean"
    assert _build(second, clean)[0].returncode == 0  # what an uninterrupted build of `second` makes
    return first, second, clean


@pytest.mark.parametrize("step", FAULT_STEPS)
def test_a_build_killed_at_each_commit_step_leaves_the_previous_commit_and_reruns_exactly(tmp_path, sources, step):
    first, second, clean = sources
    out = tmp_path / "ds"
    assert _build(first, out)[0].returncode == 0
    before = read_manifest(str(out))
    killed, seconds = _build(second, out, fault=step)
    assert killed.returncode == -9, killed.stderr  # it really died there
    assert seconds < 60
    now = read_manifest(str(out))
    flipped = FAULT_STEPS.index(step) >= FAULT_STEPS.index("after_root_manifest")
    if flipped:  # the flip happened: the new commit is whole
        assert now.rows == 120 and now.commit != before.commit
    else:
        assert now.commit == before.commit and now.rows == 50
    problems = validate(str(out))
    assert problems == [] or flipped and all("README.md" in p for p in problems), problems  # only the card lags
    # A version's own manifest never names a commit that was not published.
    published = {before.commit, now.commit}
    assert read_manifest(str(out), now.version).commit in published
    rerun, seconds = _build(second, out)  # the dead run's lease is broken, not waited on
    assert rerun.returncode == 0, rerun.stderr
    assert seconds < 60 and validate(str(out)) == []
    assert read_rows(out).equals(read_rows(clean))


@pytest.mark.parametrize("forked", ["1", "0"])
def test_a_worker_killed_while_committing_fails_the_build_in_bounded_time(tmp_path, sources, monkeypatch, forked):
    """With worker processes, the commit runs in a worker. Beam's runner waited forever for a dead worker
    (warm or cold); its death must end the build in one line."""
    monkeypatch.setenv("TOKENMILL_FORK_WORKERS", forked)
    first, second, _ = sources
    out = tmp_path / "ds"
    assert _build(first, out, runner=TWO_PROCESSES)[0].returncode == 0
    killed, seconds = _build(second, out, fault="after_lease", runner=TWO_PROCESSES, timeout=120)
    assert killed.returncode == 1 and seconds < 60
    assert killed.stderr.strip().splitlines()[-1].startswith(
        "tokenmill build: failed: a worker process died while the pipeline ran: "), killed.stderr
    assert "Traceback" not in killed.stderr
    assert read_manifest(str(out)).rows == 50 and validate(str(out)) == []
    assert _build(second, out, runner=TWO_PROCESSES)[0].returncode == 0 and read_manifest(str(out)).rows == 120


def test_three_concurrent_builds_give_one_commit_and_clean_refusals(tmp_path, sources):
    _, second, clean = sources
    out = tmp_path / "ds"
    procs = [subprocess.Popen([sys.executable, "-m", "tokenmill", "build", "--input", str(second), "--output",
                               str(out), "--tokenizer", "bytes", "--progress", "none", *IN_MEMORY],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(timeout=180), p.stderr.read()) for p in procs]
    assert all(code in (0, 1) for code, _ in results) and any(code == 0 for code, _ in results)
    for code, err in results:
        if code == 1:
            assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("tokenmill build: failed: ")
    assert validate(str(out)) == [] and read_rows(out).equals(read_rows(clean))
    assert len(read_manifest(str(out)).versions) == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: a real full disk (ENOSPC), where the tests run as root and may mount; else skipped."""
    if os.geteuid() != 0:
        pytest.skip("ENOSPC cases need root, to mount a small tmpfs")
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(disk, leave: int) -> None:
    """Fill the disk but `leave` bytes."""
    import shutil

    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


@pytest.mark.parametrize("leave", [0, 8192, 32768, 65536])
def test_a_full_disk_at_any_write_fails_in_one_line_and_keeps_the_previous_commit(small_disk, sources, leave):
    first, second, clean = sources
    out = small_disk / "ds"
    assert _build(first, out)[0].returncode == 0
    before = read_manifest(str(out))
    _fill(small_disk, leave)
    proc, seconds = _build(second, out)
    assert seconds < 60
    if proc.returncode == 0:  # it fitted
        assert read_manifest(str(out)).rows == 120 and validate(str(out)) == []
    else:
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("tokenmill build: failed: "), proc.stderr
        assert "No space left on device" in proc.stderr
        assert read_manifest(str(out)).commit == before.commit and validate(str(out)) == []
    (small_disk / "filler").unlink()
    rerun, _ = _build(second, out)
    assert rerun.returncode == 0, rerun.stderr
    assert validate(str(out)) == [] and read_rows(out).equals(read_rows(clean))


def test_a_launcher_killed_mid_build_leaves_no_workers_and_no_temp_folder(tmp_path):
    """Its warm workers and their zygote used to outlive a kill -9 by about 20 s, and their folder stayed."""
    import signal
    import tempfile
    from pathlib import Path

    short = Path(tempfile.mkdtemp(prefix="tmz", dir="/tmp"))  # the zygote's socket path must stay short
    big = tmp_path / "big"
    big.mkdir()
    for i in range(6):
        write_jsonl(big / f"part-{i}.jsonl", [{"text": f"shard {i} line {j} " * 30} for j in range(2000)])
    launcher = subprocess.Popen([sys.executable, "-m", "tokenmill", "build", "--input", str(big), "--output",
                                 str(tmp_path / "ds"), "--tokenizer", "bytes", "--block-size", "256KiB",
                                 "--progress", "none", *TWO_PROCESSES], cwd=REPO, env={**os.environ, "TMPDIR": str(short)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def workers() -> list[str]:
        found = subprocess.run(["pgrep", "-f", str(short)], capture_output=True, text=True).stdout.split()
        return found

    try:
        deadline = time.monotonic() + 60
        while not workers() and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.1)
        assert workers(), "the build's workers never started"
        assert list(short.glob("tokenmill-workers-*"))
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 10
        while (workers() or list(short.glob("tokenmill-workers-*"))) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert workers() == [] and list(short.glob("tokenmill-workers-*")) == []
    finally:
        launcher.kill()
        import shutil

        shutil.rmtree(short, ignore_errors=True)


def test_every_file_a_commit_names_is_on_disk_before_the_manifest_that_names_it(tmp_path, monkeypatch):
    """Power loss: data shards were written without any sync, so a crash could leave a committed shard torn.

    The commit syncs the dataset's filesystem (syncfs) once, after every shard is in place (direct-I/O and
    streamed shards alike) and before the manifest; error shards and manifests are fsynced under their temporary
    name and their folder after the rename.
    """
    from tests.conftest import run_build, write_jsonl
    from tokenmill.schemas import storage
    from tokenmill.transforms import write

    events: list[tuple[str, str]] = []
    real_fsync, libc = os.fsync, storage._libc()

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    class Libc:
        def syncfs(self, fd):
            path = os.readlink(f"/proc/self/fd/{fd}")
            events.append(("syncfs", path))
            events.extend(("present", str(p)) for p in sorted(Path(path).rglob("*.parquet")))
            return libc.syncfs(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(storage, "_libc", Libc)
    monkeypatch.setattr(write, "DIRECT_MIN_BYTES", 1 << 20)
    direct: list[str] = []
    real_direct = write.write_file_direct
    monkeypatch.setattr(write, "write_file_direct", lambda path, *a: direct.append(path) or real_direct(path, *a))
    src = tmp_path / "in"
    src.mkdir()
    write_jsonl(src / "big.jsonl", [{"text": "x" * 4000 + str(i)} for i in range(1000)])  # one ~4 MB shard
    write_jsonl(src / "small.jsonl", [{"text": "short"}, {"nottext": 1}])  # a small shard and an error shard
    out = tmp_path / "ds"
    assert run_build(["--input", str(src / "*.jsonl"), "--output", str(out), "--tokenizer", "bytes",
                      "--progress", "none"]) == 0
    m = read_manifest(str(out))
    assert len(m.files) == 2 and len(m.error_shards) == 1 and len(direct) == 1  # one shard by each path
    [at] = [i for i, (kind, path) in enumerate(events) if kind == "syncfs" and path == str(out)]
    present = {path for kind, path in events if kind == "present"}
    assert {str(out / f) for f in m.files} <= present  # every data shard was in place when the disk was synced
    for rel in [*(s["path"] for s in m.error_shards), "_manifest.json"]:
        final = out / rel
        synced = [i for i, (kind, p) in enumerate(events) if kind == "fsync" and os.path.dirname(p) == str(
            final.parent) and os.path.basename(p).startswith(f".{final.name}.") and p.endswith(".tmp")]
        assert synced, f"{rel} was never fsynced before its rename: {events}"
        assert ("fsync", str(final.parent)) in events, f"the folder of {rel} was never fsynced"
        if rel == "_manifest.json":
            assert synced[0] > at  # the manifest comes after the sync of what it names
