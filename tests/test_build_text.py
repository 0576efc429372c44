"""`tokenmill build` for text, run on a real Beam runner and read back from disk."""
from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tokenmill.schemas.manifest import read_manifest
from tokenmill.schemas.tables import read_metadata
from tests.conftest import (MULTILINGUAL, TWO_PROCESSES, read_errors, read_rows, run_build, run_cli,
                            write_jsonl, write_jsonl_zst, write_parquet_text)
from tokenmill.transforms.records import row_ids


@pytest.fixture
def good_inputs(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    write_jsonl(src / "a.jsonl", [{"text": t} for t in MULTILINGUAL])
    write_jsonl(src / "b.jsonl.gz", [{"text": t.upper()} for t in MULTILINGUAL], opener=gzip.open)
    write_jsonl_zst(src / "c.jsonl.zst", [{"text": t[::-1]} for t in MULTILINGUAL])
    write_parquet_text(src / "d.parquet", [t + "!" for t in MULTILINGUAL])
    (src / "e.txt").write_text(MULTILINGUAL[0] + "\n" + MULTILINGUAL[2], encoding="utf-8")
    return src


def test_build_writes_reference_ids_manifest_and_metadata(tmp_path, good_inputs, reference_cl100k):
    out = tmp_path / "out"
    assert run_build(["--input", str(good_inputs / "*"), "--output", str(out),
                      "--tokenizer", "tiktoken:cl100k_base", "--eos"]) == 0
    rows = read_rows(out)
    n = len(MULTILINGUAL)
    assert rows.num_rows == 4 * n + 1

    expected = {}
    for name, texts in [("a.jsonl", MULTILINGUAL), ("b.jsonl.gz", [t.upper() for t in MULTILINGUAL]),
                        ("c.jsonl.zst", [t[::-1] for t in MULTILINGUAL]),
                        ("d.parquet", [t + "!" for t in MULTILINGUAL]),
                        ("e.txt", [MULTILINGUAL[0] + "\n" + MULTILINGUAL[2]])]:
        for t in texts:
            expected.setdefault(str(good_inputs / name), []).append(reference_cl100k.encode_ordinary(t) + [100257])
    got = {}
    for r in rows.to_pylist():
        got.setdefault(r["source"], []).append((r["locator"], r["tokens"], r["num_tokens"], r["id"]))
        assert r["num_tokens"] == len(r["tokens"])
        assert r["id"] == row_ids(r["source"], [r["locator"]])[0]
    for source, want in expected.items():
        have = sorted(got[source], key=lambda x: (len(x[0]), x[0]))
        assert [h[1] for h in have] == want, source
    assert sorted(loc for loc, *_ in got[str(good_inputs / "d.parquet")]) == sorted(
        f"row:{i}" for i in range(n))
    assert [loc for loc, *_ in got[str(good_inputs / "e.txt")]] == ["file"]

    m = read_manifest(str(out))
    assert m.schema_version == 1 and m.modality == "text"
    assert m.rows == rows.num_rows and m.errors == 0 and m.error_files == []
    assert m.tokens == sum(rows.column("num_tokens").to_pylist())
    assert m.tokenizer["spec"] == "tiktoken:cl100k_base" and m.tokenizer["vocab_size"] == 100277
    assert m.tokenizer["special_token_policy"]["eos_id"] == 100257
    assert m.token_dtype == "uint32"
    assert sorted(i["uri"] for i in m.inputs) == sorted(str(p) for p in good_inputs.iterdir())
    assert all(i["size"] == Path(i["uri"]).stat().st_size for i in m.inputs)
    assert m.created_at and m.tokenmill_version
    for shard in m.shards:
        data = (out / shard["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        pf = pq.ParquetFile(out / shard["path"])
        assert pf.metadata.num_rows == shard["rows"]
        meta = read_metadata(pf.schema_arrow)
        assert meta["fingerprint"] == m.tokenizer["fingerprint"]
        assert str(pf.schema_arrow.field("tokens").type.value_type) == "uint32"
    written = sorted(str(p.relative_to(out)) for p in out.glob("versions/*/*/data/*.parquet"))
    assert written == sorted(m.files)


def test_bad_inputs_become_error_rows_and_the_run_goes_on(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    write_jsonl(src / "mixed.jsonl", [
        {"text": "good one"},
        '{"text": "unterminated',
        {"title": "no text field"},
        {"text": 42},
        {"text": ["a", "list"]},
        {"text": "good two"},
    ])
    (src / "bad.txt").write_bytes(b"valid start \xff\xfe invalid utf-8")
    (src / "empty.jsonl").write_bytes(b"")
    lines = b"".join(json.dumps({"text": f"record {i} " + "x" * (i % 50)}).encode() + b"\n"
                     for i in range(3000))
    (src / "trunc.jsonl.gz").write_bytes(gzip.compress(lines)[:-300])
    (src / "notes.csv").write_text("a,b\n")

    out = tmp_path / "out"
    assert run_build(["--input", str(src / "*"), "--output", str(out), "--tokenizer", "bytes"]) == 0
    summary = capsys.readouterr().out
    rows, errors = read_rows(out), read_errors(out)
    m = read_manifest(str(out))
    assert f"rows:       {m.rows}" in summary and f"errors:     {m.errors}" in summary
    # listing and planning, before the pipeline's own "done in", is a phase of its own in the summary
    planned = re.search(r"^  planning:   ([0-9.]+) s before the pipeline ran", summary, re.M)
    assert planned and 0 < float(planned.group(1)) < 60, summary

    by_source = {}
    for e in errors:
        by_source.setdefault(Path(e["source"]).name, []).append((e["stage"], e["error_type"]))
    assert by_source["mixed.jsonl"] == sorted([("decode", "JSONDecodeError"), ("decode", "MissingField"),
                                               ("decode", "NonStringText"), ("decode", "NonStringText")])
    assert by_source["bad.txt"] == [("decode", "UnicodeDecodeError")]
    assert by_source["empty.jsonl"] == [("read", "EmptyFile")]
    assert by_source["trunc.jsonl.gz"] == [("read", "EOFError")]
    assert by_source["notes.csv"] == [("read", "UnsupportedFormat")]
    assert all(e["message"] for e in errors)
    assert "invalid UTF-8 at byte 12" in next(e["message"] for e in errors if e["source"].endswith("bad.txt"))

    texts = {r["source"].rsplit("/", 1)[-1]: [] for r in rows.to_pylist()}
    for r in rows.to_pylist():
        texts[r["source"].rsplit("/", 1)[-1]].append(bytes(r["tokens"]).decode())
    assert sorted(texts["mixed.jsonl"]) == ["good one", "good two"]
    recovered = len(texts["trunc.jsonl.gz"])
    assert 0 < recovered < 3000
    assert texts["trunc.jsonl.gz"] == [f"record {i} " + "x" * (i % 50) for i in range(recovered)] or \
        sorted(texts["trunc.jsonl.gz"]) == sorted(f"record {i} " + "x" * (i % 50) for i in range(recovered))
    # The invariant: every record is a row or an error row (the truncation
    # error stands for the unreadable tail of its stream).
    assert m.rows == rows.num_rows == 2 + recovered
    assert m.errors == len(errors) == 4 + 1 + 1 + 1 + 1


def test_same_rows_and_files_with_one_and_two_workers(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for k in range(3):
        write_jsonl(src / f"s{k}.jsonl", [{"text": f"{k}:{i} " + MULTILINGUAL[i % len(MULTILINGUAL)]}
                                          for i in range(400)])
    write_jsonl(src / "bad.jsonl", ["{nope", {"text": "fine"}])
    outs = []
    three = [a.replace("=2", "=3") for a in TWO_PROCESSES]
    for name, runner in [("one", None), ("two", TWO_PROCESSES), ("three", three)]:
        out = tmp_path / name
        assert run_build(["--input", str(src / "*.jsonl"), "--output", str(out), "--tokenizer",
                          "tiktoken:cl100k_base", "--block-size", "4k"], runner=runner) == 0
        outs.append(out)
    one, *others = (read_rows(o) for o in outs)
    assert one.num_rows == 1201
    m1 = read_manifest(str(outs[0]))
    assert len(m1.shards) > 6
    for out, rows in zip(outs[1:], others):
        assert one.equals(rows)
        assert read_errors(outs[0]) == read_errors(out)
        m = read_manifest(str(out))
        assert m1.shards == m.shards  # same files with the same bytes
        assert m1.files == m.files and m1.error_files == m.error_files


def test_small_blocks_give_the_same_rows_as_one_block(tmp_path):
    src = tmp_path / "big.jsonl"
    write_jsonl(src, [{"text": f"doc {i} " + "word " * (i % 97)} for i in range(2000)])
    outs = []
    for size in ["1k", "64MiB"]:
        out = tmp_path / size
        assert run_build(["--input", str(src), "--output", str(out), "--tokenizer", "bytes",
                          "--block-size", size]) == 0
        outs.append(read_rows(out))
    assert outs[0].num_rows == 2000
    assert outs[0].equals(outs[1])


def test_txt_per_line_and_nested_text_field(tmp_path):
    data = b"first line\r\nsecond \xc3\xbc\n\n\nthird\nbad \xff line\n"
    (tmp_path / "lines.txt").write_bytes(data)
    out = tmp_path / "o1"
    assert run_build(["--input", str(tmp_path / "lines.txt"), "--output", str(out), "--tokenizer", "bytes",
                      "--txt-per-line"]) == 0
    rows = read_rows(out).to_pylist()
    assert sorted(bytes(r["tokens"]).decode() for r in rows) == ["first line", "second ü", "third"]
    assert [e["locator"] for e in read_errors(out)] == [f"offset:{data.index(b'bad')}"]

    write_jsonl(tmp_path / "n.jsonl", [{"doc": {"body": "deep"}}, {"doc": {}}])
    out2 = tmp_path / "o2"
    assert run_build(["--input", str(tmp_path / "n.jsonl"), "--output", str(out2), "--tokenizer", "bytes",
                      "--text-field", "doc.body"]) == 0
    assert [bytes(r["tokens"]) for r in read_rows(out2).to_pylist()] == [b"deep"]
    assert [e["error_type"] for e in read_errors(out2)] == ["MissingField"]


def test_overwrite_tokenizes_everything_again_into_a_new_commit(tmp_path, good_inputs):
    out = tmp_path / "out"
    args = ["--input", str(good_inputs / "a.jsonl"), "--output", str(out), "--tokenizer", "bytes"]
    assert run_build(args) == 0
    first = read_manifest(str(out))
    assert run_build(args + ["--overwrite"]) == 0
    again = read_manifest(str(out))
    assert again.version == first.version and again.commit != first.commit
    assert not set(again.files) & set(first.files)  # new shards, in the rerun's own folder
    assert read_rows(out).equals(read_rows(out, manifest=first))


@pytest.mark.parametrize("args,message", [
    (["--input", "/nonexistent/*.jsonl"], "matches no files"),
    (["--tokenizer", "nope:x"], "unknown tokenizer spec"),
    (["--tokenizer", "tiktoken:o999k_base"], "unknown tiktoken encoding"),
    (["--output", "/proc/tokenmill-out"], "cannot write to output"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--block-size", "lots"], "not a size"),
])
def test_cli_misuse_is_one_line_and_exit_code_2(tmp_path, args, message):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    base = {"--input": str(tmp_path / "a.jsonl"), "--output": str(tmp_path / "out"),
            "--tokenizer": "bytes"}
    for i in range(0, len(args) - 1, 2):
        if args[i] in base:
            base[args[i]] = args[i + 1]
    argv = [x for kv in base.items() for x in kv]
    if args[0] not in base:
        argv += args
    proc = run_cli("tokenmill.pipelines.build", *argv)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if "tokenmill" in l]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_documents_every_option():
    proc = run_cli("tokenmill.pipelines.cli", "build", "--help")
    assert proc.returncode == 0
    for flag in ["--input", "--output", "--tokenizer", "--text-field", "--eos", "--bos",
                 "--txt-per-line", "--block-size", "--overwrite", "tiktoken:cl100k_base", "hf:PATH_OR_URI"]:
        assert flag in proc.stdout


def test_long_runs_of_one_character_finish_with_reference_ids(tmp_path, reference_cl100k):
    docs = ["a" * 2_000_000, " " * 100_000, "x" + " " * 50_000 + "y"]
    write_jsonl(tmp_path / "runs.jsonl", [{"text": d} for d in docs])
    out = tmp_path / "out"
    assert run_build(["--input", str(tmp_path / "runs.jsonl"), "--output", str(out),
                      "--tokenizer", "tiktoken:cl100k_base"]) == 0
    got = sorted(read_rows(out).column("tokens").to_pylist(), key=len)
    assert got == sorted((reference_cl100k.encode_ordinary(d) for d in docs), key=len)


def test_fsspec_uris_in_and_out(tmp_path):
    """Inputs and output on a non-local fsspec filesystem (memory://, in-process runner)."""
    import fsspec

    mem = fsspec.filesystem("memory")
    mem.pipe("memory://bucket/in/a.jsonl", b"".join(json.dumps({"text": t}).encode() + b"\n"
                                                    for t in MULTILINGUAL))
    mem.pipe("memory://bucket/in/b.jsonl.gz", gzip.compress(b'{"text": "zipped"}\n{"bad"\n'))
    try:
        assert run_build(["--input", "memory://bucket/in/*", "--output", "memory://bucket/out",
                          "--tokenizer", "bytes"]) == 0
        m = json.loads(mem.cat("memory://bucket/out/_manifest.json"))
        assert m["rows"] == len(MULTILINGUAL) + 1 and m["errors"] == 1
        assert sorted(i["uri"] for i in m["inputs"]) == ["memory://bucket/in/a.jsonl",
                                                          "memory://bucket/in/b.jsonl.gz"]
        with mem.open("memory://bucket/out/" + m["files"][0], "rb") as f:
            assert pq.read_table(f).num_rows > 0
    finally:
        mem.rm("memory://bucket", recursive=True)


def test_shards_and_row_groups_are_sized_by_bytes_whatever_the_worker_count(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    write_jsonl(src / "big.jsonl", [{"text": f"row {i}: " + "granularity " * 50} for i in range(3000)])
    outs = []
    for name, runner in (("one", None), ("two", TWO_PROCESSES)):
        out = tmp_path / name
        assert run_build(["--input", str(src), "--output", str(out), "--tokenizer", "bytes", "--block-size", "4MiB",
                          "--shard-size", "600KiB", "--row-group-size", "100KiB"], runner) == 0
        outs.append(out)
    m = read_manifest(str(outs[0]))
    assert len(m.files) >= 2 and all(f.rsplit("-", 1)[-1].endswith(".parquet") for f in m.files)
    for shard in m.shards:
        pf = pq.ParquetFile(outs[0] / shard["path"])
        table = pf.read()
        assert table.nbytes <= 600 * 1024  # the uncompressed rows of a shard stay within --shard-size
        groups = [pf.metadata.row_group(i) for i in range(pf.metadata.num_row_groups)]
        assert len(groups) >= 4 and shard["row_groups"] == [g.num_rows for g in groups]
        assert max(table.slice(0, groups[0].num_rows).nbytes, 1) <= 110 * 1024
    two = read_manifest(str(outs[1]))
    assert [s["sha256"] for s in two.shards] == [s["sha256"] for s in m.shards] and two.files == m.files
    assert read_rows(outs[0]).num_rows == 3000


def test_a_small_build_runs_in_one_process_unless_the_user_chose_workers(tmp_path, capsys, monkeypatch):
    """Starting worker processes costs more than a tiny build (pipelines/local: small_build_args)."""
    from tokenmill.pipelines import build
    from tokenmill.pipelines.local import SMALL_BUILD_BYTES, local_defaults, small_build_args

    src = write_jsonl(tmp_path / "in.jsonl", [{"text": f"doc {i}"} for i in range(5)])
    assert build.run(["--input", str(src), "--output", str(tmp_path / "out"), "--tokenizer", "bytes",
                      "--progress", "none"]) == 0
    assert "runner FnApiRunner (in_memory, 1 worker)" in capsys.readouterr().err
    assert read_rows(tmp_path / "out").num_rows == 5
    defaults, _ = local_defaults([])
    assert small_build_args(defaults, [], SMALL_BUILD_BYTES - 1)[1] == "FnApiRunner (in_memory, 1 worker)"
    assert small_build_args(defaults, [], SMALL_BUILD_BYTES) is None
    for chosen in (["--direct_num_workers=2"], ["--direct_running_mode=multi_threading"], ["--runner=DirectRunner"]):
        assert small_build_args(local_defaults(chosen)[0], chosen, 10) is None, chosen
    monkeypatch.setenv("TOKENMILL_SMALL_BUILD_BYTES", "0")
    assert small_build_args(defaults, [], 10) is None
