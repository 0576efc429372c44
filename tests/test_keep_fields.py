"""--keep-fields: chosen source fields travel with each text row, typed, into its `meta` column."""
from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import REPO, read_errors, read_rows, run_build, write_jsonl
from tokenmill.schemas.manifest import read_manifest
from tokenmill.schemas.validate import validate

KEEP = "lang,url,meta.score:float64,meta.tags,info.n:int32"


def test_kept_fields_are_typed_per_source_format_and_a_mistyped_value_is_an_error_row(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    write_jsonl(src / "a.jsonl", [
        {"text": "hello", "lang": "en", "url": "http://x/1", "meta": {"score": 0.5, "tags": ["a", "b"]}},
        {"text": "bonjour", "lang": "fr", "meta": {"score": 2}},   # an int where float64 is declared: fine
        {"text": "bad", "lang": "de", "meta": {"score": "high"}},  # not a float64: an error row
        {"text": "bare"},                                           # no kept field at all: nulls
    ])
    pq.write_table(pa.table({"text": ["p0", "p1"], "lang": ["sv", None],
                             "info": pa.array([{"n": 7}, {"n": None}], pa.struct([("n", pa.int64())]))}),
                   src / "b.parquet")
    (src / "c.txt").write_text("a text file has no fields")
    out = tmp_path / "ds"
    assert run_build(["--input", str(src), "--output", str(out), "--tokenizer", "bytes", "--keep-fields", KEEP,
                      "--progress", "none"]) == 0
    rows = {(r["source"].rsplit("/", 1)[-1], r["locator"]): r["meta"] for r in read_rows(out).to_pylist()}
    null = {"lang": None, "url": None, "meta.score": None, "meta.tags": None, "info.n": None}
    assert rows == {
        ("a.jsonl", "offset:0"): {**null, "lang": "en", "url": "http://x/1", "meta.score": 0.5,
                                  "meta.tags": '["a","b"]'},
        ("a.jsonl", "offset:97"): {**null, "lang": "fr", "meta.score": 2.0},
        ("a.jsonl", "offset:210"): null,
        ("b.parquet", "row:0"): {**null, "lang": "sv", "info.n": 7},
        ("b.parquet", "row:1"): null,
        ("c.txt", "file"): null,
    }
    [error] = read_errors(out)
    assert (error["locator"], error["stage"], error["error_type"], error["message"]) == (
        "offset:153", "decode", "KeptFieldType", "kept field 'meta.score' is str 'high', not float64")
    m = read_manifest(str(out))
    assert m.options["keep_fields"] == "lang:string,url:string,meta.score:float64,meta.tags:string,info.n:int32"
    meta_type = pq.read_schema(out / m.files[0]).field("meta").type
    assert meta_type == pa.struct([("lang", pa.string()), ("url", pa.string()), ("meta.score", pa.float64()),
                                   ("meta.tags", pa.string()), ("info.n", pa.int32())])
    assert validate(str(out)) == []
    # DuckDB reads the struct natively.
    import duckdb

    files = [str(out / f) for f in m.files]
    langs = duckdb.sql(f"select meta.lang as lang from read_parquet({files}) where meta.lang is not null "
                       "order by lang").fetchall()
    assert langs == [("en",), ("fr",), ("sv",)]


def test_the_option_changes_the_version_and_without_it_rows_have_no_meta(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x", "lang": "en"}])
    out = tmp_path / "ds"
    base = ["--input", str(tmp_path / "a.jsonl"), "--output", str(out), "--tokenizer", "bytes", "--progress", "none"]
    assert run_build(base) == 0
    plain = read_manifest(str(out))
    assert "meta" not in read_rows(out).column_names and "keep_fields" not in plain.options
    assert run_build([*base, "--keep-fields", "lang"]) == 0
    kept = read_manifest(str(out))
    assert kept.version != plain.version and read_rows(out).column("meta").to_pylist() == [{"lang": "en"}]


def test_bad_keep_fields_are_usage_errors():
    for value, message in [("lang:nosuchtype", "'nosuchtype' is not an Arrow type"),
                           ("a..b", "'a..b' is not a field name"),
                           ("lang,lang", "lang is named twice")]:
        proc = subprocess.run([sys.executable, "-m", "tokenmill", "build", "--input", "samples/text/*", "--output",
                               "/tmp/tokenmill-never-written", "--tokenizer", "bytes", "--keep-fields", value],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        [line] = proc.stderr.strip().splitlines()
        assert line.startswith("tokenmill build: error: --keep-fields: ") and message in line, line
