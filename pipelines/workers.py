"""SDK workers of the portable runners (PortableRunner, Flink, Spark): the start check and a worker pool.

A portable job runs its steps in SDK worker processes that the runner starts
in an environment of the user's choosing (DOCKER, PROCESS, EXTERNAL). When
such a worker cannot run (its `python` has no apache_beam, say) the job does
not fail: Beam's job service waits for the worker to connect, minutes or for
ever. So before the job, the launcher runs a one-element check job on the same
runner and environment, and gives it --worker_start_timeout seconds: a worker
must start, import tokenmill and report the launcher's versions of tokenmill,
Beam and Python. Only then is the build submitted, so a failed check commits
nothing.

`tokenmill serve-workers` is an EXTERNAL worker pool (Beam's own servicer)
whose workers run this interpreter, with tokenmill, whatever `python` is first
on PATH.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
from typing import Iterator, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, PortableOptions

DEFAULT_START_TIMEOUT = 60.0


class WorkerOptions(PipelineOptions):
    """tokenmill's options for portable runners' workers (Beam-style names, beside --environment_type)."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument(
            "--worker_start_timeout", type=float, default=DEFAULT_START_TIMEOUT,
            help="portable runners (PortableRunner, Flink, Spark): seconds for a one-element check job, run "
                 "before the build, in which an SDK worker must start and import this tokenmill; 0 skips "
                 f"the check (default: {DEFAULT_START_TIMEOUT:g}; raise it where DOCKER images are pulled)")


class WorkerMismatchError(RuntimeError):
    """An SDK worker runs other versions of tokenmill, Beam or Python than the launcher."""


def versions() -> dict[str, str]:
    """What must be equal on the launcher and its workers for the rows to be the same."""
    from tokenmill.schemas.manifest import tokenmill_version

    return {"tokenmill": tokenmill_version(), "apache-beam": beam.__version__,
            "python": "%d.%d" % sys.version_info[:2]}


def report_in(_, expected: dict[str, str]) -> None:
    """Runs on a worker: unpickling this function imports tokenmill there; then the versions must match."""
    found = versions()
    if found != expected:
        differ = ", ".join(f"{k} {found.get(k)} (launcher {v})" for k, v in expected.items() if found.get(k) != v)
        raise WorkerMismatchError(f"the SDK workers run {differ}: install the launcher's versions where they run")


def needs_check(pipeline) -> bool:
    """A portable runner whose workers run outside this process (not LOOPBACK), with the check not turned off."""
    from apache_beam.runners.portability.portable_runner import PortableRunner

    options = pipeline.options
    return (isinstance(pipeline.runner, PortableRunner)
            and (options.view_as(PortableOptions).environment_type or "").upper() != "LOOPBACK"
            and options.view_as(WorkerOptions).worker_start_timeout > 0)


def _environment(options: PipelineOptions) -> str:
    portable = options.view_as(PortableOptions)
    kind = portable.environment_type or "DOCKER"
    return f"--environment_type={kind}" + (f" --environment_config={portable.environment_config}"
                                           if portable.environment_config else "")


def check(pipeline, job_messages: list[str]) -> str | None:
    """Run the check job for `pipeline`'s runner and options; None when a worker reported in, else why not.

    `job_messages` collects the job's messages (see runners.job_messages), from
    which a failed check's cause is named.
    """
    from tokenmill.pipelines.cli_errors import failure_line

    options = pipeline.options
    timeout = options.view_as(WorkerOptions).worker_start_timeout
    probe = beam.Pipeline(runner=pipeline.runner, options=options)  # the same job server serves both jobs
    _ = (probe | "WorkerStartCheck" >> beam.Create([None])
         | "ReportIn" >> beam.Map(report_in, versions()))
    outcome: dict[str, object] = {}

    def wait() -> None:
        try:
            outcome["result"] = result.wait_until_finish()
        except BaseException as e:  # the job failed: named below
            outcome["error"] = e

    try:
        result = probe.run()
    except Exception as e:
        return f"cannot submit the worker start check job: {failure_line(e)}; nothing was committed"
    # Beam's own wait polls once a second with a duration; a thread and a join return the moment it ends.
    waiter = threading.Thread(target=wait, name="tokenmill-worker-check", daemon=True)
    waiter.start()
    waiter.join(timeout)
    if waiter.is_alive():
        with contextlib.suppress(Exception):
            result.cancel()
        return (f"no SDK worker started and imported tokenmill within --worker_start_timeout={timeout:g} s "
                f"({_environment(options)}): the workers' `python` must be an interpreter with tokenmill and "
                "apache-beam installed (`tokenmill serve-workers` starts such an EXTERNAL pool; "
                "see docs/operations.md); nothing was committed")
    if "error" in outcome:
        return (f"the worker start check job failed ({_environment(options)}): "
                f"{failure_line(outcome['error'], job_messages)}; nothing was committed")
    return None


# -- tokenmill serve-workers ---------------------------------------------------

def _python_shim(folder: str) -> str:
    """A folder whose `python` runs this interpreter, for the front of the workers' PATH.

    Why: Beam's pool starts each worker as a bare `python -c ...`, found on
    PATH. A shell script, not a symlink: a symlink to a venv's python outside
    the venv starts the base interpreter, without the venv's packages.
    """
    path = os.path.join(folder, "python")
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\nexec '{sys.executable}' \"$@\"\n")
    os.chmod(path, 0o755)
    return folder


