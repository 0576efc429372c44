"""`tokenmill build --config build.yaml`: several sources, one pipeline, one dataset each."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenmill.schemas.manifest import MultiDatasetRoot, read_manifest
from tokenmill.schemas.validate import validate
from tests.conftest import ONE_WORKER, read_rows, run_build, run_cli, write_jsonl


def _inputs(tmp_path: Path) -> tuple[Path, Path]:
    from PIL import Image

    text, images = tmp_path / "text", tmp_path / "images"
    text.mkdir()
    images.mkdir()
    write_jsonl(text / "a.jsonl", [{"body": "dataGridView1.DefaultCellStyle.BackColor"}, {"body": "hello"}])
    for i in range(3):
        Image.new("RGB", (20 + i, 12), (i * 50, 0, 0)).save(images / f"{i}.png")
    return text, images


def _spec(tmp_path: Path, text: Path, images: Path, **extra) -> Path:
    body = f"""
output: {tmp_path / 'mix'}
defaults:
  block_size: 1MiB
sources:
  - name: code
    input: ["{text}/*.jsonl"]
    tokenizer: tiktoken:cl100k_base
    text_field: body
    eos: true
  - name: pics
    input: {images}
    modality: image
    tokenizer: patch:8
    size: native:64
"""
    path = tmp_path / "build.yaml"
    path.write_text(body + "".join(f"{k}: {v}\n" for k, v in extra.items()))
    return path


def test_config_builds_one_versioned_dataset_per_source_and_a_root_manifest(tmp_path, capsys):
    text, images = _inputs(tmp_path)
    spec = _spec(tmp_path, text, images)
    assert run_build(["--config", str(spec)]) == 0
    mix = tmp_path / "mix"
    root = json.loads((mix / "_manifest.json").read_text())
    assert sorted(root["datasets"]) == ["code", "pics"] and "sources:" in root["config"]
    code, pics = read_manifest(str(mix / "code")), read_manifest(str(mix / "pics"))
    assert root["datasets"]["code"]["commit"] == code.commit and root["datasets"]["pics"]["rows"] == 3
    # the same result as the one-source command line it stands for
    single = tmp_path / "single"
    assert run_build(["--input", f"{text}/*.jsonl", "--output", str(single), "--tokenizer", "tiktoken:cl100k_base",
                      "--text-field", "body", "--eos", "--block-size", "1MiB"]) == 0
    assert read_rows(mix / "code").equals(read_rows(single))
    assert code.version == read_manifest(str(single)).version
    assert code.rows == 2 and code.tokens == read_manifest(str(single)).tokens
    assert pics.modality == "image" and pics.options["size_policy"] == "native:64"
    assert validate(str(mix / "code")) == [] and validate(str(mix / "pics")) == []
    with pytest.raises(MultiDatasetRoot, match="code, pics"):
        read_manifest(str(mix))
    # a rerun has nothing to do in any source, and leaves every manifest as it was
    capsys.readouterr()
    before = {p: p.read_bytes() for p in mix.glob("**/_manifest.json")}
    assert run_build(["--config", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "inputs_to_tokenize=0" in out and "commits_unchanged=2" in out
    assert {p: p.read_bytes() for p in mix.glob("**/_manifest.json")} == before and len(before) == 5


@pytest.mark.parametrize("body,message", [
    ("output: x\nsources: []\n", "'sources' must be a non-empty list"),
    ("output: x\nsourcs: []\n", "unknown key(s) sourcs"),
    ("output: x\nsources:\n  - name: a\n    input: x\n    tokenizer: bytes\n    colour: red\n",
     "source 'a': unknown key(s) colour"),
    ("output: x\nsources:\n  - name: a\n    tokenizer: bytes\n", "source 'a': the following arguments are required"),
    ("output: x\nsources:\n  - name: a b\n    input: x\n    tokenizer: bytes\n", "'name' must be"),
    ("output: x\nsources:\n  - {name: a, input: x, tokenizer: bytes}\n  - {name: a, input: y, tokenizer: bytes}\n",
     "used twice"),
    ("output: x\nsources:\n  - {name: a, input: x, tokenizer: bytes, eos: maybe}\n", "eos must be true or false"),
    ("output: x\nsources: [\n", "not valid YAML"),
    ("!!python/object/apply:os.system ['echo hacked']\n", "not valid YAML"),
])
def test_bad_build_specs_are_one_line_usage_errors(tmp_path, body, message):
    spec = tmp_path / "build.yaml"
    spec.write_text(body)
    result = run_cli("tokenmill.pipelines.build", "--config", str(spec), *ONE_WORKER)
    assert result.returncode == 2, result.stderr
    lines = [x for x in result.stderr.splitlines() if "tokenmill" in x]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "hacked" not in result.stdout
