"""Choosing and describing the Beam runner.

Beam's DirectRunner first tries Prism, which downloads a binary; offline that
fails after a delay and falls back. tokenmill therefore defaults to the
FnApiRunner, Beam's local portable runner, in multi_processing mode with one
worker per CPU core. Any --runner the user gives is used as is.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Sequence

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from pipelines.cli_errors import UsageError

DEFAULT_LOCAL_RUNNER = "FnApiRunner"
_LOCAL = {"fnapirunner", "directrunner", "switchingdirectrunner", "bundlebaseddirectrunner"}


def _given(args: Sequence[str], name: str) -> bool:
    return any(a == f"--{name}" or a.startswith(f"--{name}=") for a in args)


def is_local_runner(runner: str | None) -> bool:
    """Whether the named runner runs the job on this machine (FnApiRunner, DirectRunner).

    Only then may the launcher list inputs and probe the output before the run.
    A remote runner (DataflowRunner, PortableRunner, FlinkRunner, SparkRunner, ...)
    runs on workers with their own credentials, and a job must translate on a
    launcher that has none: the pipeline lists its inputs itself.
    """
    name = (runner or DEFAULT_LOCAL_RUNNER).lower()
    return name in _LOCAL or name + "runner" in _LOCAL


def runs_locally(options: PipelineOptions) -> bool:
    return is_local_runner(options.view_as(StandardOptions).runner)


def local_defaults(beam_args: Sequence[str]) -> tuple[list[str], str]:
    """Beam args with tokenmill's local defaults filled in, and a description of the runner."""
    args = list(beam_args)
    if not _given(args, "runner"):
        args.append(f"--runner={DEFAULT_LOCAL_RUNNER}")
    runner = PipelineOptions(args).view_as(StandardOptions).runner or DEFAULT_LOCAL_RUNNER
    if not is_local_runner(runner):
        return args, runner
    if not _given(args, "direct_num_workers"):
        args.append(f"--direct_num_workers={os.cpu_count() or 1}")
    direct = PipelineOptions(args).view_as(DirectOptions)
    workers = direct.direct_num_workers
    if not _given(args, "direct_running_mode") and workers != 1:
        args.append("--direct_running_mode=multi_processing")
    if not _given(args, "default_sdk_harness_log_level"):
        args.append("--default_sdk_harness_log_level=ERROR")  # keep worker chatter (WARN: unparsed args, ...) off the terminal
    mode = PipelineOptions(args).view_as(DirectOptions).direct_running_mode
    return args, f"{runner} ({mode}, {workers} worker{'s' if workers != 1 else ''})"


def pipeline_options(beam_args: Sequence[str]) -> PipelineOptions:
    """PipelineOptions from the leftover arguments; an argument Beam does not know is an error."""
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in _all_subclasses(PipelineOptions):
        cls._add_argparse_args(parser)
    _, unknown = parser.parse_known_args(list(beam_args))
    if unknown:
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)}")
    return PipelineOptions(list(beam_args))


BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def one_blas_thread_per_worker(options: PipelineOptions) -> None:
    """With one local worker process per core, give each one BLAS thread.

    numpy's matrix products (vq code search, pca) otherwise start a thread per
    core in every worker, and N workers fight over N cores (measured: 2 workers
    took 7.1 s where 1 took 4.8). Variables the user set are left alone.
    """
    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode == "multi_processing" and (direct.direct_num_workers or 0) > 1:
        for name in BLAS_THREAD_VARIABLES:
            os.environ.setdefault(name, "1")


