"""The local runner's seam: every speed-up that only a run on this machine gets, in one place.

A build on Beam's FnApiRunner (tokenmill's default) goes through here; a remote
runner (Dataflow, Flink, Spark, the portable runner) never does. What it holds,
each measured (docs/benchmarks.md) and each with a switch:

* **Warm workers** (TOKENMILL_FORK_WORKERS=0 turns off): multi_processing SDK
  workers fork from a warm copy of the launcher instead of importing Beam and
  tokenmill afresh (zygote.py). This rewrites the runner's worker command in
  the pipeline proto: relying on Beam internals (FnApiRunner.run_via_runner_api,
  the provision info) as only pipelines/beam_seam.py otherwise does (Beam's
  start-up short-cuts). tests/test_local_workers.py notices when a Beam release
  changes them.
* **Thread limits** (TOKENMILL_LIMIT_THREADS=0 turns off; a variable the
  user set wins): one BLAS thread and one rayon thread (tokenizers) per worker
  process when there is a worker per core.
* **Allocator tuning** (TOKENMILL_MALLOC_TUNING=0 turns off): for modalities
  that ask (video), glibc keeps freed memory instead of handing it back.
* **One process for small builds** (TOKENMILL_SMALL_BUILD_BYTES=0 turns off):
  when the inputs to tokenize come to less than 1 MiB and the user chose no
  worker count or running mode, the build runs in the launcher's process
  (in_memory, 1 worker) instead of starting worker processes.

Nothing outside this package calls mallopt or imports zygote.py, but `tokenmill serve-workers`
(pipelines/workers.py), whose EXTERNAL pool forks its workers warm the same way.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
from typing import Any, Iterator, Sequence

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from tokenmill.pipelines.runner_kind import DEFAULT_LOCAL_RUNNER, is_local_runner  # noqa: F401 (API)


def _given(args: Sequence[str], name: str) -> bool:
    return any(a == f"--{name}" or a.startswith(f"--{name}=") for a in args)


def local_defaults(beam_args: Sequence[str]) -> tuple[list[str], str]:
    """Beam args with tokenmill's local defaults filled in, and a description of the runner.

    Beam's DirectRunner first tries Prism, which downloads a binary; offline that
    fails after a delay. So the default is the FnApiRunner in multi_processing
    mode with one worker per CPU core. Any --runner the user gives is used as is.
    """
    args = list(beam_args)
    if not _given(args, "runner"):
        args.append(f"--runner={DEFAULT_LOCAL_RUNNER}")
    runner = PipelineOptions(args).view_as(StandardOptions).runner or DEFAULT_LOCAL_RUNNER
    if not is_local_runner(runner):
        return args, runner
    if not _given(args, "direct_num_workers"):
        args.append(f"--direct_num_workers={os.cpu_count() or 1}")
    workers = PipelineOptions(args).view_as(DirectOptions).direct_num_workers
    if not _given(args, "direct_running_mode") and workers != 1:
        args.append("--direct_running_mode=multi_processing")
    if not _given(args, "default_sdk_harness_log_level"):
        args.append("--default_sdk_harness_log_level=ERROR")  # keep worker chatter off the terminal
    mode = PipelineOptions(args).view_as(DirectOptions).direct_running_mode
    return args, f"{runner} ({mode}, {workers} worker{'s' if workers != 1 else ''})"


# Below this many bytes to tokenize, starting worker processes costs more than it saves: forking 2 warm
# workers and connecting them costs about 0.5 s of a tiny build (docs/benchmarks.md, fixed cost), while
# 1 MiB takes about 0.1 s to tokenize on one core (text at 11 MB/s; images about 26 MB/s).
SMALL_BUILD_BYTES = 1 << 20


def small_build_args(beam_args: Sequence[str], chosen: Sequence[str], input_bytes: int) -> tuple[list[str], str] | None:
    """local_defaults' args for one in-process worker, when a build is small; else None.

    `chosen` are the Beam args the user gave: a worker count, running mode or
    runner named there is kept. `input_bytes`: the bytes this run will tokenize.
    """
    limit = int(os.environ.get("TOKENMILL_SMALL_BUILD_BYTES", SMALL_BUILD_BYTES))
    if input_bytes >= limit or any(_given(chosen, n) for n in ("runner", "direct_num_workers",
                                                                  "direct_running_mode")):
        return None
    keep = [a for a in beam_args if not (_given([a], "direct_num_workers") or _given([a], "direct_running_mode"))]
    return local_defaults([*keep, "--direct_num_workers=1", "--direct_running_mode=in_memory"])


def _worker_processes(options: PipelineOptions) -> int:
    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode != "multi_processing":
        return 1
    return direct.direct_num_workers or os.cpu_count() or 1


def tune(options: PipelineOptions, *, allocator: bool = False) -> None:
    """Apply the local tunings before any worker starts (for a local runner: see runners.tune_local).

    `allocator`: the build's modality asks for allocator tuning (see keep_freed_memory).
    """
    limit_threads(options)
    if allocator:
        keep_freed_memory()


# Rust's rayon pool (Hugging Face tokenizers' encode_batch), sized from this variable when first used.
RAYON_THREAD_VARIABLE = "RAYON_NUM_THREADS"


def limit_threads(options: PipelineOptions) -> None:
    """With one local worker process per core, give each one BLAS thread and one rayon thread.

    numpy's matrix products (vq code search, pca) otherwise start a thread per
    core in every worker, and N workers fight over N cores (measured: 2 workers
    took 7.1 s where 1 took 4.8). So does `hf:`'s batch encode (tokenizers'
    rayon pool: 2 workers on 20 MB took 12.2-14.5 CPU s with a pool per core
    and 10.7-12.2 with one thread each, docs/benchmarks.md). Variables the user
    set are left alone.
    """
    from tokenmill.pipelines.local.zygote import BLAS_THREAD_VARIABLES

    if _worker_processes(options) > 1 and os.environ.get("TOKENMILL_LIMIT_THREADS", "1") != "0":
        for name in (*BLAS_THREAD_VARIABLES, RAYON_THREAD_VARIABLE):
            os.environ.setdefault(name, "1")


def make_runner(options: PipelineOptions):
    """A FnApiRunner for `options` (warm-start capable in multi_processing mode), or None for other runners.

    A FnApiRunner created by name hands its SDK workers no pipeline options, so
    they log at INFO and ignore --default_sdk_harness_log_level. Build it the
    way Beam's DirectRunner does, with the options in its provision info.
    """
    runner = (options.view_as(StandardOptions).runner or "").lower()
    if runner not in ("fnapirunner", "fnapi"):
        return None
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    from tokenmill.pipelines.local import zygote

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    info = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode == "multi_processing" and (direct.direct_num_workers or 0) != 1 \
            and zygote.fork_supported():
        return _warm_start_runner()(provision_info=info)
    return fn_runner.FnApiRunner(provision_info=info)


def _warm_start_runner() -> type:
    from apache_beam.portability import python_urns
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    class WarmStartFnApiRunner(fn_runner.FnApiRunner):
        """The FnApiRunner, with multi_processing workers forked warm from a WorkerZygote.

        `warm_workers` starts the zygote. Without one (a pipeline run some other
        way) workers start Beam's way.
        """

        zygote = None

        def run_via_runner_api(self, pipeline_proto, options):
            if self.zygote is not None:
                for env in pipeline_proto.components.environments.values():
                    if env.urn == python_urns.SUBPROCESS_SDK:
                        env.payload = self.zygote.command().encode()
            return super().run_via_runner_api(pipeline_proto, options)

    return WarmStartFnApiRunner


def worker_zygote(stack: contextlib.ExitStack) -> Any:
    """A zygote that forks warm SDK workers (zygote.WorkerZygote), entered on `stack`; None where it cannot be made
    (not Linux, TOKENMILL_FORK_WORKERS=0, threads already running, or a socket path too long). For a worker pool
    of our own (pipelines/workers.serve): the local runner's seam is the one place that reaches the zygote."""
    from tokenmill.pipelines.local import zygote

    if not zygote.safe_to_fork():
        return None
    import tokenmill.pipelines.build  # noqa: F401 - what every worker imports, imported once before the fork

    try:
        return stack.enter_context(zygote.WorkerZygote())
    except OSError:
        return None


