"""Other tools read exactly the current version: HF datasets through the card, pyarrow, Polars and DuckDB
through `tokenmill files`, torch through TorchTokenDataset.

One dataset is built with the bytes tokenizer (uint16 IDs), copied, and the copy
retokenized to cl100k (uint32 IDs): its two versions then share `versions/`,
where a glob would mix them. Every tool's rows are checked against the shards
the manifest names, id for id and token for token.
"""
from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from tests.conftest import MULTILINGUAL, ONE_WORKER, read_rows, run_build, run_cli, write_jsonl
from tokenmill.schemas.card import CARD_MARKER, card_files, card_state
from tokenmill.schemas.manifest import Manifest, read_manifest
from tokenmill.schemas.validate import validate
from tokenmill.schemas.versions import gc


def build_args(src: Path, out: Path) -> list[str]:
    return ["--input", str(src / "*.jsonl"), "--output", str(out), "--tokenizer", "bytes", "--progress", "none"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("native-in")
    write_jsonl(src / "a.jsonl", [{"text": t} for t in MULTILINGUAL] + ["{not json"])
    write_jsonl(src / "b.jsonl", [{"text": f"document {i}: " + "lorem ipsum " * i} for i in range(12)])
    return src


@pytest.fixture(scope="module")
def first(sources, tmp_path_factory) -> Path:
    """The bytes build, in a folder whose name holds a quote (the DuckDB expression must quote it)."""
    out = tmp_path_factory.mktemp("native-out") / "reader's ds"
    assert run_build(build_args(sources, out)) == 0
    return out


@pytest.fixture(scope="module")
def retokenized(first, tmp_path_factory) -> Path:
    """A copy of `first` retokenized to cl100k: the bytes version stays beside the current one."""
    from tokenmill.pipelines import retokenize

    out = tmp_path_factory.mktemp("native-retok") / "reader's ds"
    shutil.copytree(first, out)
    assert retokenize.run([str(out), "--tokenizer", "tiktoken:cl100k_base", "--progress", "none", *ONE_WORKER]) == 0
    return out


@pytest.fixture(params=["first", "retokenized"])
def dataset(request) -> Path:
    return request.getfixturevalue(request.param)


def expected(root: Path, manifest: Manifest | None = None) -> dict[str, list[int]]:
    """id -> token IDs of the shards a manifest names (the current one by default)."""
    rows = read_rows(root, manifest=manifest).to_pylist()
    assert len(rows) == (manifest or read_manifest(str(root))).rows
    return {r["id"]: r["tokens"] for r in rows}


def by_id(ids, tokens) -> dict[str, list[int]]:
    ids, tokens = list(ids), [list(t) for t in tokens]
    assert len(set(ids)) == len(ids), "a row came twice: two versions were mixed"
    return dict(zip(ids, tokens))


def tokenmill_files(capsys, *argv: str) -> str:
    """The output of `tokenmill files ARGV` (the command's function, run here)."""
    from tokenmill.pipelines.commands import files

    capsys.readouterr()
    assert files(list(argv)) == 0
    return capsys.readouterr().out


def test_both_versions_share_the_versions_folder(first, retokenized):
    old, new = read_manifest(str(first)), read_manifest(str(retokenized))
    assert (old.token_dtype, new.token_dtype) == ("uint16", "uint32") and old.rows == new.rows > 0
    on_disk = sorted(str(p.relative_to(retokenized)) for p in retokenized.glob("versions/*/*/data/*.parquet"))
    assert on_disk == sorted(old.files + new.files)  # what a glob of versions/ would read: both versions
    assert read_manifest(str(retokenized), old.version).files == old.files


def test_every_commit_writes_a_card_naming_its_data_shards(dataset):
    m = read_manifest(str(dataset))
    text = (dataset / "README.md").read_text()
    assert text.startswith("---\nconfigs:\n- config_name: default\n") and CARD_MARKER in text
    assert card_files(text) == m.files and not set(m.error_files) & set(card_files(text))
    assert f"`{m.tokenizer['spec']}`" in text and f"rows: {m.rows}, tokens: {m.tokens}" in text
    assert card_state(str(dataset), m) == "current" and validate(str(dataset)) == []


@pytest.fixture
def offline_hf(monkeypatch, tmp_path):
    """HF datasets offline, caching under a temp folder, and any network connection refused."""
    import datasets
    import huggingface_hub.constants

    def no_network(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"tried to reach {address!r}")
        return real_connect(self, address)

    real_connect = socket.socket.connect
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import, maybe before this module
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(socket.socket, "connect", no_network)


def test_load_dataset_of_the_folder_reads_exactly_the_current_version(offline_hf, dataset):
    from datasets import load_dataset

    m = read_manifest(str(dataset))
    loaded = load_dataset(str(dataset))
    assert list(loaded) == ["train"] and loaded["train"].num_rows == m.rows
    train = loaded["train"]
    assert train.features["tokens"].feature.dtype == m.token_dtype
    assert by_id(train["id"], train["tokens"]) == expected(dataset)


def test_pyarrow_reads_the_shards_tokenmill_files_lists(capsys, dataset):
    import pyarrow.parquet as pq

    m = read_manifest(str(dataset))
    listed = tokenmill_files(capsys, str(dataset)).splitlines()
    assert listed == [f"{dataset}/{f}" for f in m.files]  # the manifest's files, joined with DIR
    table = pq.ParquetDataset(listed).read()
    assert str(table.schema.field("tokens").type.value_type) == m.token_dtype
    assert by_id(table["id"].to_pylist(), table["tokens"].to_pylist()) == expected(dataset)


def test_polars_reads_the_shards_tokenmill_files_lists(capsys, dataset):
    import polars as pl

    listed = tokenmill_files(capsys, str(dataset)).splitlines()
    want = expected(dataset)
    eager = pl.read_parquet(listed, columns=["id", "tokens"])
    assert by_id(eager["id"], eager["tokens"].to_list()) == want
    lazy = pl.scan_parquet(listed).collect()
    assert by_id(lazy["id"], lazy["tokens"].to_list()) == want
    assert lazy["num_tokens"].sum() == read_manifest(str(dataset)).tokens


def test_duckdb_runs_the_printed_expression(capsys, dataset):
    import duckdb

    m = read_manifest(str(dataset))
    printed = run_cli("tokenmill.pipelines.cli", "files", str(dataset), "--format", "duckdb")
    assert printed.returncode == 0 and printed.stderr == ""
    expression = printed.stdout
    assert expression.startswith("read_parquet(['") and "reader''s ds" in expression
    con = duckdb.connect()
    assert con.execute(f"SELECT count(*), sum(num_tokens) FROM {expression}").fetchone() == (m.rows, m.tokens)
    rows = con.execute(f"SELECT id, tokens FROM {expression}").fetchall()
    assert by_id([r[0] for r in rows], [r[1] for r in rows]) == expected(dataset)
    errors = tokenmill_files(capsys, str(dataset), "--format", "duckdb", "--errors").strip()
    assert con.execute(f"SELECT count(*) FROM {errors}").fetchone() == (m.errors,) and m.errors == 1


def test_torch_dataset_reads_the_current_version(dataset):
    from tokenmill import TorchTokenDataset

    samples = list(TorchTokenDataset(str(dataset), shuffle=False))
    assert by_id([s["id"] for s in samples], [s["tokens"].tolist() for s in samples]) == expected(dataset)


def test_files_json_and_an_older_version(capsys, first, retokenized):
    import duckdb

    new, old = read_manifest(str(retokenized)), read_manifest(str(first))
    listing = json.loads(tokenmill_files(capsys, str(retokenized), "--format", "json"))
    assert listing == {"root": str(retokenized), "version": new.version, "commit": new.commit, "rows": new.rows,
                       "tokens": new.tokens, "errors": new.errors,
                       "files": [f"{retokenized}/{f}" for f in new.files],
                       "error_files": [f"{retokenized}/{f}" for f in new.error_files]}
    assert tokenmill_files(capsys, str(retokenized), "--errors").splitlines() == listing["error_files"]
    # the bytes version, still kept: its own shards, uint16
    older = tokenmill_files(capsys, str(retokenized), "--version", old.version, "--format", "duckdb").strip()
    con = duckdb.connect()
    assert con.execute(f"SELECT count(*), sum(num_tokens) FROM {older}").fetchone() == (old.rows, old.tokens)
    assert con.execute(f"SELECT typeof(tokens) FROM {older} LIMIT 1").fetchone() == ("USMALLINT[]",)
    rows = con.execute(f"SELECT id, tokens FROM {older}").fetchall()
    assert by_id([r[0] for r in rows], [r[1] for r in rows]) == expected(first)


def test_files_misuse_is_one_line_and_exit_2(retokenized, tmp_path):
    for argv, says in ((["files", str(tmp_path)], "no _manifest.json"),
                       (["files", str(retokenized), "--version", "0123456789abcdef"], "no version '0123456789abcdef'"),
                       (["files", str(retokenized), "--format", "csv"], "invalid choice: 'csv'")):
        r = run_cli("tokenmill.pipelines.cli", *argv)
        assert r.returncode == 2 and r.stdout == "", argv
        assert r.stderr.startswith("tokenmill files: error: ") and says in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_readme_tokenmill_did_not_write_is_left_alone(first, sources, tmp_path, capsys):
    root = tmp_path / "ds"
    shutil.copytree(first, root)
    mine = "# My corpus\n\nHand-written notes.\n"
    (root / "README.md").write_text(mine)
    capsys.readouterr()
    assert run_build(build_args(sources, root)) == 0  # up to date: a commit that changes nothing
    out = capsys.readouterr().out
    assert "up to date" in out and "README.md is yours (no tokenmill marker): left as it is" in out
    assert (root / "README.md").read_text() == mine
    assert card_state(str(root), read_manifest(str(root))) == "foreign" and validate(str(root)) == []


def test_a_card_left_behind_by_a_killed_commit_is_reported_and_rewritten(first, retokenized, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(retokenized, root)
    # a run killed between its manifest flip and its card leaves the previous commit's card
    shutil.copy(first / "README.md", root / "README.md")
    assert [p for p in validate(str(root)) if p.startswith("README.md: ")] == [(
        f"README.md: the dataset card lists other files than commit {read_manifest(str(root)).commit}'s, so "
        "`datasets.load_dataset` reads another commit (the next build or `tokenmill gc` rewrites it)")]
    # gc rewrites it before removing anything, and keeps it
    report = gc(str(root), keep=1, grace_seconds=0)
    assert report.removed_versions == [read_manifest(str(first)).version]
    assert (root / "README.md").read_bytes() == (retokenized / "README.md").read_bytes()
    assert validate(str(root)) == []
