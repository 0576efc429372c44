"""Listing inputs: symlinks never loop or repeat a file, literal names win over globs, walks are bounded."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, read_errors, read_rows, run_build, write_jsonl
from tokenmill.schemas.manifest import read_manifest
from tokenmill.transforms import fs

DOCS = ("d1.jsonl", "d2.jsonl", "d3.jsonl")


def _three_docs(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, name in enumerate(DOCS):
        write_jsonl(folder / name, [{"text": f"document {i}"}])
    return folder


def _build(tmp_path: Path, *inputs: str) -> Path:
    out = tmp_path / "ds"
    args = [a for i in inputs for a in ("--input", i)]
    assert run_build([*args, "--output", str(out), "--tokenizer", "bytes", "--progress", "none"]) == 0
    return out


def _sources(out: Path) -> list[str]:
    return sorted(read_rows(out).column("source").to_pylist())


def _cli_build(tmp_path: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """`tokenmill build` in its own process, killed (and the test failed) past `timeout` seconds."""
    cmd = [sys.executable, "-m", "tokenmill", "build", *args, "--output", str(tmp_path / "ds"),
           "--tokenizer", "bytes", "--progress", "none"]
    try:
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"build still running after {timeout} s: {' '.join(cmd)}") from None


def test_a_symlink_to_an_ancestor_adds_no_rows(tmp_path):
    """`ln -s .. in/sub/loop` turned 3 documents into 123 rows (one copy per level the kernel allowed)."""
    sub = _three_docs(tmp_path / "in" / "sub")
    os.symlink("..", sub / "loop")
    start = time.monotonic()
    out = _build(tmp_path, str(tmp_path / "in"))
    assert time.monotonic() - start < 60
    assert _sources(out) == [str(sub / n) for n in DOCS]
    assert read_manifest(str(out)).rows == 3 and read_errors(out) == []
    for pattern in ("in/**/*.jsonl", "in/*/*.jsonl", "in/**"):
        assert [f.uri for f in fs.match(str(tmp_path / pattern))] == [str(sub / n) for n in DOCS], pattern
    # A path through the loop names real files: listed once, under the name given.
    assert [f.uri for f in fs.match(str(tmp_path / "in/sub/loop/sub/*.jsonl"))] == \
        [str(sub / "loop" / "sub" / n) for n in DOCS]


def test_two_symlink_loops_finish_listing_in_seconds(tmp_path):
    """Two loops gave 2^40 paths: the listing never finished."""
    sub = _three_docs(tmp_path / "in" / "sub")
    os.symlink("..", sub / "loop")
    os.symlink(".", sub / "self")
    os.symlink("../..", sub / "up2")  # above the input folder: still an ancestor
    (tmp_path / "stray.jsonl").write_text('{"text": "not an input"}\n')
    start = time.monotonic()
    proc = _cli_build(tmp_path, "--input", str(tmp_path / "in"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 120
    assert _sources(tmp_path / "ds") == [str(sub / n) for n in DOCS]


def test_links_to_the_same_file_or_folder_are_read_once_under_the_plain_name(tmp_path):
    inp = _three_docs(tmp_path / "in" / "real")
    os.symlink("real", inp.parent / "alias")  # a sibling folder by another name (sorts first)
    os.symlink("d1.jsonl", inp / "a-link.jsonl")  # a file by another name (sorts first)
    outside = _three_docs(tmp_path / "elsewhere")
    os.symlink(str(outside), inp.parent / "more")  # a folder outside the tree is followed: real inputs
    out = _build(tmp_path, str(inp.parent), str(inp / "a-link.jsonl"), str(inp.parent / "alias" / "d2.jsonl"))
    assert _sources(out) == [str(inp.parent / "more" / n) for n in DOCS] + [str(inp / n) for n in DOCS]
    assert read_manifest(str(out)).rows == 6
    # The same file named twice, once through a link: one input, one row.
    assert [f.uri for f in fs.match_all([str(inp / "a-link.jsonl"), str(inp / "d1.jsonl")])] == [str(inp / "d1.jsonl")]
    # A hard link is the same file too: the shorter name stays.
    os.link(inp / "d3.jsonl", inp / "d3-hard.jsonl")
    assert [f.uri for f in fs.match(str(inp / "d3*"))] == [str(inp / "d3.jsonl")]
    # A link alone keeps the name it was given.
    assert [f.uri for f in fs.match_all([str(inp / "a-link.jsonl")])] == [str(inp / "a-link.jsonl")]


def test_a_literal_name_with_glob_characters_names_that_file(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("[a].jsonl", "a.jsonl", "x*y.txt", "xzy.txt", "q?.jsonl", "qq.jsonl"):
        (inp / name).write_text(f'{{"text": "{name}"}}\n')
    for name in ("[a].jsonl", "x*y.txt", "q?.jsonl"):
        out = _build(tmp_path, str(inp / name))
        assert _sources(out) == [str(inp / name)], name
    # Where no such file exists the same characters are a glob.
    assert [f.uri.rsplit("/", 1)[-1] for f in fs.match(str(inp / "[ab].jsonl"))] == ["a.jsonl"]
    assert [f.uri.rsplit("/", 1)[-1] for f in fs.match(str(inp / "x?y.txt"))] == ["x*y.txt", "xzy.txt"]
    # A folder whose name holds glob characters is walked as that folder.
    (tmp_path / "[d]").mkdir()
    (tmp_path / "[d]" / "in.jsonl").write_text('{"text": "x"}\n')
    assert [f.uri for f in fs.match(str(tmp_path / "[d]"))] == [str(tmp_path / "[d]" / "in.jsonl")]


def test_a_literal_name_with_glob_characters_on_object_storage(tmp_path):
    import fsspec

    mem = fsspec.filesystem("memory")
    for name in ("[a].jsonl", "a.jsonl"):
        mem.pipe_file(f"/listing-{tmp_path.name}/{name}", b'{"text": "x"}\n')
    base = f"memory:///listing-{tmp_path.name}"
    assert [f.uri for f in fs.match(f"{base}/[a].jsonl")] == [f"{base}/[a].jsonl"]
    assert [f.uri for f in fs.match(f"{base}/[ab].jsonl")] == [f"{base}/a.jsonl"]


def test_a_walk_past_its_bounds_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    deep = tmp_path / "in" / "1" / "2" / "3" / "4"
    deep.mkdir(parents=True)
    write_jsonl(deep / "a.jsonl", [{"text": "deep"}])
    write_jsonl(tmp_path / "in" / "b.jsonl", [{"text": "b"}])
    argv = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "ds"), "--tokenizer", "bytes",
            "--progress", "none"]
    monkeypatch.setattr(fs, "MAX_LIST_DEPTH", 3)
    capsys.readouterr()
    with pytest.raises(SystemExit, match="2"):
        run_build(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tokenmill build: error: cannot list input {str(tmp_path / 'in')!r}: listing "
                   f"{tmp_path / 'in'} went more than 3 folders deep (at {deep}); list a narrower glob"]
    monkeypatch.setattr(fs, "MAX_LIST_DEPTH", 4)
    monkeypatch.setattr(fs, "MAX_LIST_FILES", 1)
    with pytest.raises(SystemExit, match="2"):
        run_build(argv)
    assert capsys.readouterr().err.strip().endswith(f"listing {tmp_path / 'in'} found more than 1 files; "
                                                    "list narrower globs")
    monkeypatch.setattr(fs, "MAX_LIST_FILES", 2)
    assert run_build(argv) == 0 and read_manifest(str(tmp_path / "ds")).rows == 2