def _servicer(zygote):
    """Beam's pool servicer, each worker forked warm from `zygote` (pipelines/local/zygote.py) when there is one.

    Why warm: Beam's pool starts every worker as a fresh `python` that imports
    Beam and tokenmill again, seconds of CPU per worker and per job. The zygote
    forked from this process once it had imported them; a worker is Beam's own
    `sdk_worker_main`, given the addresses the runner sent, as Beam's boot
    gives them (no pipeline options: Beam's own pool passes none either).
    Why reap: Beam's runners never ask an EXTERNAL pool to stop a worker, so
    Beam's pool keeps every ended worker as a zombie, for as long as it runs.
    """
    import shlex
    import subprocess
    import traceback

    from apache_beam.portability.api import beam_fn_api_pb2
    from apache_beam.runners.worker.worker_pool_main import BeamFnExternalWorkerPoolServicer
    from google.protobuf import text_format

    class WorkerPool(BeamFnExternalWorkerPoolServicer):
        def StartWorker(self, request, context):
            for worker_id, proc in list(self._worker_processes.items()):
                if proc.poll() is not None:
                    del self._worker_processes[worker_id]
            if zygote is None:
                return super().StartWorker(request, context)
            env = dict(os.environ, WORKER_ID=request.worker_id, PIPELINE_OPTIONS="{}",
                       CONTROL_API_SERVICE_DESCRIPTOR=text_format.MessageToString(request.control_endpoint),
                       LOGGING_API_SERVICE_DESCRIPTOR=text_format.MessageToString(request.logging_endpoint))
            try:
                self._worker_processes[request.worker_id] = subprocess.Popen(
                    shlex.split(zygote.command()), env=env, stdin=subprocess.DEVNULL, close_fds=True)
            except Exception:
                return beam_fn_api_pb2.StartWorkerResponse(error=traceback.format_exc())
            return beam_fn_api_pb2.StartWorkerResponse()

    return WorkerPool(use_process=True)


def _check_bindable(host: str, port: int) -> None:
    """Raise OSError naming why host:port cannot be listened on (gRPC would log it at C level, then fail)."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


@contextlib.contextmanager
def worker_pool(host: str, port: int) -> Iterator[str]:
    """Beam's EXTERNAL worker pool servicer on host:port, its workers running this interpreter; yields host:port.

    Workers fork warm from a zygote where it can be made (Linux; not with
    TOKENMILL_FORK_WORKERS=0), else start Beam's way with this interpreter first
    on PATH. Beam's own `start` binds every interface; this binds `host` only.
    On exit the server stops and the workers still running are ended (SIGTERM,
    then SIGKILL).
    """
    import grpc
    from apache_beam.portability.api import beam_fn_api_pb2_grpc
    from apache_beam.runners.worker.worker_pool_main import kill_process_gracefully
    from apache_beam.utils import thread_pool_executor

    from tokenmill.pipelines import local

    with tempfile.TemporaryDirectory(prefix="tokenmill-workers-") as shim, contextlib.ExitStack() as stack:
        _check_bindable(host, port)  # before forking a zygote for nothing
        os.environ["PATH"] = _python_shim(shim) + os.pathsep + os.environ.get("PATH", "")
        warm = local.worker_zygote(stack)  # before the gRPC server starts any thread; None: Beam's way
        server = grpc.server(thread_pool_executor.shared_unbounded_instance(),
                             options=[("grpc.http2.max_pings_without_data", 0), ("grpc.http2.max_ping_strikes", 0)])
        try:
            bound = server.add_insecure_port(f"{host}:{port}")
        except RuntimeError:  # grpc >= 1.60 raises where older ones returned 0
            bound = 0
        if not bound:
            raise OSError(f"cannot listen on {host}:{port}")
        pool = _servicer(warm)
        beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(pool, server)
        server.start()
        try:
            yield f"{host}:{bound}"
        finally:
            server.stop(1).wait(5)
            for proc in list(pool._worker_processes.values()):
                kill_process_gracefully(proc, timeout=5)


def serve_workers(argv: Sequence[str] | None = None) -> int:
    """`tokenmill serve-workers`: an EXTERNAL worker pool for portable runners, until SIGINT or SIGTERM."""
    from tokenmill.pipelines.cli_errors import OneLineArgumentParser, UsageError, usage_errors

    with usage_errors("tokenmill serve-workers"):
        p = OneLineArgumentParser(
            prog="tokenmill serve-workers",
            description="Serve SDK workers for a portable runner's EXTERNAL environment (PortableRunner, Flink, "
                        "Spark): each worker the runner asks for runs this interpreter, with this tokenmill. "
                        "Prints the --environment_config to pass, then runs until interrupted (SIGINT, SIGTERM).")
        p.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1; 0.0.0.0 for runners on other machines)")
        p.add_argument("--port", type=int, default=50000, help="port (default: 50000, Beam's; 0 picks a free one)")
        args = p.parse_args(argv)
        if not 0 <= args.port <= 65535:
            raise UsageError(f"--port must be between 0 and 65535, not {args.port}")
    stop = threading.Event()

    def ask_to_stop(signum, frame) -> None:
        stop.set()

    previous = {s: signal.signal(s, ask_to_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    logging.getLogger("apache_beam.runners.worker.worker_pool_main").setLevel(logging.ERROR)
    try:
        with worker_pool(args.host, args.port) as address:
            print(f"tokenmill serve-workers: workers run {sys.executable}\n"
                  f"  --environment_type=EXTERNAL --environment_config={address}", flush=True)
            while not stop.wait(3600):
                pass
    except OSError as e:
        print(f"tokenmill serve-workers: failed: {e}", file=sys.stderr)
        return 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("tokenmill serve-workers: stopped", flush=True)
    return 0
