"""Where tokenmill reaches into Apache Beam itself to start faster: one module, one switch.

A local build pays Beam's start-up before and after its own work (about 1.5 s of
a 13 s, 30 MB text build here, more than datatrove pays in all; docs/benchmarks.md,
fixed cost). Three short-cuts cut most of it. Each leaves what the pipeline
computes as it was (tests/test_beam_seam.py checks each against plain Beam, and
that the Beam internals it relies on are still there and behave as assumed):

* **Lean import** (`lean_import`, before Beam is imported; the `tokenmill`
  command for a local runner only). Importing Beam pulls in clients a local build
  never uses: the Google Cloud Storage and S3 filesystems, the BigQuery and
  Pub/Sub, MongoDB and Azure connectors, the Dataflow API client, and pandas.
  Beam imports each inside `try: ... except ImportError`; while Beam is imported
  an import finder says they do not exist, then it is removed, so a later
  explicit import works. Beam's own gs://, s3:// and azfs:// filesystems are then
  unregistered in that process; tokenmill reads and writes through fsspec, and a
  remote runner (Dataflow, portable) never gets this short-cut. pandas stays
  absent for the whole process, since pyarrow would import it on its first
  conversion of a Python list: tokenmill uses no pandas (a plain install has
  none), and neither does Beam's FnApiRunner; a plug-in that needs pandas in
  the build's process needs TOKENMILL_BEAM_SHORTCUTS=0.
* **Options views** (`PipelineOptions.view_as`). Beam builds an argparse parser of
  a class's options and parses the flags again on every call, about 330 times
  per text build; the parse of one (class, flags) is now kept for the process.
* **DoFn specs** (`userstate.get_dofn_specs`). Beam walks every method of a DoFn
  and inspects its signature for state and timer parameters, about 8 times per
  DoFn instance; the answer is now kept per instance.

TOKENMILL_BEAM_SHORTCUTS=0 turns all three off; a comma-separated list of their
names (lean_import, view_as, dofn_specs) keeps only those on. When Beam no longer has what a
short-cut relies on, that short-cut stays off (plain Beam) and the test fails.
This module imports nothing of Beam's at import time.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import weakref
from typing import Any, Sequence

# Modules Beam imports optionally (inside try/except ImportError) that a local build does not use.
LEAN_ABSENT = (
    "apache_beam.io.gcp.gcsfilesystem",           # gs:// for Beam's FileSystems: google.cloud.storage, requests
    "apache_beam.io.aws.s3filesystem",            # s3:// for Beam's FileSystems: boto3
    "apache_beam.io.azure.blobstoragefilesystem",  # azfs:// for Beam's FileSystems: the Azure SDK
    "apache_beam.io.gcp.bigquery",                # apache_beam.io's GCP block: BigQuery, Pub/Sub, gcsio, xlang IOs
    "google.cloud.dataflow",                      # the Dataflow API client, for DataflowRunner
    "apitools",                                   # Google API errors, for Beam's retry filters of GCP calls
    "pymongo",                                    # MongoDB IO (Beam logs a warning without it: muted here)
    "pandas",                                     # Beam's pandas batch types; kept out for the whole process
)
# Of LEAN_ABSENT, what stays absent after Beam is imported (see lean_import).
PROCESS_ABSENT = ("pandas",)

_installed: dict[str, bool] = {}


SHORTCUTS = ("lean_import", "view_as", "dofn_specs")


def enabled(name: str) -> bool:
    """TOKENMILL_BEAM_SHORTCUTS: unset or 1 for all, 0 for none, or the names of those to keep, comma-separated."""
    value = os.environ.get("TOKENMILL_BEAM_SHORTCUTS", "1").strip()
    return value != "0" and (value == "1" or name in {v.strip() for v in value.split(",")})


def runner_named(argv: Sequence[str]) -> str | None:
    """The --runner given in a command line (the last one, as argparse takes it), or None."""
    runner = None
    for i, a in enumerate(argv):
        if a == "--runner" and i + 1 < len(argv):
            runner = argv[i + 1]
        elif a.startswith("--runner="):
            runner = a.split("=", 1)[1]
    return runner


def lean_import(argv: Sequence[str]) -> bool:
    """Import Beam without the clients a local build does not use (see module); True if it did.

    Call before anything imports apache_beam, with the command's arguments. Does
    nothing when switched off, when Beam is already imported, or when argv names
    a runner that does not run here.
    """
    import logging

    from tokenmill.pipelines.runner_kind import is_local_runner

    if not enabled("lean_import") or "apache_beam" in sys.modules or not is_local_runner(runner_named(argv)):
        return False
    finder = _Absent(m for m in LEAN_ABSENT if m not in sys.modules)
    mongo_log = logging.getLogger("apache_beam.io.mongodbio")
    was_disabled, mongo_log.disabled = mongo_log.disabled, True  # "Could not find a compatible bson package."
    sys.meta_path.insert(0, finder)
    try:
        import apache_beam  # noqa: F401
        import pyarrow as pa

        # pyarrow looks for pandas once, on its first conversion of a Python list (pandas-shim.pxi); its C++
        # side looks again on every conversion, through sys.modules (below).
        pa.array([], pa.int8())
    finally:
        sys.meta_path.remove(finder)
        mongo_log.disabled = was_disabled
    for name in PROCESS_ABSENT:
        if name in finder.names:
            # As if not installed, for the rest of the process: `import pandas` raises ModuleNotFoundError and
            # importlib.util.find_spec("pandas") is None (transformers asks so). A finder raising would break
            # find_spec; pyarrow's Cython import would take a None entry for the module: hence both, in turn.
            sys.modules[name] = None  # type: ignore[assignment]
    _installed["lean_import"] = True
    return True


class _Absent:
    """An import finder for which the named modules do not exist (a ModuleNotFoundError, as if uninstalled)."""

    def __init__(self, names):
        self.names = frozenset(names)

    def find_spec(self, name, path=None, target=None):
        if name in self.names:
            raise ModuleNotFoundError(f"No module named {name!r} (tokenmill's lean Beam import)", name=name)
        return None


def install() -> dict[str, bool]:
    """Put the options-view and DoFn-spec short-cuts in place (once per process); which are on.

    Called when a build is planned. Beam must be importable; it is imported here.
    """
    if "view_as" not in _installed and enabled("view_as"):
        _installed["view_as"] = _install_view_as()
    if "dofn_specs" not in _installed and enabled("dofn_specs"):
        _installed["dofn_specs"] = _install_dofn_specs()
    return dict(_installed)


def installed() -> dict[str, bool]:
    return dict(_installed)


# -- options views -------------------------------------------------------------

def _install_view_as() -> bool:
    from apache_beam.options.pipeline_options import PipelineOptions

    plain = PipelineOptions.view_as
    if getattr(plain, "_tokenmill_cached", False):
        return True
    probe = PipelineOptions(["--runner=FnApiRunner"])
    # What a view is made of: Beam's view is cls(flags) sharing the source's _all_options.
    if not all(hasattr(probe, a) for a in ("_flags", "_visible_options", "_all_options")) \
            or not callable(getattr(PipelineOptions, "_visible_option_list", None)):
        return False
    parsed: dict[tuple[type, tuple[str, ...]], dict[str, Any]] = {}

    def view_as(self, cls):
        flags = self._flags
        if flags is None or not isinstance(cls, type) or not issubclass(cls, PipelineOptions) \
                or _own_init(cls, PipelineOptions):
            return plain(self, cls)  # sys.argv (which may change), or a class that parses its own way
        try:
            key = (cls, tuple(flags))
            hash(key)
        except TypeError:
            return plain(self, cls)
        visible = parsed.get(key)
        if visible is None:
            view = plain(self, cls)
            parsed[key] = copy.deepcopy(dict(vars(view._visible_options)))  # the view's own values change
            return view
        view = object.__new__(cls)
        visible = copy.deepcopy(visible)  # a parse makes new values (lists, ValueProviders): never shared
        object.__setattr__(view, "_flags", flags)
        object.__setattr__(view, "_visible_options", argparse.Namespace(**visible))
        object.__setattr__(view, "_all_options", self._all_options)
        for name in view._visible_option_list():  # as Beam does: each key's value is set once, by the first view
            if name not in self._all_options:
                self._all_options[name] = visible[name]
        return view

    view_as._tokenmill_cached = True  # type: ignore[attr-defined]
    view_as.__doc__ = plain.__doc__
    view_as.__wrapped__ = plain  # type: ignore[attr-defined]
    PipelineOptions.view_as = view_as
    return True


def _own_init(cls: type, base: type) -> bool:
    """Whether a class between `cls` and `base` defines its own __init__ (then it is not cached)."""
    return any("__init__" in vars(c) for c in cls.__mro__[:cls.__mro__.index(base)])


# -- DoFn specs ------------------------------------------------------------------

def _install_dofn_specs() -> bool:
    from apache_beam.transforms import userstate

    plain = getattr(userstate, "get_dofn_specs", None)
    if plain is None:
        return False
    if getattr(plain, "_tokenmill_cached", False):
        return True
    specs: dict[int, tuple[weakref.ref, tuple[set, set]]] = {}  # by identity, not by a DoFn's own __eq__

    def get_dofn_specs(dofn):
        kept = specs.get(id(dofn))
        if kept is not None and kept[0]() is dofn:
            found = kept[1]
        else:
            found, key = plain(dofn), id(dofn)
            try:
                ref = weakref.ref(dofn, lambda _: specs.pop(key, None))
            except TypeError:  # not weakly referable: as Beam does, every time
                return found
            specs[key] = (ref, found)
        return set(found[0]), set(found[1])  # fresh sets, as Beam returns

    get_dofn_specs._tokenmill_cached = True  # type: ignore[attr-defined]
    get_dofn_specs.__doc__ = plain.__doc__
    get_dofn_specs.__wrapped__ = plain  # type: ignore[attr-defined]
    userstate.get_dofn_specs = get_dofn_specs
    return True
