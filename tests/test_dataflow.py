"""Dataflow readiness, offline: each pipeline translates into a Dataflow job without submitting it.

`--dry_run=True` makes DataflowRunner do everything short of the API call:
apply its overrides, build the portable pipeline proto, and stage --setup_file
as an sdist. Nothing here can reach Google Cloud, and nothing needs to.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("apache_beam.runners.dataflow.internal.apiclient", reason="needs tokenmill[gcp]")

from tokenmill.pipelines import build, fit, runners  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tokenmill.transforms.tokenizers.spec import load_text_tokenizer  # noqa: E402

DATAFLOW = ["--runner=DataflowRunner", "--dry_run=True", "--no_auth", "--sdk_location=container",
            "--project=my-project", "--region=us-central1", "--temp_location=gs://my-bucket/tmp",
            "--setup_file", str(REPO / "setup.py")]


def translate(make_pipeline, argv: list[str]) -> runners.TranslatedJob:
    _, pipeline, runner, *_ = make_pipeline([*argv, *DATAFLOW])
    assert runner == "DataflowRunner"
    job = runners.translated_job(pipeline.run())
    assert job is not None
    return job


def outer_steps(job: runners.TranslatedJob, within: str = "") -> list[str]:
    """Step names directly below `within` (a composite's name), or the top-level ones."""
    prefix = f"{within}/" if within else ""
    return [s[len(prefix):] for s in job.steps if s.startswith(prefix) and "/" not in s[len(prefix):]]


DATASET_STEPS = ["ReadFailuresAsErrors", "DecodeFailuresAsErrors", "TokenizeFailuresAsErrors", "FileErrorsAsBlocks",
                 "JoinRejected", "WriteTokenShards", "WriteRejectedShards", "CarryOverUnchanged", "JoinShardResults",
                 "CommitManifest"]


@pytest.fixture(scope="module")
def text_job() -> runners.TranslatedJob:
    return translate(build.make_pipeline, ["--input", "gs://my-bucket/raw/*.jsonl.zst", "--output",
                                           "gs://my-bucket/tokens/v1", "--tokenizer", "tiktoken:cl100k_base",
                                           "--eos"])


def test_text_build_translates_to_the_expected_dataflow_steps(text_job):
    assert outer_steps(text_job) == ["BuildDataset"]
    assert outer_steps(text_job, "BuildDataset") == ["ReadTextShards", "DecodeText", "TokenizeText", *DATASET_STEPS]
    for step in ("ReadTextShards/ListInputs/ListAndCompare", "ReadTextShards/PlanReadTasks",
                 "ReadTextShards/SpreadOverWorkers", "ReadTextShards/ReadBlocks", "TokenizeText/EncodeBlocks",
                 "WriteTokenShards/WriteShards", "CarryOverUnchanged/CarryShards", "CommitManifest/Commit"):
        assert f"BuildDataset/{step}" in text_job.steps
    print("\n" + text_job.describe())  # the step list quoted for issue 7 (pytest -s shows it)


def test_image_build_translates_to_the_expected_dataflow_steps():
    job = translate(build.make_pipeline, ["--input", "gs://my-bucket/images/*.tar", "--output",
                                          "gs://my-bucket/tokens/img", "--tokenizer", "patch:16"])
    assert outer_steps(job, "BuildDataset") == ["ReadImageShards", "DecodeImages", "TokenizeImages",
                                                *DATASET_STEPS]
    assert "BuildDataset/ReadImageShards/ListInputs/ListAndCompare" in job.steps
    assert "workflow.tar.gz" in job.staged


def test_video_build_translates_to_the_expected_dataflow_steps():
    job = translate(build.make_pipeline, ["--input", "gs://my-bucket/videos/*.mp4", "--output",
                                          "gs://my-bucket/tokens/vid", "--tokenizer", "patch:2,16", "--fps", "8"])
    assert outer_steps(job, "BuildDataset") == ["ReadVideoShards", "DecodeVideos", "TokenizeVideos", *DATASET_STEPS]
    assert "BuildDataset/DecodeVideos/DecodeVideoClips" in job.steps
    assert "workflow.tar.gz" in job.staged


def test_config_build_translates_to_one_branch_per_source(tmp_path):
    from tokenmill.pipelines import build_spec

    spec = tmp_path / "build.yaml"
    spec.write_text("output: gs://my-bucket/mix\nsources:\n"
                    "  - {name: web, input: 'gs://my-bucket/raw/*.jsonl.zst', tokenizer: 'tiktoken:cl100k_base'}\n"
                    "  - {name: photos, input: 'gs://my-bucket/images/*.tar', modality: image, tokenizer: 'patch:16'}\n"
                    "  - {name: clips, input: 'gs://my-bucket/videos/*.mp4', tokenizer: 'patch:2,16'}\n")
    _, sources = build_spec.load_build_spec(spec.read_text())
    options = runners.pipeline_options(DATAFLOW)
    metas, resolved = {}, []
    for name, source in sources:
        source, metas[name], _ = build.prepare(source, local=False)
        resolved.append((name, source))
    pipeline = build_spec.build_config_pipeline("gs://my-bucket/mix", spec.read_text(), resolved, metas, options)
    job = runners.translated_job(pipeline.run())
    assert outer_steps(job) == ["Build web", "Name web", "Build photos", "Name photos", "Build clips",
                                "Name clips", "JoinDatasets", "GatherDatasets", "WriteRootManifest"]
    assert outer_steps(job, "Build clips")[:3] == ["ReadVideoShards", "DecodeVideos", "TokenizeVideos"]
    assert "Build photos/TokenizeImages/EncodeImageBlocks" in job.steps
    assert "workflow.tar.gz" in job.staged


def test_fit_translates_to_the_expected_dataflow_steps():
    job = translate(fit.make_pipeline, ["--kind", "vq", "--input", "gs://my-bucket/images/*.tar",
                                        "--output", "gs://my-bucket/codebooks/vq.npz", "--codes", "64"])
    assert outer_steps(job) == ["ReadImageShards", "DecodeImages", "SamplePatches", "GatherSkipped", "GatherHoldout",
                                "GatherSamples", "FitAndWrite"]
    assert "workflow.tar.gz" in job.staged


def test_launcher_lists_no_input_and_probes_no_output_for_a_remote_runner(tmp_path):
    """A local glob that matches nothing is a usage error locally, but a remote
    job lists its inputs on the workers: translating it must not look."""
    missing = str(tmp_path / "nowhere" / "*.jsonl")
    unwritable = str(tmp_path / "file-not-dir")
    Path(unwritable).write_text("x")
    job = translate(build.make_pipeline, ["--input", missing, "--output", unwritable,
                                          "--tokenizer", "bytes", "--modality", "text"])
    assert "BuildDataset/ReadTextShards" in job.steps
    assert not (tmp_path / "nowhere").exists()
    assert Path(unwritable).read_text() == "x"
    # The same command on the local runner checks, and says why in one line.
    with pytest.raises(SystemExit) as exit_info:
        build.run(["--input", missing, "--output", str(tmp_path / "out"), "--tokenizer", "bytes"])
    assert exit_info.value.code == 2


def test_dry_run_on_the_command_line_prints_the_translated_job(capsys):
    code = build.run(["--input", "gs://my-bucket/raw/*.jsonl", "--output", "gs://my-bucket/tokens/v2",
                      "--tokenizer", "bytes", *DATAFLOW])
    out = capsys.readouterr().out
    assert code == 0
    assert "translated job (not submitted)" in out
    assert "      TokenizeText\n" in out and "      CommitManifest\n" in out
    assert "workflow.tar.gz <- " in out


def _package_files() -> set[str]:
    """Every file a worker may need: git-tracked files in tokenmill's packages."""
    listed = subprocess.run(["git", "ls-files", "pipelines", "transforms", "schemas", "loaders", "reports"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    return {f for f in listed if not f.endswith((".pyc", ".md"))}


def test_staged_sdist_holds_every_package_and_data_file(text_job):
    sdist = text_job.staged["workflow.tar.gz"]
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert "transforms/tokenizers/data/o200k_base.tiktoken.gz" in names
    assert _package_files() - names == set()


def test_staged_sdist_installs_and_loads_the_bundled_vocabulary(text_job, tmp_path):
    """What a Dataflow worker does with --setup_file: pip install the sdist, then import from it."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(target),
                    text_job.staged["workflow.tar.gz"]], check=True, capture_output=True, timeout=300)
    code = ("import tokenmill.transforms as transforms, sys; from tokenmill.transforms.tokenizers.spec import load_text_tokenizer; "
            "t = load_text_tokenizer('tiktoken:o200k_base'); "
            "print(transforms.__file__); print(t.encode('hello world').tolist())")
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    where, ids = done.stdout.splitlines()
    assert where.startswith(str(target))
    assert ids == str(load_text_tokenizer("tiktoken:o200k_base").encode("hello world").tolist()) == "[24912, 2375]"
