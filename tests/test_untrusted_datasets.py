"""Readers do not trust a dataset: manifest paths stay inside it, a malformed manifest is one line, every shard's
sha256 is checked, and reports fetch nothing from the network."""
from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.conftest import ONE_WORKER, run_build, run_cli, write_jsonl
from tokenmill.schemas.validate import validate


class RecordingServer:
    """An HTTP server on 127.0.0.1 serving `folder`, recording every request it gets."""

    def __init__(self, folder: Path):
        requests = self.requests = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def handle_one_request(self) -> None:
                super().handle_one_request()
                if getattr(self, "command", None):
                    requests.append((self.command, self.path))

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                       functools.partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def server(tmp_path):
    (tmp_path / "served").mkdir()
    s = RecordingServer(tmp_path / "served")
    yield s
    s.close()


@pytest.fixture(scope="module")
def text_ds(tmp_path_factory) -> Path:
    """Two JSON-lines inputs, one with a line that is not JSON: data shards and an error shard."""
    folder = tmp_path_factory.mktemp("untrusted")
    write_jsonl(folder / "a.jsonl", [{"text": f"document {i}"} for i in range(5)])
    write_jsonl(folder / "b.jsonl", [{"text": "fine"}, "{not json"])
    out = folder / "ds"
    assert run_build(["--input", str(folder / "*.jsonl"), "--output", str(out), "--tokenizer", "bytes",
                      "--progress", "none"]) == 0
    raw = json.loads((out / "_manifest.json").read_text())
    assert len(raw["files"]) >= 1 and len(raw["error_files"]) == 1
    return out


def copy_with(ds: Path, to: Path, change: Callable[[dict[str, Any]], Any]) -> Path:
    """A copy of dataset `ds` at `to` whose root manifest `change` edited in place."""
    shutil.copytree(ds, to)
    raw = json.loads((to / "_manifest.json").read_text())
    change(raw)
    (to / "_manifest.json").write_text(json.dumps(raw))
    return to


def point(kind: str, path: str) -> Callable[[dict[str, Any]], None]:
    """Make the first data ('files') or error ('error_files') shard entry name `path`, everywhere it is listed."""
    entries = "shards" if kind == "files" else "error_shards"

    def change(raw: dict[str, Any]) -> None:
        raw[kind][0] = path
        raw[entries][0]["path"] = path
    return change


def test_a_manifest_path_outside_the_dataset_is_refused_by_every_reader(text_ds, tmp_path, server):
    """Each bad path names a real copy of the shard (or a served one), so a reader that followed it would succeed."""
    raw = json.loads((text_ds / "_manifest.json").read_text())
    shard, error_shard = text_ds / raw["files"][0], text_ds / raw["error_files"][0]
    shutil.copy(shard, tmp_path / "outside.parquet")
    shutil.copy(error_shard, tmp_path / "outside-errors.parquet")
    shutil.copy(shard, tmp_path / "served" / "x.parquet")
    cases = [("files", "../outside.parquet"), ("files", str(tmp_path / "outside.parquet")),
             ("files", f"file://{tmp_path}/outside.parquet"), ("files", f"{server.url}/x.parquet"),
             ("files", "data\\..\\..\\outside.parquet"), ("files", "data/../../outside.parquet"),
             ("files", "simplecache::" + f"{server.url}/x.parquet"), ("error_files", "../outside-errors.parquet")]
    for n, (kind, bad) in enumerate(cases):
        root = copy_with(text_ds, tmp_path / f"case{n}", point(kind, bad))
        problems = validate(str(root))
        assert len(problems) == 1 and f"'{kind}[0]' {bad!r} is not a path inside the dataset" in problems[0], \
            (bad, problems)
        from tokenmill.reports.inspect import inspect_dataset
        from tokenmill.schemas.manifest import ManifestError

        with pytest.raises(ManifestError, match="is not a path inside the dataset"):
            inspect_dataset(str(root), out_dir=str(tmp_path / "inspect"))
    assert server.requests == []
    # On the command line: validate says so in one line; inspect, report and files refuse in one line.
    root = tmp_path / "case0"
    for command in (["validate"], ["inspect"], ["report", "--out", str(tmp_path / "report")], ["files"]):
        proc = run_cli("tokenmill", command[0], str(root), *command[1:])
        assert proc.returncode == 1, (command, proc.stdout, proc.stderr)
        assert proc.stderr.strip() == (
            f"tokenmill {command[0]}: {'' if command[0] == 'validate' else 'failed: '}{root}/_manifest.json: damaged: "
            "'files[0]' '../outside.parquet' is not a path inside the dataset (a '..', '.' or empty segment)"), \
            proc.stderr


