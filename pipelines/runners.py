"""Choosing, running and describing the Beam runner, whichever it is.

What only a local run gets (the default FnApiRunner, warm workers, thread and
allocator tuning) lives behind pipelines/local; this module hands over to it
for a local runner and nowhere else.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from typing import Any, Iterator, Sequence

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from tokenmill.pipelines import local, workers  # workers: its WorkerOptions must be known to pipeline_options
from tokenmill.pipelines.cli_errors import UsageError, failure_line, verbose
from tokenmill.pipelines.local import DEFAULT_LOCAL_RUNNER, is_local_runner, local_defaults  # noqa: F401 (API)



def runs_locally(options: PipelineOptions) -> bool:
    return is_local_runner(options.view_as(StandardOptions).runner)


def pipeline_options(beam_args: Sequence[str]) -> PipelineOptions:
    """PipelineOptions from the leftover arguments; an argument Beam does not know is an error.

    The runner is created first, as Beam does when the pipeline is made: that
    imports its module, whose own options (--dask_client_address, ...) are then
    known, for a runner named by its short name or its full module path.
    """
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    options = PipelineOptions(list(beam_args))
    runner = options.view_as(StandardOptions).runner
    if runner and not is_local_runner(runner):
        from apache_beam.runners.runner import create_runner

        try:
            create_runner(runner)  # fail here, in one line
        except (ValueError, ImportError) as e:
            raise UsageError(f"--runner={runner}: {str(e).split('. ')[0]}") from None
    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in _all_subclasses(PipelineOptions):
        cls._add_argparse_args(parser)
    _, unknown = parser.parse_known_args(list(beam_args))
    if unknown:
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)}")
    return options


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


def small_build(beam_args: Sequence[str], chosen: Sequence[str], input_bytes: int
                ) -> tuple[list[str], str, PipelineOptions] | None:
    """(args, runner description, options) for one in-process worker when a local build is small, else None
    (the local seam's rule: pipelines/local.small_build_args)."""
    small = local.small_build_args(beam_args, chosen, input_bytes)
    return None if small is None else (*small, pipeline_options(small[0]))


def tune_local(options: PipelineOptions, *, allocator: bool = False) -> None:
    """The local seam's tunings for a local runner (pipelines/local.tune); nothing for a remote one."""
    if runs_locally(options):
        local.tune(options, allocator=allocator)


def make_runner(options: PipelineOptions):
    """A runner instance for `options` (the local seam's, for the FnApiRunner), or None to let Beam create it."""
    return local.make_runner(options) if runs_locally(options) else None


def _all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


class _JobMessages(logging.Filter):
    """Keeps a portable job's messages, which Beam's PortableRunner logs on the root logger, and hides them.

    They hold a failed step's worker traceback, from which the one line names
    the cause; with --verbose they show as well.
    """

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "root" or record.module != "portable_runner":
            return True
        if record.levelno >= logging.ERROR:
            self.texts.append(record.getMessage())
        return verbose()


@contextlib.contextmanager
def job_messages() -> Iterator[list[str]]:
    """While a pipeline runs: Beam's logs off the terminal (unless --verbose); yields the job's error messages."""
    if not verbose():
        # The failure is reported in one line; Beam's own log of the failing step
        # (in-process, or forwarded from the workers) is for debugging.
        for name in ("apache_beam.runners.common", "apache_beam.runners.portability.local_job_service",
                     "apache_beam.runners.portability.fn_api_runner.worker_handlers", "apache_beam.runners.worker",
                     "asyncio"):  # aiohttp's "Task exception was never retrieved" of a storage retry
            logging.getLogger(name).setLevel(logging.CRITICAL)
    kept = _JobMessages()
    root = logging.getLogger()
    root.addFilter(kept)
    try:
        yield kept.texts
    finally:
        root.removeFilter(kept)


def run_pipeline(pipeline, prog: str) -> tuple[Any, str | None]:
    """Run to completion: (the result, None), or (None, the one line saying why) if the job failed.

    With --verbose (or TOKENMILL_DEBUG=1) Beam's logs and tracebacks show as well.
    """
    deaths: list[str] = []
    try:
        with job_messages() as messages, (local.worker_deaths_end_the_run() if runs_locally(pipeline.options)
                                          else contextlib.nullcontext([])) as deaths:
            result = pipeline.run()
            result.wait_until_finish()
        return result, None
    except KeyboardInterrupt:
        if not deaths:
            raise  # the user's Ctrl-C
        return None, f"{prog}: failed: {deaths[0]}"
    except Exception as e:  # say why in one line; the job wrote no manifest
        if verbose():
            import traceback

            traceback.print_exc()
        return None, f"{prog}: failed: {failure_line(e, messages)}"


def check_workers(pipeline, prog: str) -> bool:
    """For a portable runner: the worker start check (pipelines/workers.py) before the job; False after one line."""
    if not workers.needs_check(pipeline):
        return True
    with job_messages() as messages:
        problem = workers.check(pipeline, messages)
    if problem:
        print(f"{prog}: failed: {problem}", file=sys.stderr)
    return problem is None


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


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a command's pipeline ended: the exit code, and the finished result when there is one to report on.

    `result` is None when the job failed (code 1, after one line on stderr) or
    was only translated (a dry run, code 0, after printing the translated job).
    """

    code: int
    result: object | None = None


def execute(pipeline, prog: str, progress=None) -> Outcome:
    """Run a pipeline for a command. `progress`, a context manager with a `succeeded` attribute, wraps the run."""
    if not check_workers(pipeline, prog):
        return Outcome(1)
    with contextlib.ExitStack() as stack:
        if runs_locally(pipeline.options):
            stack.enter_context(local.warm_workers(pipeline, prog))
        shown = stack.enter_context(progress or contextlib.nullcontext())
        result, failure = run_pipeline(pipeline, prog)
        if shown is not None:
            shown.succeeded = result is not None
    if result is None:  # its line last, after the progress display's own
        print(failure, file=sys.stderr)
        return Outcome(1)
    if (job := translated_job(result)) is not None:
        print(job.describe())
        return Outcome(0)
    return Outcome(0, result)
