"""The spine: one BuildSpec from the CLI, YAML, JSON and manifests; registries; the local seam."""
from __future__ import annotations

import json
import re

import pytest

from tests.conftest import ONE_WORKER, REPO, read_rows, run_build, run_cli, write_jsonl
from tokenmill.pipelines import build, retokenize
from tokenmill.pipelines.build_spec import load_build_spec
from tokenmill.pipelines.spec import BuildSpec, SpecError, from_args
from tokenmill.schemas.manifest import read_manifest
from tokenmill.transforms import registry

ARGV = ["--input", "in/*.jsonl", "--output", "out/web", "--tokenizer", "tiktoken:cl100k_base", "--eos",
        "--block-size", "16MiB", "--text-field", "body", "--compression", "zstd:3", "--progress", "none"]
YAML = """output: out
sources:
  - name: web
    input: in/*.jsonl
    tokenizer: tiktoken:cl100k_base
    eos: true
    block_size: 16MiB
    text_field: body
    compression: zstd:3
    progress: none
"""


def test_cli_yaml_and_json_give_one_spec():
    cli = from_args(build.make_parser().parse_args(ARGV))
    (name, yaml_spec), = load_build_spec(YAML)[1]
    assert name == "web" and yaml_spec == cli
    assert BuildSpec.from_json(json.loads(json.dumps(cli.to_json()))) == cli
    assert cli.layout.block_size == 16 << 20 and cli.reader_options == {"text_field": "body"}
    assert dict(cli.tokenizer.options) == {"eos": True}


def test_resolved_spec_fills_its_modality_and_family_defaults():
    spec = from_args(build.make_parser().parse_args(ARGV)).resolved("text")
    assert spec.reader_options == {"keep_fields": None, "max_doc_bytes": 64 << 20, "text_field": "body",
                                   "txt_per_line": False}
    assert dict(spec.tokenizer.options) == {"bos": False, "engine": "tiktoken", "eos": True}
    assert BuildSpec.from_json(spec.to_json()) == spec
    assert spec.to_argv()[:4] == ["--input", "in/*.jsonl", "--tokenizer", "tiktoken:cl100k_base"]


@pytest.mark.parametrize("data,message", [
    ({"inputs": ["a"], "output": "o", "tokenizer": "bytes", "colour": 1}, "unknown key(s) colour"),
    ({"inputs": ["a"], "output": "o", "tokenizer": "bytes", "layout": {"block_size": "huge"}}, "not a size"),
    ({"inputs": ["a"], "output": "o", "tokenizer": {"spec": "bytes", "options": {"eos": "yes"}}},
     "eos must be true or false"),
    ({"inputs": ["a"], "output": "o", "tokenizer": "bytes", "reader": {"fps": "x"}}, "fps"),
    ({"output": "o", "tokenizer": "bytes"}, "required: --input"),
    ({"spec_version": 9, "inputs": ["a"], "output": "o", "tokenizer": "bytes"}, "spec_version 9"),
])
def test_bad_json_specs_are_one_line_errors(data, message):
    with pytest.raises(SpecError) as e:
        BuildSpec.from_json(data)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_spec_is_recorded_and_retokenize_reads_old_manifests_too(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "granularity matters"}, {"text": ".DefaultCellStyle"}])
    out = tmp_path / "ds"
    assert run_build(["--input", str(tmp_path / "a.jsonl"), "--output", str(out), "--tokenizer", "bytes", "--eos",
                      "--progress", "none"]) == 0
    m = read_manifest(str(out))
    assert m.spec["tokenizer"] == {"spec": "bytes", "options": {"bos": False, "eos": True}}
    assert m.build_args == ["--input", str(tmp_path / "a.jsonl"), "--tokenizer", "bytes", "--eos", "--progress",
                            "none", "--modality", "text"]
    assert retokenize.recorded_spec(m, str(out)) == BuildSpec.from_json(m.spec)
    # A manifest of the code before the spec (build_args only) reads as the same spec.
    old = json.loads((out / "_manifest.json").read_text())
    del old["spec"]
    (out / "_manifest.json").write_text(json.dumps(old))
    assert retokenize.recorded_spec(read_manifest(str(out)), str(out)) == BuildSpec.from_json(m.spec)
    assert retokenize.run([str(out), "--tokenizer", "tiktoken:o200k_base", *ONE_WORKER]) == 0
    new = read_manifest(str(out))
    assert new.tokenizer["spec"] == "tiktoken:o200k_base" and new.spec["tokenizer"]["options"]["eos"] is True
    assert new.version != m.version and new.rows == 2