def test_manifest_paths_on_object_storage_stay_inside_the_root():
    import fsspec

    from tokenmill.schemas.manifest import ManifestError, dataset_path

    assert dataset_path("s3://bucket/ds", "versions/v/run/data/part-0.parquet") == \
        "s3://bucket/ds/versions/v/run/data/part-0.parquet"
    for bad in ("../other/x.parquet", "/x.parquet", "s3://other/x.parquet", "gs://b/x", "a\\b", "a//b", "",
                "./x", "C:x"):
        with pytest.raises(ManifestError, match="is not a path inside the dataset"):
            dataset_path("s3://bucket/ds", bad)
    mem = fsspec.filesystem("memory")
    mem.pipe("memory://trust/in/a.jsonl", b'{"text": "one"}\n{"text": "two"}\n')
    mem.pipe("memory://trust/elsewhere.parquet", b"")
    try:
        assert run_build(["--input", "memory://trust/in/a.jsonl", "--output", "memory://trust/ds",
                          "--tokenizer", "bytes", "--progress", "none"]) == 0
        assert validate("memory://trust/ds") == []
        raw = json.loads(mem.cat("memory://trust/ds/_manifest.json"))
        point("files", "../elsewhere.parquet")(raw)
        mem.pipe("memory://trust/ds/_manifest.json", json.dumps(raw).encode())
        assert validate("memory://trust/ds") == [
            "memory://trust/ds/_manifest.json: damaged: 'files[0]' '../elsewhere.parquet' is not a path inside "
            "the dataset (a '..', '.' or empty segment)"]
    finally:
        mem.rm("memory://trust", recursive=True)


