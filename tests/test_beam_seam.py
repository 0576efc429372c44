"""The Beam start-up short-cuts (pipelines/beam_seam.py) change no result, and notice when Beam changes.

Each short-cut is checked against plain Beam: the lean import in fresh
processes (it must run before Beam is imported), the two caches in this one
against the Beam functions they wrap. A Beam release that drops or reshapes
what a short-cut relies on fails here, not in a user's build.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from tokenmill.pipelines import beam_seam

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, env: dict | None = None) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line, returned."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=180, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


LEAN = """
    import importlib.util, json, sys
    from tokenmill.pipelines import beam_seam
    lean = beam_seam.lean_import(ARGV)
    import apache_beam as beam
    loaded = [m for m in beam_seam.LEAN_ABSENT if sys.modules.get(m) is not None]
    from apache_beam.testing.util import assert_that, equal_to
    with beam.Pipeline("FnApiRunner") as p:  # Beam still runs a pipeline
        assert_that(p | beam.Create([1, 2, 3]) | beam.Map(lambda x: x * x), equal_to([1, 4, 9]))
    import pyarrow as pa
    column = pa.array(["a", None, "c"]).to_pylist()  # pyarrow converts lists, without pandas
    try:
        import pandas  # noqa: F401
        pandas_import = "works"
    except ModuleNotFoundError:
        pandas_import = "ModuleNotFoundError"
    # Left out only while Beam was imported: an explicit import still works.
    explicit = {m: importlib.util.find_spec(m) is not None for m in ("apitools", "google.cloud.dataflow", "pymongo")}
    print(json.dumps({"lean": lean, "loaded": loaded, "column": column, "pandas_import": pandas_import,
                      "pandas_spec": importlib.util.find_spec("pandas") is not None, "explicit": explicit,
                      "pandas_loaded": "pandas" in sys.modules and sys.modules["pandas"] is not None}))
