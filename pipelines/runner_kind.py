"""Which runners run a job on this machine: asked before Beam is imported (pipelines/beam_seam.py), so no Beam here."""
from __future__ import annotations

DEFAULT_LOCAL_RUNNER = "FnApiRunner"
_LOCAL = {"fnapirunner", "directrunner", "switchingdirectrunner", "bundlebaseddirectrunner"}


def is_local_runner(runner: str | None) -> bool:
    """Whether the named runner runs the job on this machine (FnApiRunner, DirectRunner).

    Only then may the launcher list inputs and probe the output before the run.
    A remote runner (DataflowRunner, PortableRunner, FlinkRunner, SparkRunner, ...)
    runs on workers with their own credentials, and a job must translate on a
    launcher that has none: the pipeline lists its inputs itself.
    """
    name = (runner or DEFAULT_LOCAL_RUNNER).lower()
    return name in _LOCAL or name + "runner" in _LOCAL
