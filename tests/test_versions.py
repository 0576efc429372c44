"""Versioned, incremental builds: reruns reuse unchanged inputs, new tokenizers add versions."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tokenmill.loaders.dataset import TokenReader
from tokenmill.schemas.manifest import read_manifest
from tokenmill.schemas.validate import validate
from tokenmill.schemas.versions import ConcurrentCommitError, commit, gc
from tests.conftest import read_errors, read_rows, run_build, write_jsonl


def counters(out: str) -> dict[str, int]:
    line = next(x for x in out.splitlines() if x.strip().startswith("counters:"))
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


def make_shards(folder: Path, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [write_jsonl(folder / f"shard-{i:03d}.jsonl",
                        [{"text": f"document {j} of shard {i}: " + "lorem ipsum " * (j % 5)} for j in range(20)])
            for i in range(start, start + n)]


def build(capsys, src: Path, out: Path, *extra: str, tokenizer: str = "bytes") -> tuple[int, dict[str, int], str]:
    code = run_build(["--input", str(src), "--output", str(out), "--tokenizer", tokenizer, *extra])
    text = capsys.readouterr().out
    return code, counters(text) if "counters:" in text else {}, text


def test_rerun_without_changes_tokenizes_nothing_and_leaves_the_manifest_alone(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    make_shards(src, 3)
    code, first, _ = build(capsys, src, out)
    assert code == 0 and first["inputs_to_tokenize"] == 3 and first["documents"] == 60
    before = (out / "_manifest.json").read_bytes()
    # every field of the Manifest is written, with its value (to_json dumps the fields without asdict's copy)
    assert json.loads(before) == dataclasses.asdict(read_manifest(str(out)))
    code, again, text = build(capsys, src, out)
    assert code == 0 and "up to date" in text
    assert again["inputs_to_tokenize"] == 0 and again["inputs_unchanged"] == 3
    assert again.get("documents", 0) == 0 and again.get("blocks", 0) == 0 and again["commits_unchanged"] == 1
    assert (out / "_manifest.json").read_bytes() == before


def test_adding_one_of_ten_shards_processes_only_that_shard(tmp_path, capsys):
    src, out, full = tmp_path / "in", tmp_path / "out", tmp_path / "full"
    make_shards(src, 9)
    assert build(capsys, src, out)[0] == 0
    old = read_manifest(str(out))
    make_shards(src, 1, start=9)
    code, c, _ = build(capsys, src, out)
    assert code == 0 and c["inputs_to_tokenize"] == 1 and c["inputs_unchanged"] == 9 and c["documents"] == 20
    assert c["shards_carried_over"] == 9
    new = read_manifest(str(out))
    assert new.version == old.version and new.parent == old.commit
    assert set(old.files) < set(new.files)  # the old shards are referenced, not rewritten
    assert build(capsys, src, full)[0] == 0
    assert read_rows(out).equals(read_rows(full)) and validate(str(out)) == []


def test_changed_and_removed_inputs(tmp_path, capsys):
    src, out, full = tmp_path / "in", tmp_path / "out", tmp_path / "full"
    shards = make_shards(src, 4)
    assert build(capsys, src, out)[0] == 0
    write_jsonl(shards[1], [{"text": "rewritten"}, {"oops": 1}])
    os.utime(shards[1], ns=(1, 1))  # a different mtime whatever the clock's resolution
    shards[2].unlink()
    code, c, _ = build(capsys, src, out)
    assert code == 0 and c["inputs_to_tokenize"] == 1 and c["inputs_unchanged"] == 2
    assert build(capsys, src, full)[0] == 0
    assert read_rows(out).equals(read_rows(full))
    assert read_errors(out) == read_errors(full) and len(read_errors(out)) == 1
    assert sorted(i["uri"] for i in read_manifest(str(out)).inputs) == sorted(str(p) for p in src.iterdir())


def test_new_tokenizer_makes_a_new_version_and_the_old_stays_readable(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    make_shards(src, 2)
    assert build(capsys, src, out)[0] == 0
    old = read_manifest(str(out))
    code, c, _ = build(capsys, src, out, tokenizer="tiktoken:cl100k_base")
    assert code == 0 and c["inputs_to_tokenize"] == 2 and c.get("shards_carried_over", 0) == 0
    new = read_manifest(str(out))
    assert new.version != old.version and new.tokenizer["spec"] == "tiktoken:cl100k_base"
    assert [v["version"] for v in new.versions] == [old.version, new.version]
    # the old version is still complete and readable, by tokenmill's reader and the training reader
    assert read_manifest(str(out), old.version).commit == old.commit
    old_rows = read_rows(out, old.version)
    assert old_rows.num_rows == 40 and bytes(old_rows.column("tokens")[0].as_py()).startswith(b"document")
    reader = TokenReader(str(out), version=old.version, shuffle=False)
    assert reader.manifest.tokenizer["spec"] == "bytes" and sum(1 for _ in reader) == 40
    assert validate(str(out)) == []


def test_gc_keeps_the_latest_versions_and_drops_unreferenced_files(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    make_shards(src, 2)
    for spec in ("bytes", "tiktoken:cl100k_base", "tiktoken:o200k_base"):
        assert build(capsys, src, out, tokenizer=spec)[0] == 0
    first, second = [v["version"] for v in read_manifest(str(out)).versions][:2]
    stray = out / "versions" / read_manifest(str(out)).version / "run-dead" / "data" / ".part-x.tmp"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"left by a killed run")
    report = gc(str(out), keep=2, grace_seconds=0)
    assert report.removed_versions == [first] and not (out / "versions" / first).exists()
    assert not stray.exists()
    m = read_manifest(str(out))
    assert [v["version"] for v in m.versions] == [second, m.version]
    assert validate(str(out)) == [] and read_rows(out, second).num_rows == 40


def test_commit_is_refused_when_another_run_committed_first(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    make_shards(src, 1)
    assert build(capsys, src, out)[0] == 0
    m = read_manifest(str(out))
    m.inputs = m.inputs + [{"uri": "elsewhere", "size": 1, "change_token": "x"}]
    with pytest.raises(ConcurrentCommitError, match="another run committed"):
        commit(str(out), m, base_commit="0123456789abcdef")
    assert read_manifest(str(out)).commit != m.commit or m.commit == ""
    assert validate(str(out)) == []


def test_loose_images_in_a_changed_group_are_carried_over_without_retokenizing(tmp_path, capsys):
    from PIL import Image

    src, out, full = tmp_path / "img", tmp_path / "out", tmp_path / "full"
    src.mkdir()
    for i in range(4):
        Image.new("RGB", (16 + 8 * i, 16), (40 * i, 90, 200)).save(src / f"im{i}.png")
    assert build(capsys, src, out, "--modality", "image", tokenizer="patch:8")[0] == 0
    Image.new("RGB", (24, 24), (1, 2, 3)).save(src / "im1.png")
    os.utime(src / "im1.png", ns=(1, 1))
    code, c, _ = build(capsys, src, out, "--modality", "image", tokenizer="patch:8")
    assert code == 0 and c["inputs_to_tokenize"] == 1 and c["shards_rewritten"] == 1 and c["documents"] == 1
    assert build(capsys, src, full, "--modality", "image", tokenizer="patch:8")[0] == 0
    assert read_rows(out).equals(read_rows(full)) and validate(str(out)) == []


def _big_shards(folder: Path, n: int, start: int = 0, lines: int = 300) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        write_jsonl(folder / f"big-{i:03d}.jsonl",
                    [{"text": f"shard {i} line {j}: " + "tokenization granularity matters. " * 40}
                     for j in range(lines)])


def _build_cmd(src: Path, out: Path, tokenizer: str = "tiktoken:cl100k_base") -> list[str]:
    import sys

    return [sys.executable, "-m", "tokenmill.pipelines.build", "--input", str(src), "--output", str(out),
            "--tokenizer", tokenizer, "--runner=FnApiRunner", "--direct_num_workers=1",
            "--direct_running_mode=in_memory"]


def test_sigkill_mid_write_leaves_the_old_commit_and_the_rerun_matches_an_uninterrupted_run(tmp_path):
    import signal
    import subprocess
    import time

    from tests.conftest import REPO

    src, out, twin = tmp_path / "in", tmp_path / "out", tmp_path / "twin"
    _big_shards(src, 2)
    subprocess.run(_build_cmd(src, out), cwd=REPO, check=True, capture_output=True, timeout=300)
    before = read_manifest(str(out))
    rows_before = read_rows(out)
    shutil.copytree(out, twin)
    _big_shards(src, 30, start=2)
    proc = subprocess.Popen(_build_cmd(src, out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        new = [p for p in out.glob("versions/*/run-*/data/*.parquet")
               if str(p.relative_to(out)) not in before.files]
        if new:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the build finished before it could be killed; give it more input"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert new, "no shard of the new run was written before the kill"
    # the previous commit is intact and readable
    assert read_manifest(str(out)).commit == before.commit
    assert validate(str(out)) == [] and read_rows(out).equals(rows_before)
    # the rerun produces exactly what an uninterrupted run produces
    subprocess.run(_build_cmd(src, out), cwd=REPO, check=True, capture_output=True, timeout=300)
    subprocess.run(_build_cmd(src, twin), cwd=REPO, check=True, capture_output=True, timeout=300)
    a, b = read_manifest(str(out)), read_manifest(str(twin))
    assert a.commit == b.commit and a.files == b.files
    assert [s["sha256"] for s in a.shards] == [s["sha256"] for s in b.shards]
    assert read_rows(out).equals(read_rows(twin)) and validate(str(out)) == []


def test_two_concurrent_runs_leave_a_valid_dataset(tmp_path):
    import subprocess

    from tests.conftest import REPO

    src, out = tmp_path / "in", tmp_path / "out"
    _big_shards(src, 6, lines=1000)  # long enough for the two runs to overlap
    # the same build twice at once: one commits, the other makes the same commit (a no-op)
    procs = [subprocess.Popen(_build_cmd(src, out), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    assert [r[2] for r in results] == [0, 0], results
    assert validate(str(out)) == [] and read_manifest(str(out)).rows == 6000
    # two different builds at once (two new versions): whoever commits second finds
    # that the dataset moved on since it started, and fails cleanly without writing
    procs = [subprocess.Popen(_build_cmd(src, out) + [flag], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for flag in ("--eos", "--bos")]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    assert sorted(r[2] for r in results) == [0, 1], results
    loser = next(r for r in results if r[2] == 1)
    lines = [x for x in loser[1].splitlines() if x.startswith("tokenmill build: failed")]
    assert len(lines) == 1 and "another run committed" in lines[0] and "Traceback" not in loser[1]
    m = read_manifest(str(out))
    winner = "eos_id" if results[0][2] == 0 else "bos_id"
    assert m.tokenizer["special_token_policy"][winner] is not None
    assert validate(str(out)) == [] and read_rows(out).num_rows == 6000


def test_retokenize_builds_a_new_version_from_the_recorded_sources(tmp_path, capsys):
    from tokenmill.pipelines import retokenize

    from tests.conftest import ONE_WORKER

    src, out = tmp_path / "in", tmp_path / "out"
    make_shards(src, 2)
    assert build(capsys, src, out, "--eos")[0] == 0
    old = read_manifest(str(out))
    assert old.build_args == ["--input", str(src), "--tokenizer", "bytes", "--eos", "--modality", "text"]
    make_shards(src, 1, start=2)  # arrived since: a retokenize lists the inputs again
    assert retokenize.run([str(out), "--tokenizer", "tiktoken:cl100k_base", *ONE_WORKER]) == 0
    new = read_manifest(str(out))
    assert new.version != old.version and new.tokenizer["spec"] == "tiktoken:cl100k_base"
    assert new.tokenizer["special_token_policy"]["eos_id"] == 100257 and new.rows == 60
    assert read_manifest(str(out), old.version).rows == 40  # the old version, still there
    # options given after DIR replace the recorded ones
    assert retokenize.run([str(out), "--tokenizer", "bytes", "--text-field", "nope", "--max-error-fraction", "1",
                           *ONE_WORKER]) == 0
    assert read_manifest(str(out)).rows == 0 and read_manifest(str(out)).errors == 60


def test_gc_command_and_its_misuse(tmp_path, capsys):
    from tests.conftest import run_cli

    src, out = tmp_path / "in", tmp_path / "out"
    make_shards(src, 1)
    for spec in ("bytes", "tiktoken:cl100k_base"):
        assert build(capsys, src, out, tokenizer=spec)[0] == 0
    dry = run_cli("tokenmill.pipelines.cli", "gc", str(out), "--keep", "1", "--dry-run")
    assert dry.returncode == 0 and "would remove 1 version(s)" in dry.stdout
    assert len(read_manifest(str(out)).versions) == 2
    done = run_cli("tokenmill.pipelines.cli", "gc", str(out), "--keep", "1")
    assert done.returncode == 0 and "removed 1 version(s)" in done.stdout
    assert len(read_manifest(str(out)).versions) == 1 and validate(str(out)) == []
    for bad in (["gc", str(out), "--keep", "0"], ["gc", str(tmp_path / "nothing"), "--keep", "2"]):
        r = run_cli("tokenmill.pipelines.cli", *bad)
        assert r.returncode == 2 and len([x for x in r.stderr.splitlines() if "tokenmill" in x]) == 1


def test_a_lease_left_by_a_killed_commit_is_broken(tmp_path):
    import socket
    import subprocess
    import sys

    from tokenmill.schemas.versions import LEASE_NAME, lease

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / LEASE_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead),
                                                   "time": __import__("time").time()}))
    with lease(str(tmp_path), wait=0.5):  # taken over at once, not after LEASE_STALE_SECONDS
        assert json.loads((tmp_path / LEASE_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LEASE_NAME).exists()
    # a live holder is waited for, then refused
    (tmp_path / LEASE_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                   "time": __import__("time").time()}))
    with pytest.raises(ConcurrentCommitError, match="holds the commit lease"):
        with lease(str(tmp_path), wait=0.5):
            pass
