"""Build progress: periodic lines with real counts on non-interactive output, on a real runner."""
from __future__ import annotations

import re

from tokenmill.schemas.manifest import read_manifest
from tests.conftest import TWO_PROCESSES, run_build, write_jsonl
from tokenmill.transforms.write import PROGRESS_DIR

LINE = re.compile(r"tokenmill build: progress: +(\d+)% of .*, inputs (\d+)/(\d+), rows (\d+), tokens (\d+) "
                  r"\(.*tokens/s\), errors (\d+), (.*)")


def _lines(err: str) -> list[tuple[int, ...]]:
    return [tuple(int(g) for g in m.groups()[:6]) + (m.group(7),) for m in map(LINE.match, err.splitlines()) if m]


def test_log_lines_count_rows_tokens_and_errors(tmp_path, capsys):
    for i in range(3):
        write_jsonl(tmp_path / f"in{i}.jsonl", [{"text": f"doc {i}.{j} " + "word " * 40} for j in range(2000)]
                    + ["{not json"])
    out = tmp_path / "ds"
    assert run_build(["--input", str(tmp_path / "*.jsonl"), "--output", str(out), "--tokenizer", "bytes",
                      "--block-size", "64k", "--progress", "log", "--progress-every", "0.05"],
                     runner=TWO_PROCESSES) == 0
    lines = _lines(capsys.readouterr().err)
    m = read_manifest(str(out))
    assert lines, "no progress lines on a non-interactive stderr"
    final = lines[-1]
    assert final[:6] == (100, 3, 3, m.rows, m.tokens, m.errors) and final[6].startswith("done in")
    assert (m.rows, m.errors) == (6000, 3)
    for before, after in zip(lines, lines[1:]):  # counts only grow
        assert all(a >= b for a, b in zip(after[:6], before[:6])), (before, after)
    assert not (out / PROGRESS_DIR).exists()  # the side channel is cleaned up
    timing = m.timing
    assert timing["started_at"] <= timing["blocks"][0][0] <= timing["finished_at"]
    assert sum(b[1] for b in timing["blocks"]) == m.rows and sum(b[3] for b in timing["blocks"]) == m.errors


def test_progress_none_prints_no_progress(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    assert run_build(["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "ds"), "--tokenizer",
                      "bytes", "--progress", "none"]) == 0
    assert "progress:" not in capsys.readouterr().err


def test_bad_progress_interval_is_a_usage_error(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    try:
        run_build(["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "ds"), "--tokenizer",
                   "bytes", "--progress-every", "0"])
    except SystemExit as e:
        assert e.code == 2
    assert "--progress-every must be a positive" in capsys.readouterr().err


def test_bar_ends_at_the_total_with_the_counts(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", [{"text": f"doc {j}"} for j in range(50)])
    assert run_build(["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "ds"), "--tokenizer",
                      "bytes", "--progress", "bar"]) == 0
    last = capsys.readouterr().err.split("\r")[-1]
    assert "100%" in last and "inputs 1/1, rows 50" in last and "errors 0" in last


def test_progress_records_are_written_whole_but_not_fsynced(tmp_path, monkeypatch):
    """A progress record only feeds the live display and is deleted at the end: no fsync (two per block cost
    seconds in a build of 10,000 small files); a shard or manifest written the same way still is."""
    import json
    import os

    from tokenmill.schemas import storage
    from tokenmill.transforms.records import ShardResult, TokenBlock
    from tokenmill.transforms.write import write_progress

    synced = []
    monkeypatch.setattr(storage.os, "fsync", lambda fd: synced.append(fd))
    result = ShardResult("in.jsonl", 3, None, "e.parquet", 0, 0, 2, 0, "", "", "f", written_at=12.5)
    write_progress(str(tmp_path), TokenBlock("in.jsonl", 3, None, [], nbytes=100), [result])
    [record] = (tmp_path / PROGRESS_DIR).iterdir()
    assert json.loads(record.read_text())["errors"] == 2 and synced == []
    assert [p.name for p in (tmp_path / PROGRESS_DIR).iterdir()] == [record.name]  # no temp file left
    storage.write_bytes_atomic(str(tmp_path / "durable.json"), b"{}")
    assert len(synced) >= 1 and os.path.exists(tmp_path / "durable.json")
