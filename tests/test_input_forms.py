"""Inputs in forms the readers used to misread: a BOM before the first JSON line, Parquet text columns that
are dictionary-encoded or views, large JPEGs decoded at a reduced size. Each through a real build."""
from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import read_errors, read_rows, run_build
from tokenmill.transforms.tokenizers.byte_level import ByteTokenizer

BOM = b"\xef\xbb\xbf"
LINES = [b'{"text": "first"}', b'{"text": "second"}', b"", b'{"text": "third"}']


def texts_by_source(out: Path) -> dict[str, list[tuple[str, str]]]:
    """(locator, text) of every row, per input file name, in locator order."""
    got: dict[str, list[tuple[str, str]]] = {}
    for r in read_rows(out).to_pylist():
        got.setdefault(Path(r["source"]).name, []).append((r["locator"], ByteTokenizer("bytes").decode(r["tokens"])))
    return {name: sorted(rows, key=lambda lt: int(lt[0].split(":")[1]) if ":" in lt[0] else 0)
            for name, rows in got.items()}


@pytest.mark.parametrize("block_size", ["8MiB", "1", "2", "20"])
def test_a_bom_before_the_first_record_is_not_part_of_it(tmp_path, block_size):
    """A UTF-8 BOM at the start of a file made its first JSON line malformed (plain, .gz, .zst, any block size)."""
    import zstandard

    data = BOM + b"\n".join(LINES) + b"\n"
    src = tmp_path / "in"
    src.mkdir()
    (src / "bom.jsonl").write_bytes(data)
    (src / "bom.jsonl.gz").write_bytes(gzip.compress(data))
    (src / "bom.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    (src / "doc.txt").write_bytes(BOM + "one document, ünïcode".encode())
    (src / "plain.jsonl").write_bytes(b"\n".join(LINES) + b"\n")  # no BOM: offsets as before
    (src / "inner.jsonl").write_bytes(b'{"text": "a"}\n' + BOM + b'{"text": "b"}\n')  # a BOM mid-file is data
    out = tmp_path / "ds"
    assert run_build(["--input", str(src / "*"), "--output", str(out), "--tokenizer", "bytes",
                      "--block-size", block_size, "--progress", "none", "--max-error-fraction", "1"]) == 0
    got = texts_by_source(out)
    starts = [0, 4 + len(LINES[0]), 4 + len(LINES[0]) + len(LINES[1]) + 2]  # the lines start after the BOM's 3 bytes
    texts = ["first", "second", "third"]
    assert got["bom.jsonl"] == got["bom.jsonl.gz"] == got["bom.jsonl.zst"] == [
        (f"offset:{s}", t) for s, t in zip(starts, texts, strict=True)]
    assert got["plain.jsonl"] == [(f"offset:{max(0, s - 3)}", t) for s, t in zip(starts, texts, strict=True)]
    assert got["doc.txt"] == [("file", "one document, ünïcode")]
    assert got["inner.jsonl"] == [("offset:0", "a")]
    assert [(Path(e["source"]).name, e["locator"], e["error_type"]) for e in read_errors(out)] == [
        ("inner.jsonl", "offset:14", "JSONDecodeError")]


@pytest.mark.parametrize("column", [
    pa.array(["alpha", None, "beta", "alpha"]).dictionary_encode(),
    pa.array(["alpha", None, "beta", "alpha"], pa.large_string()).dictionary_encode(),
    pa.array(["alpha", None, "beta", "alpha"], pa.string_view()),
    pa.array(["alpha", None, "beta", "alpha"], pa.large_string()),
], ids=["dictionary-string", "dictionary-large-string", "string-view", "large-string"])
def test_dictionary_encoded_and_view_text_columns_are_read_as_strings(tmp_path, column):
    """Parquet text columns of these types were rejected as 'not string', every row an error."""
    src = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": column}), src, row_group_size=2)
    out = tmp_path / "ds"
    assert run_build(["--input", str(src), "--output", str(out), "--tokenizer", "bytes", "--progress", "none",
                      "--max-error-fraction", "1"]) == 0
    assert texts_by_source(out)["t.parquet"] == [("row:0", "alpha"), ("row:2", "beta"), ("row:3", "alpha")]
    assert [(e["locator"], e["error_type"]) for e in read_errors(out)] == [("row:1", "NonStringText")]


def test_orig_size_of_a_large_jpeg_is_its_true_size_not_the_reduced_decode(tmp_path):
    """PIL's draft() decodes a large JPEG at 1/2, 1/4 or 1/8 size; orig_height/orig_width took that size."""
    y, x = np.mgrid[0:800, 0:1200]
    img = Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8))
    src = tmp_path / "in"
    src.mkdir()
    img.save(src / "wide.jpg", quality=80)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter: 800 wide, 1200 high
    img.save(src / "turned.jpg", quality=80, exif=exif.tobytes())
    buf = io.BytesIO()
    img.save(buf, "PNG")
    (src / "wide.png").write_bytes(buf.getvalue())  # no draft for PNG: the reference
    out = tmp_path / "ds"
    assert run_build(["--input", str(src / "*"), "--output", str(out), "--tokenizer", "patch:16", "--size",
                      "native:256", "--progress", "none"]) == 0
    rows = {Path(r["source"]).name: r for r in read_rows(out).to_pylist()}
    sizes = {name: (r["orig_height"], r["orig_width"], r["height"], r["width"]) for name, r in rows.items()}
    assert sizes == {"wide.jpg": (800, 1200, 171, 256), "wide.png": (800, 1200, 171, 256),
                     "turned.jpg": (1200, 800, 256, 171)}
