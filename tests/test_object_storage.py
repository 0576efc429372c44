"""Builds on s3:// and gs://, against real protocol servers on 127.0.0.1.

moto's S3 server and gcp-storage-emulator serve the requests; s3fs and gcsfs
find them the way a user's run would, through the standard environment
(AWS_ENDPOINT_URL_S3, STORAGE_EMULATOR_HOST, FSSPEC_GS_TOKEN, dummy keys), never
through tokenmill code. A guard refuses any connection off the loopback address.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Looked up, not imported: gcsfs reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT when imported (see `stores`).
pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("s3fs", "gcsfs", "moto", "gcp_storage_emulator")),
    reason="needs tokenmill[aws,gcp,test]")

import fsspec  # noqa: E402

from tokenmill.loaders.dataset import TokenReader  # noqa: E402
from tokenmill.schemas.manifest import read_manifest  # noqa: E402
from tokenmill.schemas.versions import FAULT_STEPS  # noqa: E402
from tokenmill.schemas.storage import is_transient, read_bytes, with_retries, write_bytes_atomic  # noqa: E402
from tests.conftest import MULTILINGUAL, REPO, TWO_PROCESSES, run_build, write_jsonl  # noqa: E402
from tokenmill.transforms import fs  # noqa: E402

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class S3Server:
    """moto in server mode on a fixed loopback port; stop() and start() keep its buckets (moto's state is
    per process), so a restart looks like an outage to the client."""

    def __init__(self, port: int):
        self.port, self._server = port, None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address=LOOPBACK, port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        self._server.stop()


@pytest.fixture(scope="module")
def loopback_only():
    """Refuse, in this process, any TCP connection that is not to 127.0.0.1."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def check(address) -> None:
        if isinstance(address, tuple) and address[0] not in (LOOPBACK, "localhost", "::1"):
            raise AssertionError(f"test tried to reach {address!r}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", lambda self, a: (check(a), real_connect(self, a))[1])
        mp.setattr(socket.socket, "connect_ex", lambda self, a: (check(a), real_connect_ex(self, a))[1])
        yield


@pytest.fixture(scope="module")
def stores(loopback_only, tmp_path_factory):
    """Both servers, and the environment a user would set to reach them (inherited by worker processes)."""
    from gcp_storage_emulator.server import create_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    s3 = S3Server(free_port())
    s3.start()
    gcs_port = free_port()
    gcs = create_server(LOOPBACK, gcs_port, in_memory=True)
    gcs.start()
    nowhere = str(tmp_path_factory.mktemp("no-aws-config") / "none")
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": f"http://{LOOPBACK}:{s3.port}",
        "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": nowhere, "AWS_SHARED_CREDENTIALS_FILE": nowhere,
        # botocore's own retries off, so that the retries under test are tokenmill's
        "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard",
        "STORAGE_EMULATOR_HOST": f"http://{LOOPBACK}:{gcs_port}",
        "FSSPEC_GS_TOKEN": "anon", "NO_GCE_CHECK": "true", "GCE_METADATA_HOST": LOOPBACK + ":9",
        # gcsfs otherwise asks the Storage Control gRPC API for each bucket's type
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        saved = {k: dict(v) for k, v in fsspec.config.conf.items()}
        fsspec.config.set_conf_env(fsspec.config.conf)  # what fsspec does at import, for this process
        fsspec.filesystem("s3").mkdir("bucket")
        fsspec.filesystem("gs").mkdir("bucket")
        yield s3
        fsspec.config.conf.clear()
        fsspec.config.conf.update(saved)
    gcs.stop()
    s3.stop()


def upload(local: Path, uri: str) -> None:
    for f in sorted(local.iterdir()):
        write_bytes_atomic(f"{uri}/{f.name}", f.read_bytes())


def rows_by_origin(root: str) -> dict[tuple[str, str], list[int]]:
    """Token IDs per (input file name, locator), read with the training reader."""
    m = read_manifest(root)
    origin = {}
    for shard in m.files:
        import pyarrow.parquet as pq

        with fs.open_binary(f"{root.rstrip('/')}/{shard}") as f:
            for r in pq.read_table(f, columns=["id", "source", "locator"]).to_pylist():
                origin[r["id"]] = (r["source"].rsplit("/", 1)[-1], r["locator"])
    return {origin[s["id"]]: s["tokens"].tolist() for s in TokenReader(root, shuffle=False)}


