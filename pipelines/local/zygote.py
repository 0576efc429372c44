"""Local SDK workers that start warm: forked from a copy of the launcher, not started from scratch.

In multi_processing mode Beam's FnApiRunner starts each SDK worker as
`python -m apache_beam.runners.worker.sdk_worker_main`, a fresh interpreter
that imports Beam (1.3 s here, with the GCP libraries) and then tokenmill,
pyarrow, PIL and numpy again. Measured on this project's 2-core machine, a
trivial 2-worker Beam pipeline took 3.1 s, almost all of it those imports;
on a 1,000-image build that is more than the work itself.

A `WorkerZygote` is forked from the launcher once everything is imported and
before the runner starts any gRPC thread (fork is only safe without them). The
runner's worker command becomes a stdlib-only client (`_worker_client.py`, run with
`python -I -S`, about 20 ms) that hands the zygote its environment and stdio;
the zygote forks a child that becomes the SDK worker through Beam's own
`sdk_worker_main.main`, already warm. The client reports the worker's exit
status, so the runner sees the process it asked for. The worker is the same
code with the same options: only its start is cheaper.

Linux only (fork after imports is not safe on macOS); elsewhere, or with
TOKENMILL_FORK_WORKERS=0, Beam starts workers its own way. Used through
pipelines/local (the local runner's seam) and by `tokenmill serve-workers`
(pipelines/workers.py), whose pool hands the zygote the runner's addresses.
"""
from __future__ import annotations

import contextlib
import json
import os
import selectors
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

CLIENT = Path(__file__).with_name("_worker_client.py")
_HEADER = 8  # bytes: length of the JSON environment that follows
# Thread-count variables of BLAS and OpenMP, read by numpy's BLAS at load time.
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


_pipelines_run = 0


def fork_supported() -> bool:
    return sys.platform.startswith("linux") and os.environ.get("TOKENMILL_FORK_WORKERS", "1") != "0"


def pipeline_ran() -> None:
    """Note that this process ran a pipeline: its gRPC threads may live on, and a fork would copy them half-way."""
    global _pipelines_run
    _pipelines_run += 1


def safe_to_fork() -> bool:
    """Whether a zygote forked now would be sound: no pipeline run yet in this process, no other Python thread.

    True in a `tokenmill` command; a process that runs several pipelines (tests,
    notebooks) gets warm workers for its first one only.
    """
    return fork_supported() and _pipelines_run == 0 and threading.active_count() == 1 and not _grpc_threads()


def _grpc_threads() -> bool:
    """Whether gRPC's C threads run here (a pipeline run some other way started them)."""
    try:
        names = [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")]
    except OSError:
        return True
    return any(n.startswith(("grpc", "default-executo", "resolver-execut", "lifeguard")) for n in names)


class WorkerZygote:
    """A warm process that forks one SDK worker per connection; see the module docstring."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="tokenmill-workers-")
        self.address = os.path.join(self.folder, "zygote.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.address)  # OSError when the path is longer than AF_UNIX allows (~107 bytes)
            listener.listen(64)
        except OSError:
            listener.close()
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        # The zygote lives while this pipe is open: closed by close(), or by
        # the kernel when the launcher dies, however it dies.
        life_r, self._life_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the zygote
            code = 0
            try:
                os.close(self._life_w)
                _serve(listener, life_r, self.folder)
            except BaseException:  # noqa: BLE001 - a zygote must never return into the launcher's code
                code = 1
            finally:
                os._exit(code)
        os.close(life_r)
        listener.close()
        self.pid = pid

    def command(self) -> str:
        """The worker command line for Beam's subprocess environment."""
        return " ".join(shlex.quote(a) for a in (sys.executable, "-I", "-S", str(CLIENT), self.address))

    def close(self) -> None:
        """End the zygote once its workers have exited (it reaps them, so their CPU time is accounted)."""
        if self._life_w is not None:
            os.close(self._life_w)
            self._life_w = None
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "WorkerZygote":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _serve(listener: socket.socket, life: int, folder: str | None = None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    workers: set[int] = set()
    with selectors.DefaultSelector() as sel:
        sel.register(listener, selectors.EVENT_READ)
        sel.register(life, selectors.EVENT_READ)
        while True:
            ready = {key.fileobj for key, _ in sel.select(timeout=5.0)}
            _reap(workers, block=False)
            if life in ready:  # the launcher closed the pipe, or is gone
                break
            if listener in ready:
                conn, _ = listener.accept()
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    _become_worker(conn)  # never returns
                workers.add(pid)
                conn.close()
    # Workers end when the runner closes their control channel, which a finished run has done by
    # now; a launcher that died (kill -9) closed nothing, and its workers must not outlive it long.
    deadline = time.monotonic() + 2.0
    while workers and time.monotonic() < deadline:
        _reap(workers, block=False)
        time.sleep(0.02)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _reap(workers, block=True)
    if folder:  # the launcher's close() removes it too, but a killed launcher cannot
        shutil.rmtree(folder, ignore_errors=True)


def _reap(workers: set[int], block: bool) -> None:
    for pid in list(workers):
        try:
            done, _ = os.waitpid(pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            workers.discard(pid)


def _become_worker(conn: socket.socket) -> None:
    code = 1
    try:
        conn.settimeout(None)
        header, fds, _, _ = socket.recv_fds(conn, _HEADER, 3)
        size = int.from_bytes(header, "big")
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                os._exit(1)
            data += chunk
        for target, fd in enumerate(fds):  # the client's stdin, stdout, stderr
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update(json.loads(data))
        if not (os.environ.get("TOKENMILL_VERBOSE") or os.environ.get("TOKENMILL_DEBUG")):
            # Beam prints a failing step's traceback to the worker's stderr, and
            # decoders print C-level noise there; the launcher reports the cause
            # in one line (pipelines/runners.run_pipeline). --verbose shows it all.
            quiet = os.open(os.devnull, os.O_WRONLY)
            os.dup2(quiet, 2)
            os.close(quiet)
        _limit_threads()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        import logging

        root = logging.getLogger()
        for handler in list(root.handlers):  # the launcher's handlers are not this worker's
            root.removeHandler(handler)
        # The client died (the runner killed it): the worker goes with it.
        threading.Thread(target=_exit_when_closed, args=(conn,), daemon=True).start()
        from apache_beam.runners.worker import sdk_worker_main

        sdk_worker_main.main(["sdk_worker_main"])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported through the exit status, like a worker process
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            conn.sendall(str(code).encode())
        finally:
            os._exit(code)


def _limit_threads() -> None:
    """Apply the environment's BLAS/OpenMP thread counts to libraries the launcher already loaded.

    A fresh worker's OpenBLAS reads OPENBLAS_NUM_THREADS when numpy loads it; a
    forked one inherited the launcher's pool (a thread per core), so N workers
    would fight over N cores (pipelines/local.limit_threads).
    """
    limits = [int(os.environ[v]) for v in BLAS_THREAD_VARIABLES if os.environ.get(v, "").isdigit()]
    if limits:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=min(limits))


def _exit_when_closed(conn: socket.socket) -> None:
    try:
        while conn.recv(1):
            pass
    except OSError:
        pass
    os._exit(1)