def test_validate_checks_each_error_shard_against_its_sha256_and_row_count(text_ds, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = json.loads((text_ds / "_manifest.json").read_text())
    path = raw["error_files"][0]
    assert validate(str(text_ds)) == []
    # The same rows with another message: a changed file, found only by its sha256.
    changed = tmp_path / "changed"
    shutil.copytree(text_ds, changed)
    table = pq.read_table(changed / path)
    table = table.set_column(table.schema.get_field_index("message"), "message",
                             pa.array(["rewritten"] * table.num_rows, pa.string()))
    pq.write_table(table, changed / path)
    problem, total = validate(str(changed))
    assert problem.startswith(f"{path}: sha256 ") and problem.endswith("(file changed or corrupt)")
    assert total == "error shards hold 0 rows, manifest says 1"  # as for data shards: a changed shard counts no rows
    # An entry whose row count disagrees with its shard (the total still adds up).
    recount = copy_with(text_ds, tmp_path / "recount",
                        lambda m: m["error_shards"][0].update(errors=m["error_shards"][0]["errors"] + 1))
    assert validate(str(recount)) == [f"{path}: 1 error rows, manifest says 2"]


MALFORMED = [
    ("not JSON", lambda raw: "{not json", "not JSON: Expecting property name enclosed in double quotes"),
    ("a list", lambda raw: json.dumps([raw]), "not a JSON object but a list"),
    ("no files", lambda raw: json.dumps({k: v for k, v in raw.items() if k != "files"}), "no 'files' field"),
    ("rows a string", lambda raw: json.dumps({**raw, "rows": "7"}), "'rows' is a string, not an integer"),
    ("files a string", lambda raw: json.dumps({**raw, "files": "data/x.parquet"}),
     "'files' is a string, not a list"),
    ("a shard a number", lambda raw: json.dumps({**raw, "shards": [1]}), "'shards[0]' is an integer, not an object"),
    ("a shard without a path", lambda raw: json.dumps({**raw, "shards": [{"rows": 1}]}),
     "'shards[0].path' None is not a path inside the dataset (null, not a path)"),
    ("a sha256 a number", lambda raw: json.dumps({**raw, "shards": [{**raw["shards"][0], "sha256": 5}]}),
     "'shards[0].sha256' is an integer, not a string"),
    ("tokenizer a list", lambda raw: json.dumps({**raw, "tokenizer": []}), "'tokenizer' is a list, not an object"),
    ("not UTF-8", lambda raw: b"\xff\xfe{}", "not UTF-8 text (invalid start byte at byte 0)"),
]


def test_a_malformed_manifest_is_one_line_never_a_traceback(text_ds, tmp_path, capsys):
    from tokenmill.pipelines import commands

    raw = json.loads((text_ds / "_manifest.json").read_text())
    for n, (what, make, reason) in enumerate(MALFORMED):
        root = tmp_path / f"m{n}"
        shutil.copytree(text_ds, root)
        body = make(raw)
        (root / "_manifest.json").write_bytes(body if isinstance(body, bytes) else body.encode())
        capsys.readouterr()
        assert commands.validate([str(root)]) == 1, what
        err = capsys.readouterr().err
        assert err.startswith(f"tokenmill validate: {root}/_manifest.json: damaged: {reason}"), (what, err)
        assert len(err.strip().splitlines()) == 1, (what, err)
    proc = run_cli("tokenmill", "validate", str(tmp_path / "m1"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"tokenmill validate: {tmp_path}/m1/_manifest.json: damaged: not a JSON object " \
                                  "but a list"


def test_reports_fetch_nothing_a_dataset_names(tmp_path, server, capsys):
    """Sources and a vq codebook served by a local HTTP server: the build fetches them; report and inspect make no
    request, and say why the original and the reconstruction are not shown."""
    import numpy as np
    from PIL import Image

    from tokenmill.pipelines import commands, fit
    from tokenmill.reports.inspect import inspect_dataset

    served = tmp_path / "served"
    rng = np.random.default_rng(3)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(served / f"im{i}.png")
    assert fit.run(["--kind", "vq", "--input", str(served / "*.png"), "--output", str(served / "vq.npz"),
                    "--patch", "8", "--codes", "4", *ONE_WORKER]) == 0
    inputs = [a for i in range(2) for a in ("--input", f"{server.url}/im{i}.png")]
    for name, spec in (("patch", "patch:16"), ("vq", f"vq:{server.url}/vq.npz")):
        assert run_build([*inputs, "--output", str(tmp_path / name), "--tokenizer", spec, "--progress", "none"]) == 0
    assert server.requests  # the build read them
    server.requests.clear()
    capsys.readouterr()
    assert commands.report([str(tmp_path / "patch"), "--out", str(tmp_path / "r1")]) == 0
    page = (tmp_path / "r1" / "index.html").read_text()
    assert page.count("original not shown: source http://127.0.0.1:") == 2
    assert f"source {server.url}/im0.png is not a local file, and reports fetch nothing from the network" in page
    assert page.count('alt="reconstruction im') == 2  # labelled by file
    assert commands.report([str(tmp_path / "vq"), "--out", str(tmp_path / "r2")]) == 0
    page = (tmp_path / "r2" / "index.html").read_text()
    assert f"not available: tokenizer vq:{server.url}/vq.npz names a file that is not local" in page
    result = inspect_dataset(str(tmp_path / "vq"), rows=2, out_dir=str(tmp_path / "inspect"))
    assert all("names a file that is not local" in r["reconstruction_error"] for r in result["rows"])
    assert server.requests == []


def test_the_training_reader_trusts_no_manifest_path_and_checks_what_it_reads(tmp_path, text_ds):
    """Paths stay inside the dataset; a row group must hold the manifest's rows; sha256 on request."""
    import json
    import shutil

    import pyarrow.parquet as pq

    from tokenmill.loaders.dataset import DatasetMismatchError, TokenReader
    from tokenmill.schemas.manifest import ManifestError

    ds = tmp_path / "ds"
    shutil.copytree(text_ds, ds)
    raw = json.loads((ds / "_manifest.json").read_text())
    first = raw["shards"][0]["path"]
    assert sum(1 for _ in TokenReader(str(ds), shuffle=False, verify_sha256=True)) == raw["rows"]
    # A shard rewritten after its commit: fewer rows than the manifest says.
    table = pq.read_table(ds / first)
    pq.write_table(table.slice(0, table.num_rows - 1), ds / first)
    with pytest.raises(DatasetMismatchError, match="sha256"):
        TokenReader(str(ds), verify_sha256=True)
    with pytest.raises(DatasetMismatchError, match="rows; the manifest says"):
        list(TokenReader(str(ds), shuffle=False))
    # A manifest whose shard path leaves the dataset.
    for bad in ("../outside.parquet", "/etc/passwd", "http://127.0.0.1:1/x.parquet"):
        raw["shards"][0]["path"] = bad
        (ds / "_manifest.json").write_text(json.dumps(raw))
        with pytest.raises(ManifestError):
            TokenReader(str(ds))


def test_the_report_escapes_what_a_manifest_says(text_ds, tmp_path, capsys):
    """The tokenizer's kind came into the page as written: a manifest could put a script in it."""
    ds = tmp_path / "ds"
    shutil.copytree(text_ds, ds)
    raw = json.loads((ds / "_manifest.json").read_text())
    raw["tokenizer"]["kind"] = "<script>alert(1)</script>"
    (ds / "_manifest.json").write_text(json.dumps(raw))
    from tokenmill.pipelines import commands

    assert commands.report([str(ds), "--out", str(tmp_path / "r")]) == 0
    page = (tmp_path / "r" / "index.html").read_text()
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; tokens" in page