@pytest.fixture(scope="module")
def text_inputs(tmp_path_factory):
    src = tmp_path_factory.mktemp("text-in")
    write_jsonl(src / "a.jsonl", [{"text": t} for t in MULTILINGUAL] + ["{not json"])
    write_jsonl(src / "b.jsonl", [{"text": f"document {i} " * (i + 1)} for i in range(40)])
    (src / "c.txt").write_text("one whole document in a text file\n")
    return src


@pytest.fixture(scope="module")
def local_text(text_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "text"
    assert run_build(["--input", str(text_inputs), "--output", str(out), "--tokenizer", "tiktoken:cl100k_base",
                      "--eos", "--block-size", "1k"]) == 0
    m = read_manifest(str(out))
    assert m.rows + m.errors > len(MULTILINGUAL) + 40
    return rows_by_origin(str(out)), (m.rows, m.errors, m.tokens)


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_text_build_between_buckets_reads_back_like_a_local_build(stores, text_inputs, local_text, scheme, capsys):
    import pyarrow.parquet as pq

    from tokenmill.pipelines.commands import files
    from tokenmill.schemas.card import card_state

    src, out = f"{scheme}://bucket/raw-text", f"{scheme}://bucket/tokens/text"
    upload(text_inputs, src)
    runner = TWO_PROCESSES if scheme == "gs" else None  # worker processes find the stores through env too
    assert run_build(["--input", src, "--output", out, "--tokenizer", "tiktoken:cl100k_base", "--eos",
                      "--block-size", "1k"], runner) == 0
    m = read_manifest(out)
    rows, counts = local_text
    assert (m.rows, m.errors, m.tokens) == counts and m.rows == len(rows)
    assert [i["uri"] for i in m.inputs] == [f"{src}/{name}" for name in ("a.jsonl", "b.jsonl", "c.txt")]
    assert rows_by_origin(out) == rows
    # `tokenmill files` gives URIs other readers open as they are; the card lists the same shards
    capsys.readouterr()
    assert files([out]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed == [f"{out}/{f}" for f in m.files] and all(u.startswith(f"{scheme}://bucket/") for u in listed)
    with_rows = 0
    for uri in listed:
        with fs.open_binary(uri) as f:
            with_rows += pq.ParquetFile(f).metadata.num_rows
    assert with_rows == m.rows and card_state(out, m) == "current"


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_tokenizer_folders_and_models_in_buckets_load_like_local_ones(stores, hf_folders, sp_models, scheme,
                                                                      monkeypatch):
    """hf: reads a plain tokenizer.json where it lies; for transformers it copies the folder's small files
    (not weights) to a local temp folder. sentencepiece: reads the .model file."""
    from tokenmill.transforms.tokenizers import hf
    from tokenmill.transforms.tokenizers.spec import load_text_tokenizer

    root = f"{scheme}://bucket/tokenizers"
    for name in ("llama", "gpt2", "byte-level"):
        upload(hf_folders[name], f"{root}/{name}")
    write_bytes_atomic(f"{root}/llama/model.safetensors", b"\0" * 4096)  # weights beside the tokenizer
    write_bytes_atomic(f"{root}/bpe.model", sp_models["bpe"].read_bytes())
    read = []
    monkeypatch.setattr(hf, "SMALL_FILE", 1024)
    monkeypatch.setattr(hf, "read_bytes", lambda uri: read.append(uri) or read_bytes(uri))
    pairs = [(f"hf:{hf_folders[n]}", f"hf:{root}/{n}") for n in ("llama", "gpt2", "byte-level")]
    pairs.append((f"sentencepiece:{sp_models['bpe']}", f"sentencepiece:{root}/bpe.model"))
    for local, remote in pairs:
        here, there = load_text_tokenizer(local, eos=True), load_text_tokenizer(remote, eos=True)
        assert here.fingerprint() == there.fingerprint(), remote
        for text in MULTILINGUAL:
            assert here.encode(text).tolist() == there.encode(text).tolist(), (remote, text)
    assert f"{root}/llama/tokenizer.model" in read and f"{root}/llama/model.safetensors" not in read


def test_image_build_from_s3_to_s3_reads_back_like_a_local_build(stores, tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (24 + 8 * i, 40, 3), dtype=np.uint8)).save(src / f"img{i}.png")
    (src / "broken.png").write_bytes(b"not an image")
    upload(src, "s3://bucket/raw-images")
    args = ["--tokenizer", "patch:8"]
    assert run_build(["--input", str(src), "--output", str(tmp_path / "local"), *args]) == 0
    assert run_build(["--input", "s3://bucket/raw-images/*.png", "--output", "s3://bucket/tokens/images",
                      *args]) == 0
    m = read_manifest("s3://bucket/tokens/images")
    assert (m.rows, m.errors, m.modality) == (3, 1, "image")
    local = {s["id"]: s for s in TokenReader(str(tmp_path / "local"), shuffle=False)}
    remote = {s["id"]: s for s in TokenReader("s3://bucket/tokens/images", shuffle=False)}
    assert len(remote) == 3
    by_shape = lambda samples: sorted((s["grid"], s["latents"].tobytes()) for s in samples.values())  # noqa: E731
    assert by_shape(remote) == by_shape(local)


def restart_after(server: S3Server, seconds: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), server.start()), daemon=True)
    thread.start()
    return thread


