"""The portable runner path, end to end and offline: PortableRunner → Beam's Python job service
(local_job_service_main) → SDK worker processes over the Fn API (gRPC), started by `tokenmill serve-workers`.

This is how Dataflow, Flink and Spark run a build: steps in SDK workers outside the launcher. What those
add and cannot run here (a Java job server, DOCKER and PROCESS workers) is in docs/operations.md. One job
service and one worker pool serve the whole module; every process started here is ended in teardown.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from tests.conftest import MULTILINGUAL, REPO, read_rows, write_jsonl
from tokenmill.pipelines import build
from tokenmill.schemas.manifest import read_manifest
from tokenmill.schemas.validate import validate
from tokenmill.schemas.versions import LEASE_NAME

LOCAL = ["--runner=FnApiRunner", "--direct_num_workers=1", "--direct_running_mode=in_memory"]
DEADLINE = 60.0  # seconds for any process here to get ready
# The worker start check costs a job with a cold worker start: the text build and the failure tests pin it;
# the other portable builds skip it.
NO_CHECK = ["--worker_start_timeout=0"]

# Manifest fields that legitimately differ between two builds of the same inputs, whatever the runner:
# wall-clock times of the run (when it committed, when each block was written, when it started and ended).
RUN_TIMES = {"created_at", "timing"}
ISO_TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(\+00:00|Z)?"


# -- processes ------------------------------------------------------------------

def _start(cmd: list[str], log: Path, **kw) -> subprocess.Popen:
    """A process in its own session (so teardown can end it and its children), stderr to `log`."""
    return subprocess.Popen(cmd, cwd=kw.pop("cwd", REPO), stderr=log.open("wb"), start_new_session=True, **kw)


def _end(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> int | None:
    """Ask `proc` to stop, and kill its whole session if it has not within 10 s; its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # what it started, too, had it left any
    proc.wait(10)
    return proc.returncode