@contextlib.contextmanager
def warm_workers(pipeline, prog: str) -> Iterator[None]:
    """Around a pipeline's run: fork its workers warm where its runner can, and note the run.

    The zygote is forked now, before the run starts any thread; a process that
    runs several pipelines (tests, notebooks) gets warm workers for its first only.
    """
    from tokenmill.pipelines.local import zygote

    with contextlib.ExitStack() as stack:
        if hasattr(pipeline.runner, "zygote") and zygote.safe_to_fork():
            try:
                pipeline.runner.zygote = stack.enter_context(zygote.WorkerZygote())
            except OSError as e:  # e.g. a socket path too long under $TMPDIR: workers start Beam's way
                print(f"{prog}: workers start cold (cannot fork them warm: {e})", file=sys.stderr)
        try:
            yield
        finally:
            zygote.pipeline_ran()


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_TUNED = False


class WorkerDied(RuntimeError):
    """A local worker process died while the pipeline ran (killed, out of memory, a crash in native code)."""


@contextlib.contextmanager
def worker_deaths_end_the_run() -> Iterator[list[str]]:
    """Turn a local worker's death into the end of the run, instead of a wait forever.

    Why: Beam's FnApiRunner notices a dead worker only in the thread that
    started it ("Worker subprocess exited with return code 137", raised in its
    `run_worker` thread); the main thread keeps waiting for the worker's
    results, forever (seen with kill -9 of a worker, warm or cold). Here that
    thread's exception interrupts the main thread (SIGINT), and the run fails
    with one line. Yields the list the death is recorded in.
    """
    import signal
    import threading

    from tokenmill.pipelines.local import _worker_client

    deaths: list[str] = []
    previous = threading.excepthook

    def hook(args) -> None:
        text = str(args.exc_value)
        if (args.thread is not None and args.thread.name.startswith("run_worker")
                and "Worker subprocess exited with return code" in text):
            code = text.rsplit(" ", 1)[-1]
            how = {"137": "killed (SIGKILL: out of memory, or kill -9)", "139": "crashed (SIGSEGV)",
                   "134": "aborted (SIGABRT)", str(_worker_client.NO_STATUS):
                   "ended without a word (killed, e.g. out of memory or kill -9, or crashed in native code)",
                   }.get(code, f"exit code {code}")
            deaths.append(f"a worker process died while the pipeline ran: {how}; nothing was committed")
            if len(deaths) == 1:
                os.kill(os.getpid(), signal.SIGINT)
            return
        quiet = not (os.environ.get("TOKENMILL_VERBOSE") or os.environ.get("TOKENMILL_DEBUG"))
        if quiet and (deaths or type(args.exc_value).__name__ == "RpcError"):
            return  # the threads of a dead worker's gRPC channels, before or after: the one line says it all
        previous(args)

    threading.excepthook = hook
    try:
        yield deaths
    finally:
        threading.excepthook = previous


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of handing it back to the kernel at once.

    Why: decoders allocate each clip's frames (10-100 MB) in their own thread,
    and glibc gives such memory back as soon as a burst of it is freed
    (trimming the heap, or dropping a whole thread heap); the next clip then
    faults in fresh, zeroed pages. That was 85% of a video build's page
    faults (perf), and on VMs whose freed memory returns to the host each
    fault is a hypervisor exit. Free memory up to 128 MiB stays with the
    process, heaps grow and shrink in 32 MiB steps, and blocks up to 32 MiB
    (glibc's most) come from the heap rather than fresh mappings. Applied with
    mallopt in the launcher, so that workers forked from it inherit it, and as
    MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_ and MALLOC_MMAP_THRESHOLD_ in the
    environment, which glibc reads in workers started cold. Measured on 2,560 frames of 640x360 video:
    300-460k page faults became 250-300k and the build 5.5-5.9 s became
    4.8-5.3 s. Once per process; glibc only; TOKENMILL_MALLOC_TUNING=0 skips it.
    Returns whether the settings were applied.
    """
    global _TUNED
    if _TUNED:
        return True
    if os.environ.get("TOKENMILL_MALLOC_TUNING") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 128 << 20, _M_TOP_PAD: 32 << 20}
    for name, param in (("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD), ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD),
                        ("MALLOC_TOP_PAD_", _M_TOP_PAD)):
        os.environ.setdefault(name, str(settings[param]))
    _TUNED = all(mallopt(param, value) == 1 for param, value in settings.items())
    return _TUNED
