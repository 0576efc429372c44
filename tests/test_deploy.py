"""The scheduling examples under deploy/: as far as this machine can run them."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tokenmill.pipelines import build_spec
from tokenmill.schemas.manifest import read_manifest
from tokenmill.schemas.validate import validate
from tests.conftest import ONE_WORKER, REPO, write_jsonl

DEPLOY = REPO / "deploy"


def _tokenmill_calls(line: str) -> list[list[str]]:
    words = shlex.split(line)
    return [words[i + 1:] for i, w in enumerate(words) if w.endswith("bin/tokenmill") or w == "tokenmill"]


def test_crontab_lines_are_valid_schedules_of_tokenmill_commands():
    lines = [x for x in (DEPLOY / "cron" / "crontab").read_text().splitlines() if x and not x.startswith("#")]
    assert len(lines) == 2
    for line in lines:
        fields = line.split()[:5]
        assert all(re.fullmatch(r"[\d*/,-]+", f) for f in fields), line
        (call,) = _tokenmill_calls(line.split(None, 5)[5].split(">>")[0])
        if call[0] == "build":
            args, rest = build_spec._config_parser().parse_known_args(call[1:])
            assert args.config.endswith("build.yaml") and rest == []
        else:
            assert call[0] == "gc" and "--keep" in call


def test_flex_template_metadata_describes_the_entry_points_parameters():
    meta = json.loads((DEPLOY / "flex_template" / "metadata.json").read_text())
    assert meta["name"] and meta["description"] and meta["streaming"] is False
    names = [p["name"] for p in meta["parameters"]]
    assert names == ["config", "overwrite"]
    for p in meta["parameters"]:
        assert {"name", "label", "helpText", "isOptional"} <= set(p) and isinstance(p["isOptional"], bool)
        assert re.fullmatch(r"[a-z][a-z0-9_]*", p["name"])
        for rx in p.get("regexes", []):
            re.compile(rx)
    config_rx, overwrite_rx = (re.compile(p["regexes"][0]) for p in meta["parameters"])
    assert config_rx.match("gs://my-bucket/tokenmill/build.yaml") and not config_rx.match("/local/build.yaml")
    assert overwrite_rx.match("true") and not overwrite_rx.match("yes please")
    # every parameter, as the launcher passes it, is accepted by the entry point
    sys.path.insert(0, str(DEPLOY / "flex_template"))
    try:
        import main as entry
    finally:
        sys.path.pop(0)
    argv = entry.to_build_argv(["--config=gs://b/x/build.yaml", "--overwrite=true", "--runner=DataflowRunner"])
    args, rest = build_spec._config_parser().parse_known_args(argv)
    assert args.config == "gs://b/x/build.yaml" and args.overwrite and rest == ["--runner=DataflowRunner"]
    assert entry.to_build_argv(["--overwrite=false"]) == []


def test_flex_template_dockerfile_copies_what_exists():
    text = (DEPLOY / "flex_template" / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.M):
        for path in src.split():
            assert (REPO / path).exists(), path
    assert 'FLEX_TEMPLATE_PYTHON_PY_FILE="${WORKDIR}/main.py"' in text
    assert 'FLEX_TEMPLATE_PYTHON_SETUP_FILE="${WORKDIR}/setup.py"' in text
    # The launcher's folder (first on sys.path) must hold no package folder, or it shadows the installed
    # tokenmill; the package is installed from another folder.
    launcher = text[text.index("WORKDIR ${WORKDIR}"):]
    assert re.findall(r"^COPY (?!--from)(\S+)", launcher, flags=re.M) == ["setup.py", "deploy/flex_template/main.py"]
    assert text.index("RUN pip install") < text.index("WORKDIR ${WORKDIR}")


def test_flex_template_entry_point_runs_a_build_spec_locally(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "scheduled"}, {"text": "runs"}])
    spec = tmp_path / "build.yaml"
    spec.write_text(f"output: {tmp_path / 'out'}\nsources:\n"
                    f"  - {{name: web, input: '{tmp_path}/*.jsonl', tokenizer: 'tiktoken:cl100k_base'}}\n")
    cmd = [sys.executable, str(DEPLOY / "flex_template" / "main.py"), f"--config={spec}", "--overwrite=false",
           *ONE_WORKER]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    m = read_manifest(str(tmp_path / "out" / "web"))
    assert m.rows == 2 and validate(str(tmp_path / "out" / "web")) == []
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "commits_unchanged=1" in again.stdout
    assert read_manifest(str(tmp_path / "out" / "web")).commit == m.commit


AIRFLOW_PYTHON = REPO / ".venv-airflow" / "bin" / "python"


@pytest.mark.skipif(not AIRFLOW_PYTHON.exists(), reason="Airflow is not installed in .venv-airflow "
                                                        "(./run_local.sh test installs it)")
def test_airflow_dag_imports_and_builds_its_tasks(tmp_path):
    probe = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("dag", sys.argv[1])
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
t = m.dag.get_task("tokenmill_build")
print(json.dumps({"dag": m.dag.dag_id, "tasks": sorted(m.dag.task_ids), "type": type(t).__name__,
                  "runner": t.runner, "py_file": t.py_file, "py_options": t.py_options,
                  "options": t.pipeline_options, "schedule": str(m.dag.schedule if hasattr(m.dag, "schedule") else "")}))
"""
    env = {"AIRFLOW_HOME": str(tmp_path), "TOKENMILL_GC": "gs://my-bucket/mix/web gs://my-bucket/mix/pics",
           "TOKENMILL_CONFIG": "gs://my-bucket/tokenmill/build.yaml", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([str(AIRFLOW_PYTHON), "-c", probe, str(DEPLOY / "airflow" / "tokenmill_dag.py")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["dag"] == "tokenmill_nightly" and info["type"] == "BeamRunPythonPipelineOperator"
    assert info["tasks"] == ["tokenmill_build", "tokenmill_gc_pics", "tokenmill_gc_web"]
    assert info["runner"] == "DataflowRunner" and [*info["py_options"], info["py_file"]] == ["-m", "tokenmill.pipelines.build"]
    assert info["options"]["config"] == "gs://my-bucket/tokenmill/build.yaml"
    assert Path(info["options"]["setup_file"]).resolve() == REPO / "setup.py"
    # the options the Beam operator passes (--name=value) are what `tokenmill build --config` accepts
    argv = [f"--{k}={v}" for k, v in info["options"].items()]
    args, rest = build_spec._config_parser().parse_known_args(argv)
    assert args.config == info["options"]["config"] and "--region=us-central1" in rest