def test_a_write_during_an_outage_lands_once_the_server_is_back(stores):
    stores.stop()
    back = restart_after(stores, 2.0)
    start = time.monotonic()
    write_bytes_atomic("s3://bucket/outage/written.bin", b"payload")
    assert time.monotonic() - start >= 1.5
    back.join()
    assert read_bytes("s3://bucket/outage/written.bin") == b"payload"


def test_a_read_cut_off_mid_file_resumes_at_the_same_offset(stores):
    data = bytes(range(256)) * 40_000  # 10 MB: more than one of s3fs's read-ahead blocks
    write_bytes_atomic("s3://bucket/outage/big.bin", data)
    with fs.open_binary("s3://bucket/outage/big.bin") as f:
        head = f.read(1000)
        stores.stop()
        back = restart_after(stores, 2.0)
        rest = f.read()
    back.join()
    assert head + rest == data


def test_build_survives_the_store_going_away_for_two_seconds(stores, text_inputs, local_text):
    """The server is down when the build starts and back 2 s later: the run completes, output correct."""
    upload(text_inputs, "s3://bucket/raw-outage")
    stores.stop()
    back = restart_after(stores, 2.0)
    assert run_build(["--input", "s3://bucket/raw-outage", "--output", "s3://bucket/tokens/outage",
                      "--tokenizer", "tiktoken:cl100k_base", "--eos", "--block-size", "1k"]) == 0
    back.join()
    assert rows_by_origin("s3://bucket/tokens/outage") == local_text[0]


def test_retries_back_off_and_give_up_on_permanent_errors():
    delays: list[float] = []
    calls = iter([ConnectionRefusedError(), TimeoutError(), "done"])

    def flaky():
        item = next(calls)
        if isinstance(item, Exception):
            raise item
        return item

    assert with_retries(flaky, "test", sleep=delays.append) == "done"
    assert len(delays) == 2 and 0.125 <= delays[0] <= 0.25 and 0.25 <= delays[1] <= 0.5
    with pytest.raises(FileNotFoundError):
        with_retries(lambda: (_ for _ in ()).throw(FileNotFoundError("gone")), "test", sleep=delays.append)
    assert len(delays) == 2
    with pytest.raises(ConnectionResetError):
        with_retries(lambda: (_ for _ in ()).throw(ConnectionResetError()), "test", attempts=3,
                     sleep=delays.append)
    assert len(delays) == 4


def test_transient_errors_are_told_from_permanent_ones(stores):
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(client_error("SlowDown", 503)) and is_transient(client_error("InternalError", 500))
    assert is_transient(client_error("Throttling", 400))
    assert not is_transient(client_error("AccessDenied", 403)) and not is_transient(client_error("NoSuchKey", 404))
    wrapped = OSError(5, "s3fs wraps it")
    wrapped.__cause__ = client_error("ServiceUnavailable", 503)
    assert is_transient(wrapped)
    assert not is_transient(PermissionError("denied")) and not is_transient(ValueError("bad"))
    from gcsfs.retry import HttpError

    assert is_transient(HttpError({"code": 503, "message": "backend"}))
    assert not is_transient(HttpError({"code": 404, "message": "missing"}))