def test_a_tokenizer_family_is_one_file_and_one_registry_line(tmp_path, monkeypatch):
    """tests/plugins/codepoints.py, registered with one line, builds through the real pipeline."""
    monkeypatch.setitem(registry.FAMILIES, "codepoints", "tests.plugins.codepoints:FAMILY")
    registry.shared_tokenizer.cache_clear()
    registry._option_defaults.cache_clear()
    write_jsonl(tmp_path / "a.jsonl", [{"text": "née 🚀"}])
    out = tmp_path / "ds"
    assert run_build(["--input", str(tmp_path / "a.jsonl"), "--output", str(out), "--tokenizer", "codepoints",
                      "--eos", "--progress", "none"]) == 0
    rows = read_rows(out)
    assert rows.column("tokens").to_pylist() == [[ord(c) for c in "née 🚀"] + [0x110000]]
    assert read_manifest(str(out)).token_dtype == "uint32"
    assert "codepoints" in registry.usage("text")


def test_help_lists_every_family_from_the_registry():
    proc = run_cli("tokenmill.pipelines.cli", "build", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for family in registry.families():
        for form in family.usage:
            assert form in text, form


def test_the_build_graph_has_no_modality_branches():
    """BuildDataset composes what the modality plug-in gives: no 'text'/'image'/'video' in pipelines/build.py."""
    source = (REPO / "pipelines" / "build.py").read_text()
    assert not re.search(r"[\"'](text|image|video)[\"']", source)


def test_only_the_local_seam_touches_the_local_speed_ups():
    """The zygote and mallopt are reached through pipelines/local alone; nothing imports a cycle back."""
    import subprocess

    offenders = []
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    for rel in tracked:
        if rel.startswith(("pipelines/local/", "tests/")) or not (REPO / rel).exists():
            continue
        text = (REPO / rel).read_text()
        if re.search(r"local\.zygote|import zygote|mallopt|keep_freed_memory", text):
            offenders.append(rel)
    assert offenders == []
    local_init = (REPO / "pipelines" / "local" / "__init__.py").read_text()
    assert "from tokenmill.pipelines import runners" not in local_init
    assert "tokenmill.pipelines.runners" not in (REPO / "pipelines" / "local" / "zygote.py").read_text()


@pytest.mark.parametrize("extra,message", [
    ("compression: null", "compression needs a value, not null"),
    ("progress_every: null", "progress_every needs a value, not null"),
    ("block_size: null", "block_size needs a value, not null"),
])
def test_null_values_are_refused_where_the_option_needs_one(extra, message):
    from tokenmill.pipelines.cli_errors import UsageError

    with pytest.raises(UsageError) as e:
        load_build_spec(YAML + f"    {extra}\n")
    assert message in str(e.value)
    (_, spec), = load_build_spec(YAML + "    fps: null\n    end: null\n")[1]  # "not set" is their default
    assert spec.reader_options.get("fps") is None


def test_options_of_other_families_are_ignored_but_a_strict_one_is_refused(tmp_path):
    from PIL import Image

    Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "a.png")
    ok = run_build(["--input", str(tmp_path / "a.png"), "--output", str(tmp_path / "o"), "--tokenizer", "patch:16",
                    "--eos", "--batch-size", "4", "--progress", "none"])
    assert ok == 0 and read_manifest(str(tmp_path / "o")).spec["tokenizer"]["options"] == {}
    bad = run_cli("tokenmill.pipelines.build", "--input", str(tmp_path / "a.png"), "--output", str(tmp_path / "p"),
                  "--tokenizer", "patch:16", "--engine", "bpe-openai")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "tokenmill build: error: --engine does not apply to 'patch:16' (it applies to tiktoken:)"]


def test_retokenize_with_an_unknown_family_is_one_line(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    assert run_build(["--input", str(tmp_path / "a.jsonl"), "--output", str(tmp_path / "ds"), "--tokenizer", "bytes",
                      "--progress", "none"]) == 0
    proc = run_cli("tokenmill.pipelines.cli", "retokenize", str(tmp_path / "ds"), "--tokenizer", "foo:bar")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "unknown tokenizer spec 'foo:bar'" in proc.stderr


def test_python_dash_m_tokenmill_is_the_command():
    proc = run_cli("tokenmill", "--help")
    assert proc.returncode == 0 and "retokenize" in proc.stdout and "build" in proc.stdout