def _wait_for(ready, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        found = ready()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    pytest.fail(f"{what} not ready within {DEADLINE:g} s: {log.read_text()[-2000:]}")


def start_serve_workers(log: Path, **kw) -> tuple[subprocess.Popen, str]:
    """`tokenmill serve-workers --port 0`; the process and the address it printed."""
    proc = _start([sys.executable, "-m", "tokenmill", "serve-workers", "--port", "0"], log, stdout=subprocess.PIPE,
                  **kw)
    seen = b""

    def address() -> str | None:
        nonlocal seen
        if select.select([proc.stdout], [], [], 0.1)[0]:
            seen += os.read(proc.stdout.fileno(), 4096)
        m = re.search(rb"--environment_config=(\S+)", seen)
        return m and m.group(1).decode()

    try:
        return proc, _wait_for(address, "tokenmill serve-workers", proc, log)
    except BaseException:
        _end(proc)
        raise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def job_endpoint(tmp_path_factory):
    """Beam's Python job service on 127.0.0.1: the host:port of its job API."""
    folder = tmp_path_factory.mktemp("job-service")
    port_file = folder / "port"
    proc = _start([sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main", "--port", "0",
                   "--port_file", str(port_file)], folder / "log", stdout=subprocess.DEVNULL)
    try:
        port = _wait_for(lambda: port_file.exists() and port_file.read_text(), "the job service", proc,
                         folder / "log")
        yield f"127.0.0.1:{port}"
    finally:
        _end(proc)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """`tokenmill serve-workers`: the EXTERNAL worker pool of every build here."""
    proc, address = start_serve_workers(tmp_path_factory.mktemp("pool") / "log")
    try:
        yield address
    finally:
        _end(proc)


@pytest.fixture(scope="module")
def portable(job_endpoint, pool) -> list[str]:
    return ["--runner=PortableRunner", f"--job_endpoint={job_endpoint}", "--environment_type=EXTERNAL",
            f"--environment_config={pool}"]


# -- builds ---------------------------------------------------------------------

def run(argv: list[str]) -> tuple[int, str, str]:
    """`tokenmill build` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = build.run(argv)
        except SystemExit as e:  # a usage error
            code = e.code
    return code, out.getvalue(), err.getvalue()


def counters(summary: str) -> dict[str, int]:
    line = next(l for l in summary.splitlines() if l.strip().startswith("counters:"))
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


def manifest_json(root: Path) -> dict:
    """The manifest with the output folder's own path replaced (the spec records where it was built)."""
    return json.loads((root / "_manifest.json").read_text().replace(json.dumps(str(root))[1:-1], "OUT"))


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def assert_same_dataset(local: Path, remote: Path) -> None:
    """Same files, byte for byte, and the same manifest but for the run's wall-clock times."""
    a, b = manifest_json(local), manifest_json(remote)
    assert a.keys() == b.keys()
    assert {k: v for k, v in a.items() if k not in RUN_TIMES | {"versions"}} == \
           {k: v for k, v in b.items() if k not in RUN_TIMES | {"versions"}}
    assert [{k: v for k, v in e.items() if k != "created_at"} for e in a["versions"]] == \
           [{k: v for k, v in e.items() if k != "created_at"} for e in b["versions"]]
    assert files_under(local) == files_under(remote)  # no progress records or other leftovers either
    for name in a["files"] + a["error_files"]:
        assert (local / name).read_bytes() == (remote / name).read_bytes(), name
    for name in ("_schema.json", "README.md"):  # the card (README.md) names the commit's time
        assert re.sub(ISO_TIME, "TIME", (local / name).read_text().replace(str(local), "OUT")) == \
               re.sub(ISO_TIME, "TIME", (remote / name).read_text().replace(str(remote), "OUT"))
    assert validate(str(remote)) == []


def build_both(tmp: Path, argv: list[str], portable: list[str], check: bool = False) -> tuple[Path, Path, str, str]:
    """The same build on the local runner and the portable one: their outputs and summaries."""
    local, remote = tmp / "local", tmp / "portable"
    argv = [*argv, "--progress", "none"]  # the spec records it; a remote launcher shows no progress anyway
    code, local_out, err = run([*argv, "--output", str(local), *LOCAL])
    assert code == 0, err
    code, remote_out, err = run([*argv, "--output", str(remote), *portable, *([] if check else NO_CHECK)])
    assert code == 0, err
    assert "runner:     PortableRunner" in remote_out
    return local, remote, local_out, remote_out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Text (the repository's samples, and a file with a line that is not JSON), images and videos, one bad each."""
    root = tmp_path_factory.mktemp("portable-inputs")
    text = root / "text"
    text.mkdir()
    write_jsonl(text / "docs.jsonl", [{"text": t} for t in MULTILINGUAL] + ["{not json"])
    images = root / "images"
    images.mkdir()
    y, x = np.mgrid[0:48, 0:64]
    for i in range(5):
        Image.fromarray(np.stack([x * 4, y * 5, np.full_like(x, 40 * i)], -1).astype(np.uint8)).save(
            images / f"im{i}.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    videos = root / "videos"
    videos.mkdir()
    for i, n in enumerate((12, 7)):
        with av.open(str(videos / f"v{i}.mp4"), "w") as c:
            s = c.add_stream("libx264", rate=25)
            s.width, s.height, s.pix_fmt, s.options = 64, 48, "yuv420p", {"preset": "ultrafast"}
            for f in range(n):
                frame = np.stack([x * 4, y * 5, np.full_like(x, (f * 37 + i * 90) % 256)], -1).astype(np.uint8)
                for packet in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    c.mux(packet)
            for packet in s.encode(None):
                c.mux(packet)
    (videos / "bad.mp4").write_bytes(b"not a video at all")
    return {"text": text, "images": images, "videos": videos}


def text_argv(inputs) -> list[str]:
    return ["--input", str(REPO / "samples" / "text" / "*"), "--input", str(inputs["text"] / "*.jsonl"),
            "--tokenizer", "tiktoken:cl100k_base", "--eos", "--progress", "none"]


@pytest.fixture(scope="module")
def text_built(tmp_path_factory, inputs, portable):
    return build_both(tmp_path_factory.mktemp("text"), text_argv(inputs), portable, check=True)


# -- the tests --------------------------------------------------------------------

def test_a_text_build_through_the_portable_runner_equals_the_local_one(text_built):
    local, remote, local_out, remote_out = text_built
    assert_same_dataset(local, remote)
    assert counters(remote_out) == counters(local_out)
    assert counters(remote_out)["commits"] == 1 and counters(remote_out)["decode_errors"] == 1  # "{not json"
    assert read_manifest(str(remote)).errors == 1


@pytest.mark.parametrize("modality, argv", [
    ("image", ["--input", "{images}/*.png", "--tokenizer", "patch:16", "--modality", "image"]),
    ("video", ["--input", "{videos}/*.mp4", "--tokenizer", "patch:2,16", "--clip-frames", "4",
               "--modality", "video"]),
])
def test_image_and_video_builds_through_the_portable_runner_equal_the_local_ones(tmp_path, inputs, portable,
                                                                                  modality, argv):
    argv = [a.format(**{k: str(v) for k, v in inputs.items()}) for a in argv]
    local, remote, local_out, remote_out = build_both(tmp_path, argv, portable)
    assert_same_dataset(local, remote)
    assert counters(remote_out) == counters(local_out)
    m = read_manifest(str(remote))
    assert m.modality == modality and m.rows > 0 and m.errors == 1  # broken.png / bad.mp4: an error row


def test_an_unchanged_rerun_through_the_portable_runner_is_up_to_date(text_built, inputs, portable):
    _, remote, _, _ = text_built
    before = (remote / "_manifest.json").read_bytes()
    code, out, err = run([*text_argv(inputs), "--output", str(remote), *portable, *NO_CHECK])
    assert code == 0, err
    assert out.startswith("tokenmill build: up to date in ")
    c = counters(out)
    assert c["commits_unchanged"] == 1 and c["inputs_to_tokenize"] == 0 and c["inputs_unchanged"] == 3
    assert (remote / "_manifest.json").read_bytes() == before


def test_a_step_that_fails_on_a_portable_worker_is_named_in_the_same_one_line_as_locally(tmp_path, portable):
    """The PortableRunner's exception holds no traceback; the job's messages do, and name the cause."""
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{not json", "{nope"])
    argv = ["--input", str(bad), "--tokenizer", "bytes", "--progress", "none"]
    lines = {}
    for name, runner in (("local", LOCAL), ("portable", [*portable, *NO_CHECK])):
        code, _, err = run([*argv, "--output", str(tmp_path / name), *runner])
        assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 2, err
        lines[name] = err.strip().splitlines()[-1]
        assert not (tmp_path / name / "_manifest.json").exists()
    assert lines["portable"] == lines["local"]
    assert lines["local"].startswith("tokenmill build: failed: 2 of 2 records failed (100%), more than "
                                     "--max-error-fraction 0.5; nothing committed")


def test_the_python_job_service_has_no_process_environment(tmp_path, inputs, job_endpoint):
    """PROCESS workers run a boot executable (the SDK container's Go `boot`); Beam's Python job service has no
    handler for them at all. The worker start check says so in one line, before anything is written.
    If a Beam release adds one, this fails: then test PROCESS here for real (docs/operations.md)."""
    out = tmp_path / "out"
    code, _, err = run([*text_argv(inputs), "--output", str(out), "--runner=PortableRunner",
                        f"--job_endpoint={job_endpoint}", "--environment_type=PROCESS",
                        '--environment_config={"command": "/opt/apache/beam/boot"}'])
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith("tokenmill build: failed: the worker start check job failed ") and \
           "KeyError: 'beam:env:process:v1'" in line, err
    assert "Traceback" not in err and not out.exists()


def test_workers_started_by_the_job_service_from_a_command_give_the_same_dataset(tmp_path, inputs, job_endpoint,
                                                                                 text_built):
    """What the Python job service runs in PROCESS's place: its subprocess environment, a worker command line."""
    local, _, local_out, _ = text_built
    out = tmp_path / "out"
    code, summary, err = run([*text_argv(inputs), "--output", str(out), "--runner=PortableRunner",
                              f"--job_endpoint={job_endpoint}",
                              "--environment_type=beam:env:harness_subprocess_python:v1",
                              f"--environment_config={sys.executable} -m apache_beam.runners.worker.sdk_worker_main",
                              *NO_CHECK])
    assert code == 0, err
    assert_same_dataset(local, out)
    assert counters(summary) == counters(local_out)


@pytest.fixture(scope="module")
def broken_pools(tmp_path_factory):
    """Beam's own worker pool (worker_pool_main) started as users do, with a `python` on PATH that cannot
    run tokenmill: "no-beam", a bare interpreter (the pool's default PATH, outside the venv), and
    "no-tokenmill", an interpreter with apache-beam but without tokenmill."""
    import apache_beam

    root = tmp_path_factory.mktemp("broken-pools")
    bare = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    beam_site = str(Path(apache_beam.__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bare / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin"
    kinds = {"no-beam": env, "no-tokenmill": {**env, "PYTHONPATH": beam_site}}
    probe = "import importlib.util as u; print(u.find_spec('apache_beam') is not None, u.find_spec('tokenmill') is not None)"
    found = {k: subprocess.run(["python", "-c", probe], env=e, cwd=root, capture_output=True, text=True,
                               timeout=60).stdout.split() for k, e in kinds.items()}
    procs, pools = [], {}
    try:
        for kind, kind_env in kinds.items():
            port = free_port()
            procs.append(_start([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                                 f"--service_port={port}"], root / f"{kind}.log", env=kind_env, cwd=root,
                                stdout=subprocess.DEVNULL))
            pools[kind] = port, procs[-1]
        for kind, (port, proc) in pools.items():
            _wait_for(lambda: listening(port), f"the {kind} pool", proc, root / f"{kind}.log")
        yield {kind: (f"127.0.0.1:{port}", found[kind]) for kind, (port, _) in pools.items()}
    finally:
        for proc in procs:
            _end(proc)


@pytest.mark.parametrize("kind, timeout, cause", [
    ("no-beam", ["--worker_start_timeout=5"],
     "no SDK worker started and imported tokenmill within --worker_start_timeout=5 s"),
    ("no-tokenmill", [], "ModuleNotFoundError: No module named 'tokenmill'"),  # Beam fails it: the default deadline
])
def test_workers_that_cannot_run_tokenmill_fail_the_build_in_one_line_and_commit_nothing(tmp_path, inputs,
                                                                                         job_endpoint, broken_pools,
                                                                                         kind, timeout, cause):
    address, (has_beam, has_tokenmill) = broken_pools[kind]
    if (kind == "no-tokenmill") != (has_beam == "True") or has_tokenmill != "False":
        pytest.skip(f"the {kind} interpreter has apache_beam={has_beam}, tokenmill={has_tokenmill}: "
                    "tokenmill is installed in a way a PYTHONPATH of Beam's folder exposes (not editable)")
    out = tmp_path / "out"
    start = time.monotonic()
    code, _, err = run([*text_argv(inputs), "--output", str(out), "--runner=PortableRunner",
                        f"--job_endpoint={job_endpoint}", "--environment_type=EXTERNAL",
                        f"--environment_config={address}", *timeout])
    seconds = time.monotonic() - start
    assert code == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith("tokenmill build: failed: ") and cause in lines[-1], err
    assert lines[-1].endswith("nothing was committed") and "Traceback" not in err and len(lines) == 2, err
    assert seconds < 60  # Beam's own wait for the worker of "no-beam" is 300 s or more
    assert not out.exists()  # the build itself was never submitted


def test_a_concurrent_local_and_portable_build_give_one_commit_and_one_clean_refusal(tmp_path, inputs, portable,
                                                                                     text_built):
    """Both runs plan from the empty output before either commits: the test holds the commit lease (as a
    third run would) until each has written its shards. The local run builds the samples, the portable
    one the samples and docs.jsonl, so their commits differ and the second must refuse."""
    local_ref = text_built[0]
    out = tmp_path / "ds"
    out.mkdir()
    lease = out / LEASE_NAME
    lease.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}))
    samples = ["--input", str(REPO / "samples" / "text" / "*"), "--tokenizer", "tiktoken:cl100k_base", "--eos",
               "--progress", "none"]
    argvs = {"local": [*samples, *LOCAL],
             "portable": [*samples, "--input", str(inputs["text"] / "*.jsonl"), *portable, *NO_CHECK]}
    procs = {}
    try:
        for name, argv in argvs.items():
            procs[name] = _start([sys.executable, "-m", "tokenmill", "build", "--output", str(out), *argv],
                                 tmp_path / f"{name}.log", stdout=subprocess.DEVNULL)

        def both_wrote_shards() -> bool:
            return len({p.parent.parent for p in out.glob("versions/*/run-*/data/*.parquet")}) == 2

        deadline = time.monotonic() + 2 * DEADLINE
        while not both_wrote_shards():
            assert time.monotonic() < deadline, [(tmp_path / f"{n}.log").read_text() for n in procs]
            assert all(p.poll() is None for p in procs.values()), [(tmp_path / f"{n}.log").read_text() for n in procs]
            time.sleep(0.1)
        time.sleep(1.0)  # into the lease wait (60 s)
        lease.unlink()
        codes = {name: p.wait(2 * DEADLINE) for name, p in procs.items()}
    finally:
        for p in procs.values():
            _end(p)
    assert sorted(codes.values()) == [0, 1], codes
    loser = next(n for n, c in codes.items() if c == 1)
    err = (tmp_path / f"{loser}.log").read_text()
    assert "Traceback" not in err and re.match(
        r"tokenmill build: failed: .*another run committed \w+ after this run started from an empty output; "
        r"nothing was committed", err.strip().splitlines()[-1]), err
    m = read_manifest(str(out))
    assert len(m.versions) == 1 and validate(str(out)) == []
    expected = read_rows(local_ref)
    if loser == "portable":  # the local run won: the samples only
        expected = expected.filter(np.array(["samples" in s for s in expected.column("source").to_pylist()]))
    assert read_rows(out).equals(expected)


def test_serve_workers_warm_and_cold_build_the_same_and_end_cleanly_on_sigint_and_sigterm(tmp_path, inputs,
                                                                                        job_endpoint, text_built):
    """Warm: workers forked from serve-workers' zygote (the module's pool is one too). Cold
    (TOKENMILL_FORK_WORKERS=0): Beam's own start, a bare `python` that serve-workers' PATH makes this one."""
    local = text_built[0]
    started = {}
    try:
        for sig, fork in ((signal.SIGINT, "1"), (signal.SIGTERM, "0")):
            started[sig] = start_serve_workers(tmp_path / f"{sig.name}.log",
                                               env={**os.environ, "TOKENMILL_FORK_WORKERS": fork})
        for sig, (proc, address) in started.items():
            assert re.fullmatch(r"127\.0\.0\.1:\d+", address)
            out = tmp_path / sig.name
            code, _, err = run([*text_argv(inputs), "--output", str(out), "--runner=PortableRunner",
                                f"--job_endpoint={job_endpoint}", "--environment_type=EXTERNAL",
                                f"--environment_config={address}", *NO_CHECK])
            assert code == 0, err
            assert_same_dataset(local, out)
            proc.send_signal(sig)
            assert proc.wait(DEADLINE) == 0, (tmp_path / f"{sig.name}.log").read_text()
            assert proc.stdout.read().decode().strip().endswith("tokenmill serve-workers: stopped")
            assert "Traceback" not in (tmp_path / f"{sig.name}.log").read_text()
    finally:
        for proc, _ in started.values():
            _end(proc)


def test_a_worker_with_other_versions_than_the_launcher_fails_the_check():
    """What the check job runs on a worker (pipelines/workers.report_in): equal versions, or one line why not."""
    from tokenmill.pipelines.workers import WorkerMismatchError, report_in, versions

    report_in(None, versions())
    with pytest.raises(WorkerMismatchError, match=r"^the SDK workers run tokenmill \S+ \(launcher 0\.0\.1\), "
                                                  r"python \d+\.\d+ \(launcher 2\.7\): install the launcher's"):
        report_in(None, {**versions(), "tokenmill": "0.0.1", "python": "2.7"})


def test_serve_workers_refuses_a_bad_port_and_an_address_it_cannot_listen_on(capsys):
    from tokenmill.pipelines.workers import serve_workers

    with pytest.raises(SystemExit) as e:
        serve_workers(["--port", "99999"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "tokenmill serve-workers: error: --port must be between 0 and 65535, not 99999\n"
    assert serve_workers(["--host", "203.0.113.9", "--port", "0"]) == 1  # TEST-NET-3: no interface of ours
    assert capsys.readouterr().err == ("tokenmill serve-workers: failed: cannot listen on 203.0.113.9:0: "
                                       "Cannot assign requested address\n")