def test_image_bytes_round_trip_through_the_retrying_reader(stores):
    buf = io.BytesIO()
    Image.new("RGB", (5, 3), (1, 2, 3)).save(buf, "PNG")
    write_bytes_atomic("s3://bucket/small/one.png", buf.getvalue())
    with fs.open_binary("s3://bucket/small/one.png") as f:
        assert np.asarray(Image.open(f).convert("RGB"))[0, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_commit_lease_is_exclusive_and_reruns_are_incremental_on_object_storage(stores, text_inputs, scheme,
                                                                                 capsys):
    from tokenmill.schemas.versions import ConcurrentCommitError, lease

    root = f"{scheme}://bucket/lease-{scheme}"
    # The lease is an exclusive create: S3's If-None-Match (moto honours it). For GCS,
    # gcsfs sends ifGenerationMatch=0, which GCS honours but gcp-storage-emulator
    # ignores, so only the S3 server can show the refusal here.
    with lease(root):
        if scheme == "s3":
            with pytest.raises(ConcurrentCommitError, match="holds the commit lease"):
                with lease(root, wait=0.5):
                    pass
    with lease(root, wait=0.5):  # released: free again
        pass
    src, out = f"{scheme}://bucket/inc-src", f"{scheme}://bucket/inc-out"
    upload(text_inputs, src)
    args = ["--input", src, "--output", out, "--tokenizer", "bytes", "--block-size", "1k"]
    assert run_build(args) == 0
    first = read_manifest(out)
    capsys.readouterr()
    assert run_build(args) == 0
    text = capsys.readouterr().out
    assert "up to date" in text and "inputs_to_tokenize=0" in text
    assert read_manifest(out).commit == first.commit
    write_bytes_atomic(f"{src}/d.jsonl", b'{"text": "arrived later"}\n')
    assert run_build(args) == 0
    assert "inputs_to_tokenize=1" in capsys.readouterr().out
    m = read_manifest(out)
    assert m.rows == first.rows + 1 and m.parent == first.commit


def s3_requests(work) -> dict[str, int]:
    """The S3 requests `work()` makes through fsspec's s3 filesystem (the instance tokenmill's calls get), by
    operation."""
    s3 = fsspec.filesystem("s3")
    s3.connect()
    calls: dict[str, int] = {}

    def count(model, **_):
        calls[model.name] = calls.get(model.name, 0) + 1

    s3.s3.meta.events.register("before-call.s3", count)
    try:
        work()
    finally:
        s3.s3.meta.events.unregister("before-call.s3", count)
    return calls


def test_listing_and_planning_on_s3_make_the_same_requests_for_10_files_as_for_40(stores):
    """The launcher lists a bucket in pages with each object's size and ETag (one ListObjectsV2 per 1,000 keys),
    never a request per file: a HEAD or GET per input would make 10,000 inputs cost 10,000 round trips before
    the pipeline starts (docs/benchmarks.md, Cost as work grows)."""
    from tokenmill.pipelines import build

    def requests_for(n: int) -> tuple[dict[str, int], dict[str, int]]:
        prefix = f"s3://bucket/listing-{n}"
        fsspec.filesystem("s3").pipe({f"bucket/listing-{n}/doc-{i:03d}.jsonl": b'{"text": "x"}\n'
                                      for i in range(n)})
        listed: list = []
        listing = s3_requests(lambda: listed.extend(fs.match(f"{prefix}/*.jsonl")))
        assert len(listed) == n and all(f.size == 14 and f.change_token.startswith("ETag=") for f in listed)
        planning = s3_requests(lambda: build.make_pipeline(
            ["--input", f"{prefix}/*.jsonl", "--output", f"s3://bucket/listing-out-{n}", "--tokenizer", "bytes"]))
        return listing, planning

    counts = {n: requests_for(n) for n in (10, 40)}
    assert counts[10] == counts[40], counts
    listing, planning = counts[40]
    assert listing.get("ListObjectsV2", 0) >= 1 and sum(listing.values()) <= 3, listing
    assert sum(planning.values()) < 20, planning


def test_progress_survives_the_store_going_away_mid_build(stores, tmp_path):
    """The store stops once the first progress record is written and is back 3 s later. The poller's reads fail
    with botocore's own errors (not OSError): each is skipped and counted, and the build's retried writes decide
    the exit, 0. A poller that died used to print a traceback."""
    import subprocess
    import sys

    from tests.conftest import REPO

    for i in range(3):
        write_jsonl(tmp_path / f"in{i}.jsonl", [{"text": f"doc {i}.{j} " + "word " * 40} for j in range(3000)])
    upload(tmp_path, "s3://bucket/raw-progress")
    out = "s3://bucket/tokens/progress"
    watcher = fsspec.filesystem("s3", skip_instance_cache=True)
    build = subprocess.Popen([sys.executable, "-m", "tokenmill", "build", "--input", "s3://bucket/raw-progress",
                              "--output", out, "--tokenizer", "bytes", "--block-size", "64k", "--progress", "log",
                              "--progress-every", "0.05", "--runner=FnApiRunner", "--direct_num_workers=1",
                              "--direct_running_mode=in_memory"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not watcher.glob("bucket/tokens/progress/.tokenmill-progress/*.json"):
            assert build.poll() is None and time.monotonic() < deadline, "no progress record was written"
            watcher.invalidate_cache()
            time.sleep(0.01)
        stores.stop()
        time.sleep(3.0)
        assert build.poll() is None, "the build ended before the outage did: nothing was tested"
        stores.start()
        stdout, stderr = build.communicate(timeout=300)
    finally:
        if build.poll() is None:
            build.kill()
    assert build.returncode == 0, stderr
    assert "Traceback" not in stderr and "Exception in thread" not in stderr, stderr
    progress = [line for line in stderr.splitlines() if line.startswith("tokenmill build: progress:")]
    m = read_manifest(out)
    assert (m.rows, m.errors) == (9000, 0)
    assert f"rows {m.rows}, tokens {m.tokens}" in progress[-2] and "done in" in progress[-2]
    skipped = re.fullmatch(r"tokenmill build: progress: (\d+) read\(s\) of the output for progress failed and were "
                           r"skipped \(last: EndpointConnectionError: Could not connect to the endpoint URL: .*\); "
                           r"the build's own outcome stands", progress[-1])
    assert skipped and int(skipped.group(1)) >= 10, progress[-1]


def test_progress_that_cannot_reach_the_store_at_the_end_does_not_fail_the_build(stores):
    from tokenmill.pipelines.progress import BuildProgress

    shown = io.StringIO()
    display = BuildProgress("s3://bucket/progress-direct", {"s3://bucket/x": 10}, mode="log", every=0.02,
                            stream=shown)
    try:
        with display:
            stores.stop()
            time.sleep(0.3)
    finally:
        stores.start()
    assert display.failed_polls >= 3
    assert "progress failed and were skipped (last: EndpointConnectionError" in shown.getvalue()


def _validate_cli(root: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenmill", "validate", root], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)


def test_validate_without_credentials_or_endpoint_is_one_line_naming_the_storage_error(stores, text_inputs):
    root = "s3://bucket/tokens/validate"
    upload(text_inputs, "s3://bucket/raw-validate")
    assert run_build(["--input", "s3://bucket/raw-validate", "--output", root, "--tokenizer", "bytes"]) == 0
    assert _validate_cli(root, dict(os.environ)).returncode == 0
    no_keys = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    proc = _validate_cli(root, no_keys)
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        f"tokenmill validate: {root}/_manifest.json: cannot read: NoCredentialsError: Unable to locate credentials"]
    start = time.monotonic()
    proc = _validate_cli(root, {**os.environ, "AWS_ENDPOINT_URL_S3": f"http://{LOOPBACK}:{free_port()}"})
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"tokenmill validate: {root}/_manifest.json: cannot read: EndpointConnectionError: "
                                  "Could not connect to the endpoint URL: "), proc.stderr
    assert time.monotonic() - start < 60  # tried again for about 16 s, then said why in one line


OUTAGE_PHASES = ("read", "write", *FAULT_STEPS)


@contextlib.contextmanager
def outage_at(phase: str, stores: S3Server, input_prefix: str, back_after: float | None):
    """The S3 server goes away the first time the build reaches `phase` (reading an input, writing a shard, or a
    commit step of schemas/versions._fault), and comes back `back_after` seconds later (None: not before the
    block ends). The build runs in this process (in-memory runner), so the hooks see its calls."""
    from tokenmill.schemas import versions
    from tokenmill.transforms import write

    fired: list[threading.Thread | None] = []

    def fire() -> None:
        if not fired:
            stores.stop()
            fired.append(restart_after(stores, back_after) if back_after is not None else None)

    with pytest.MonkeyPatch.context() as mp:
        if phase == "read":
            real_open = fs.open_binary
            mp.setattr(fs, "open_binary", lambda uri, *a, **k: (
                fire() if uri.startswith(input_prefix) else None, real_open(uri, *a, **k))[1])
        elif phase == "write":
            real_write = write.write_block
            mp.setattr(write, "write_block", lambda *a, **k: (fire(), real_write(*a, **k))[1])
        else:
            real_fault = versions._fault
            mp.setattr(versions, "_fault", lambda step: (fire() if step == phase else None, real_fault(step))[1])
        try:
            yield fired
        finally:
            if fired and fired[0] is not None:
                fired[0].join()
            elif fired:
                stores.start()


@pytest.mark.parametrize("phase", OUTAGE_PHASES)
def test_an_outage_at_each_phase_is_bridged_and_the_build_is_whole(stores, text_inputs, local_text, phase):
    """The store goes away for 2 s while the build reads, writes, or at any step of its commit: retries bridge
    it, and the dataset is the one a build without an outage makes."""
    raw, out = f"s3://bucket/raw-{phase}", f"s3://bucket/tokens/outage-{phase}"
    upload(text_inputs, raw)
    with outage_at(phase, stores, raw, back_after=2.0) as fired:
        code = run_build(["--input", raw, "--output", out, "--tokenizer", "tiktoken:cl100k_base", "--eos",
                          "--block-size", "1k"])
    assert fired, f"the build never reached {phase}"
    assert code == 0
    assert rows_by_origin(out) == local_text[0]


@pytest.mark.parametrize("phase", ["write", "before_commit"])
def test_an_outage_that_outlasts_the_retries_fails_in_one_line_and_commits_nothing(
        stores, text_inputs, local_text, phase, capsys, monkeypatch):
    """Retries without waiting (so the outage outlasts them at once): the build stops with one line naming the
    storage error, the dataset keeps its previous commit, and a rerun once the store is back completes it."""
    from tokenmill.schemas import storage

    raw, out = f"s3://bucket/raw-long-{phase}", f"s3://bucket/tokens/long-{phase}"
    upload(text_inputs, raw)
    write_jsonl_to(f"{raw}-first/a.jsonl", [{"text": "the first commit"}])
    assert run_build(["--input", f"{raw}-first", "--output", out, "--tokenizer", "tiktoken:cl100k_base"]) == 0
    before = read_manifest(out)
    capsys.readouterr()
    monkeypatch.setattr(storage.random, "uniform", lambda a, b: 0.0)  # no backoff: give up at once
    with outage_at(phase, stores, raw, back_after=None) as fired:
        code = run_build(["--input", raw, "--output", out, "--tokenizer", "tiktoken:cl100k_base", "--eos",
                          "--block-size", "1k"])
    assert fired and code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tokenmill build: failed: ") and "Traceback" not in "\n".join(err), err[-5:]
    monkeypatch.undo()
    assert read_manifest(out).commit == before.commit
    assert run_build(["--input", raw, "--output", out, "--tokenizer", "tiktoken:cl100k_base", "--eos",
                      "--block-size", "1k"]) == 0
    assert rows_by_origin(out) == local_text[0]


def write_jsonl_to(uri: str, records: list[dict]) -> None:
    write_bytes_atomic(uri, "".join(json.dumps(r) + "\n" for r in records).encode())
