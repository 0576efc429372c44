"""Local SDK workers forked warm from a zygote (pipelines/local/zygote.py).

Each case runs in a fresh Python process, as the `tokenmill` commands do: a
zygote is only forked before the process has run any pipeline.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="warm workers are Linux only")

PIPELINE = textwrap.dedent("""
    import json, os, sys
    import apache_beam as beam
    from tokenmill.pipelines import runners

    class Facts(beam.DoFn):
        def process(self, x):
            from threadpoolctl import threadpool_info
            blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
            yield x * x, os.getpid(), os.getppid(), blas, os.environ.get("RAYON_NUM_THREADS")

    beam_args, _ = runners.local_defaults(["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    options = runners.pipeline_options(beam_args)
    runners.tune_local(options)
    import numpy  # noqa: F401  (loads OpenBLAS in the launcher, as tokenmill's commands do)
    p = beam.Pipeline(runner=runners.make_runner(options), options=options)
    out = p | beam.Create(list(range(40))) | beam.Reshuffle() | beam.ParDo(Facts())
    _ = out | beam.combiners.ToList() | beam.FlatMap(lambda rows: [print("ROW " + json.dumps(r)) for r in rows])
    zygote = []
    from tokenmill.pipelines.local import zygote as local_workers
    start = local_workers.WorkerZygote.__init__
    def remember(self, *a):
        start(self, *a)
        zygote.append(self.pid)
    local_workers.WorkerZygote.__init__ = remember
    result = runners.execute(p, "test")
    print("ZYGOTE " + json.dumps(zygote))
    print("LAUNCHER " + json.dumps(os.getpid()))
""")


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def _rows(out: str, tag: str) -> list:
    return [json.loads(line[len(tag) + 1:]) for line in out.splitlines() if line.startswith(tag + " ")]


def test_workers_are_forked_from_the_zygote_with_one_blas_thread_and_give_the_same_rows():
    warm = _run(PIPELINE)
    assert warm.returncode == 0, warm.stderr[-3000:]
    rows = _rows(warm.stdout, "ROW")
    (zygote,) = _rows(warm.stdout, "ZYGOTE")[0]
    assert sorted(r[0] for r in rows) == [x * x for x in range(40)]
    assert {r[2] for r in rows} == {zygote}, "every worker is a child of the zygote"
    assert len({r[1] for r in rows}) == 2, "two worker processes"
    assert {b for r in rows for b in r[3]} == {1}, "OPENBLAS_NUM_THREADS=1 applies to the inherited OpenBLAS"
    rayon = os.environ.get("RAYON_NUM_THREADS", "1")  # one per worker (tokenizers' pool), unless set here
    assert {r[4] for r in rows} == {rayon}
    assert not _alive(zygote), "gone with the run"

    cold = _run(PIPELINE, {"TOKENMILL_FORK_WORKERS": "0"})
    assert cold.returncode == 0, cold.stderr[-3000:]
    assert _rows(cold.stdout, "ZYGOTE") == [[]]
    assert sorted(r[0] for r in _rows(cold.stdout, "ROW")) == sorted(r[0] for r in rows)
    assert {r[3][0] for r in _rows(cold.stdout, "ROW")} == {1}
    assert {r[4] for r in _rows(cold.stdout, "ROW")} == {rayon}


def test_a_second_pipeline_in_the_same_process_starts_workers_the_usual_way():
    code = PIPELINE + textwrap.dedent("""
        p2 = beam.Pipeline(runner=runners.make_runner(options), options=options)
        _ = (p2 | beam.Create([1, 2, 3]) | beam.Reshuffle() | beam.combiners.ToList()
             | beam.FlatMap(lambda xs: [print("AGAIN", x) for x in xs]))
        assert runners.execute(p2, "test").code == 0
        print("ZYGOTES " + json.dumps(zygote))
    """)
    done = _run(code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(_rows(done.stdout, "ZYGOTES")[0]) == 1, "no zygote forked after gRPC has run in the process"
    assert sorted(line for line in done.stdout.splitlines() if line.startswith("AGAIN")) == \
        ["AGAIN 1", "AGAIN 2", "AGAIN 3"]


def test_the_zygote_ends_when_the_launcher_is_killed():
    code = textwrap.dedent("""
        import os, signal, time
        from tokenmill.pipelines.local.zygote import WorkerZygote
        z = WorkerZygote()
        print(z.pid, z.folder, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    pid = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _alive(pid):
        if time.monotonic() > deadline:
            pytest.fail(f"zygote {pid} outlived its launcher")
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # an exited process its new parent has not reaped yet is gone


def test_a_build_whose_zygote_cannot_listen_starts_workers_cold(tmp_path):
    """A $TMPDIR too deep for an AF_UNIX socket path: one line on stderr, and the build still runs."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    (tmp_path / "a.txt").write_text("hello warm and cold workers")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "tokenmill.pipelines.build", "--input", str(tmp_path / "a.txt"), "--output",
                           str(out), "--tokenizer", "bytes", "--direct_num_workers=2", "--progress", "none"],
                          cwd=REPO, capture_output=True, text=True, timeout=180, env={**os.environ, "TMPDIR": str(deep)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "workers start cold (cannot fork them warm" in proc.stderr
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"] == 1 and manifest["tokens"] == len("hello warm and cold workers")
    assert not list(deep.iterdir()), "the zygote's folder was removed"