def cores_per_worker(options: PipelineOptions) -> int:
    """CPU cores each worker may keep busy with its own threads (image decoding, vq:/pca: items).

    Local: this machine's cores over the worker processes (in_memory and
    multi_threading run one process). Remote runners start a worker process
    per core already: 1.
    """
    if not runs_locally(options):
        return 1
    direct = options.view_as(DirectOptions)
    processes = (direct.direct_num_workers or os.cpu_count() or 1) \
        if direct.direct_running_mode == "multi_processing" else 1
    return max(1, (os.cpu_count() or 1) // processes)


def make_runner(options: PipelineOptions):
    """A runner instance for `options`, or None to let Beam create it.

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

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    info = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode == "multi_processing" and (direct.direct_num_workers or 0) != 1:
        from pipelines.local_workers import fork_supported

        if fork_supported():
            return _warm_start_runner()(provision_info=info)
    return fn_runner.FnApiRunner(provision_info=info)


def _warm_start_runner() -> type:
    from apache_beam.portability import python_urns
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    class WarmStartFnApiRunner(fn_runner.FnApiRunner):
        """The FnApiRunner, with multi_processing workers forked warm from a WorkerZygote.

        See pipelines/local_workers.py; `execute` starts the zygote. Without one
        (a pipeline run some other way) workers start Beam's way.
        """

        zygote = None

        def run_via_runner_api(self, pipeline_proto, options):
            if self.zygote is not None:
                for env in pipeline_proto.components.environments.values():
                    if env.urn == python_urns.SUBPROCESS_SDK:
                        env.payload = self.zygote.command().encode()
            return super().run_via_runner_api(pipeline_proto, options)

    return WarmStartFnApiRunner


def _all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


def run_pipeline(pipeline, prog: str):
    """Run to completion; the result, or None after one line on stderr if the job failed.

    Set TOKENMILL_DEBUG=1 to see Beam's traceback of a failed step as well.
    """
    import logging
    import os
    import sys

    if not os.environ.get("TOKENMILL_DEBUG"):
        # The failure is reported below in one line; Beam's own traceback of the
        # failing DoFn (logged in-process by local runners) is for debugging.
        logging.getLogger("apache_beam.runners.common").setLevel(logging.CRITICAL)
    from pipelines.local_workers import pipeline_ran

    try:
        result = pipeline.run()
        result.wait_until_finish()
        return result
    except Exception as e:  # say why in one line; the job wrote no manifest
        text = str(e) or type(e).__name__
        reason = next((line for line in text.splitlines() if "Error" in line), text.splitlines()[0])
        print(f"{prog}: failed: {reason.strip()[:500]}", file=sys.stderr)
        return None
    finally:
        pipeline_ran()


def counters(result, step: str | None = None) -> dict[str, int]:
    """tokenmill's Beam counters from a finished pipeline (of the steps under `step`), where reported."""
    try:
        from apache_beam.metrics.metric import MetricsFilter

        query = MetricsFilter().with_namespace("tokenmill")
        found = result.metrics().query(query.with_step(step) if step else query)["counters"]
    except Exception:  # some runners report no metrics
        return {}
    totals: dict[str, int] = {}
    for c in found:
        value = c.committed if c.committed is not None else c.attempted
        totals[c.key.metric.name] = totals.get(c.key.metric.name, 0) + int(value or 0)
    return totals


@dataclasses.dataclass(frozen=True)
class TranslatedJob:
    """A job a runner translated without submitting it (DataflowRunner with --dry_run=True)."""

    steps: list[str]  # step names as the Dataflow UI shows them, in the order the graph applies them
    staged: dict[str, str]  # file name on the workers -> local file staged; workflow.tar.gz is --setup_file's sdist

    def describe(self, depth: int = 1) -> str:
        """Steps down to `depth` levels below the outermost (tokenmill's own names), and the staged files."""
        lines = ["translated job (not submitted):", "  steps:"]
        lines += [f"    {'  ' * step.count('/')}{step.rsplit('/', 1)[-1]}" for step in self.steps
                  if step.count("/") <= depth]
        lines += ["  staged files:"] + [f"    {name} <- {path}" for name, path in sorted(self.staged.items())]
        return "\n".join(lines)


def translated_job(result) -> TranslatedJob | None:
    """The translated job behind a --dry_run=True result, or None for a job that ran.

    With Dataflow Runner v2 the legacy step list (`job.proto.steps`) is empty;
    the job is the portable pipeline proto, whose transforms are walked here.
    """
    proto = getattr(getattr(result, "job", None), "proto_pipeline", None)
    if proto is None:
        return None
    from apache_beam.portability.api import beam_runner_api_pb2 as api

    transforms = proto.components.transforms
    steps: list[str] = []

    def visit(ids) -> None:
        for tid in ids:
            if not transforms[tid].unique_name.startswith("ref_"):  # Beam's unnamed root wrapper
                steps.append(transforms[tid].unique_name)
            visit(transforms[tid].subtransforms)

    visit(proto.root_transform_ids)
    staged = {}
    for env in proto.components.environments.values():
        for dep in env.dependencies:
            if dep.role_urn == "beam:artifact:role:staging_to:v1":
                name = api.ArtifactStagingToRolePayload.FromString(dep.role_payload).staged_name
                staged[name] = api.ArtifactFilePayload.FromString(dep.type_payload).path
    return TranslatedJob(steps, staged)


def execute(pipeline, prog: str, progress=None):
    """Run a pipeline for a command: its result, or the exit code when there is nothing more to do.

    1 after one line on stderr if the job failed; 0 after printing the
    translated job of a dry run (--dry_run=True on Dataflow). `progress`, a
    context manager with a `succeeded` attribute, wraps the run.
    """
    import contextlib

    with contextlib.ExitStack() as stack:
        from pipelines import local_workers

        if hasattr(pipeline.runner, "zygote") and local_workers.safe_to_fork():  # now, before any thread starts
            try:
                pipeline.runner.zygote = stack.enter_context(local_workers.WorkerZygote())
            except OSError as e:  # e.g. a socket path too long under $TMPDIR: workers start Beam's way
                print(f"{prog}: workers start cold (cannot fork them warm: {e})", file=sys.stderr)
        shown = stack.enter_context(progress or contextlib.nullcontext())
        result = run_pipeline(pipeline, prog)
        if shown is not None:
            shown.succeeded = result is not None
    if result is None:
        return 1
    if (job := translated_job(result)) is not None:
        print(job.describe())
        return 0
    return result