"""


def test_lean_import_leaves_the_clients_out_and_beam_still_runs():
    got = _python(LEAN.replace("ARGV", "[]"))
    assert got["lean"] is True
    assert got["loaded"] == []
    assert got["column"] == ["a", None, "c"]
    assert (got["pandas_import"], got["pandas_spec"], got["pandas_loaded"]) == ("ModuleNotFoundError", False, False)
    installed = {m: beam_seam_installed(m) for m in got["explicit"]}
    assert got["explicit"] == installed


def beam_seam_installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def test_plain_beam_imports_what_the_lean_import_leaves_out():
    """If Beam stops importing one of them, leaving it out saves nothing: the list is stale."""
    got = _python("""
        import importlib.util, json, sys
        import apache_beam  # noqa: F401
        from tokenmill.pipelines import beam_seam
        print(json.dumps({m: m in sys.modules for m in beam_seam.LEAN_ABSENT}))
    """)
    installed = {m for m in beam_seam.LEAN_ABSENT if beam_seam_installed(m)}
    assert installed, "none of the modules the lean import leaves out is installed here: nothing is tested"
    assert {m for m, loaded in got.items() if loaded} == installed


@pytest.mark.parametrize("argv, env, lean", [
    (["--runner=DataflowRunner"], {}, False),
    (["--runner", "PortableRunner"], {}, False),
    (["--runner=FnApiRunner", "--direct_num_workers=2"], {}, True),
    ([], {"TOKENMILL_BEAM_SHORTCUTS": "0"}, False),
    ([], {"TOKENMILL_BEAM_SHORTCUTS": "view_as,dofn_specs"}, False),
    ([], {"TOKENMILL_BEAM_SHORTCUTS": "lean_import"}, True),
])
def test_lean_import_only_for_a_local_runner_and_when_switched_on(argv, env, lean):
    got = _python(LEAN.replace("ARGV", repr(argv)), env)
    assert got["lean"] is lean
    assert bool(got["loaded"]) is not lean
    assert got["pandas_import"] == ("ModuleNotFoundError" if lean else "works")


def test_runner_named_reads_the_runner_as_beam_does():
    assert beam_seam.runner_named(["--input", "x", "--runner", "DataflowRunner"]) == "DataflowRunner"
    assert beam_seam.runner_named(["--runner=FnApiRunner", "--runner=PortableRunner"]) == "PortableRunner"
    assert beam_seam.runner_named(["--input", "--runner.jsonl"]) is None


# -- the caches, in this process ---------------------------------------------------

@pytest.fixture(scope="module")
def installed():
    on = beam_seam.install()
    assert on == {**on, "view_as": True, "dofn_specs": True}, \
        f"a short-cut found Beam changed and stayed off: {on}"
    return on


FLAG_SETS = [
    ["--runner=FnApiRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing"],
    ["--runner=DataflowRunner", "--project=p", "--region=r", "--temp_location=gs://b/t", "--experiments=a",
     "--experiments=b", "--dataflow_service_options=x=1"],
    [],
]


def _option_classes():
    from apache_beam.options.pipeline_options import PipelineOptions

    out, todo = [], list(PipelineOptions.__subclasses__())
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


@pytest.mark.parametrize("flags", FLAG_SETS)
def test_cached_options_views_equal_beams_own(installed, flags):
    from apache_beam.options.pipeline_options import PipelineOptions

    plain = PipelineOptions.view_as.__wrapped__
    ours, theirs = PipelineOptions(flags), PipelineOptions(flags)
    for _ in range(2):  # the second round is served from the cache
        for cls in _option_classes():
            a, b = ours.view_as(cls), plain(theirs, cls)
            assert type(a) is type(b)
            assert vars(a._visible_options).keys() == vars(b._visible_options).keys(), cls
            assert a._all_options is ours._all_options
            assert {k: str(v) for k, v in ours._all_options.items()} == \
                   {k: str(v) for k, v in theirs._all_options.items()}, cls
    assert ours.get_all_options() == theirs.get_all_options()


def test_cached_options_views_share_values_only_within_one_options_object(installed):
    from apache_beam.options.pipeline_options import DebugOptions, PipelineOptions

    flags = ["--experiments=a"]
    first, second = PipelineOptions(flags), PipelineOptions(flags)
    first.view_as(DebugOptions).add_experiment("b")
    assert first.view_as(DebugOptions).experiments == ["a", "b"]  # one object's views share its values
    assert second.view_as(DebugOptions).experiments == ["a"]      # another object's do not
    view = second.view_as(DebugOptions)
    view.experiments = ["z"]
    assert second.view_as(DebugOptions).experiments == ["z"]


def test_options_views_of_sys_argv_are_not_cached(installed, monkeypatch):
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

    monkeypatch.setattr(sys, "argv", ["x", "--direct_num_workers=3"])
    assert PipelineOptions().view_as(DirectOptions).direct_num_workers == 3
    monkeypatch.setattr(sys, "argv", ["x", "--direct_num_workers=5"])
    assert PipelineOptions().view_as(DirectOptions).direct_num_workers == 5


def _dofns():
    import apache_beam as beam
    from apache_beam.coders import VarIntCoder
    from apache_beam.transforms.userstate import BagStateSpec, TimerSpec, on_timer
    from apache_beam.transforms.timeutil import TimeDomain

    class Stateful(beam.DoFn):
        BAG = BagStateSpec("bag", VarIntCoder())
        TIMER = TimerSpec("t", TimeDomain.WATERMARK)

        def process(self, kv, bag=beam.DoFn.StateParam(BAG), t=beam.DoFn.TimerParam(TIMER)):  # noqa: B008
            yield kv

        @on_timer(TIMER)
        def fire(self, bag=beam.DoFn.StateParam(BAG)):  # noqa: B008
            yield 1

    class Plain(beam.DoFn):
        def process(self, x):
            yield x

    from tokenmill.transforms.tokenize import _TokenizeBlocks

    return [Stateful(), Plain(), beam.Map(lambda x: x).fn, _TokenizeBlocks("text", "bytes:", ())]


def test_cached_dofn_specs_equal_beams_own(installed):
    from apache_beam.transforms import userstate

    plain = userstate.get_dofn_specs.__wrapped__
    for dofn in _dofns():
        want = plain(dofn)
        for _ in range(3):
            got = userstate.get_dofn_specs(dofn)
            assert got == want
            got[0].add("mutated")  # a caller's changes stay its own
        assert userstate.is_stateful_dofn(dofn) is bool(want[0] or want[1])
    assert userstate.is_stateful_dofn(_dofns()[0]) is True


def test_beam_asks_for_dofn_specs_through_the_module(installed):
    """The cache is used only if Beam looks get_dofn_specs up on its module at each call, as 2.77 does."""
    import apache_beam as beam
    from apache_beam.transforms import userstate

    calls = []
    cached = userstate.get_dofn_specs
    userstate.get_dofn_specs = lambda dofn: calls.append(dofn) or cached(dofn)
    try:
        dofn = _dofns()[1]
        userstate.is_stateful_dofn(dofn)
        beam.ParDo(dofn).to_runner_api_parameter(_context())
    finally:
        userstate.get_dofn_specs = cached
    assert len(calls) >= 2


def _context():
    from apache_beam.runners import pipeline_context

    return pipeline_context.PipelineContext()


# -- a whole build --------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_a_build_is_byte_identical_with_and_without_the_shortcuts(tmp_path, workers):
    """`tokenmill build` as a user runs it, in process (1 worker) and with forked warm workers (2)."""
    write_jsonl(tmp_path / "a.jsonl", [{"text": f"document {i}: " + "word " * (i % 50)} for i in range(400)])
    write_jsonl(tmp_path / "b.jsonl", [{"text": "def f(x):\n    return x\n" * (i % 7)} for i in range(300)])
    shards = {}
    for switch in ("1", "0"):
        out = tmp_path / f"out-{switch}"
        proc = subprocess.run([sys.executable, "-m", "tokenmill", "build", "--input", str(tmp_path / "*.jsonl"),
                               "--output", str(out), "--tokenizer", "tiktoken:cl100k_base", "--eos",
                               "--progress", "none", f"--direct_num_workers={workers}"],
                              cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "TOKENMILL_BEAM_SHORTCUTS": switch})
        assert proc.returncode == 0, proc.stderr[-3000:]
        manifest = json.loads((out / "_manifest.json").read_text())
        shards[switch] = [(Path(f).name, (out / f).read_bytes()) for f in manifest["files"] + manifest["error_files"]]
        assert manifest["rows"] == 700
    assert shards["1"] == shards["0"]
