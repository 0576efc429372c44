"""Schema definitions: every modality and kind, JSON export, the CLI, _schema.json."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest

from tokenmill.schemas.tables import DEFINED, dataset_schema, describe, read_metadata, schema_differences
from tests.conftest import run_build, run_cli, write_jsonl


@pytest.mark.parametrize("modality,kind", sorted(DEFINED))
def test_every_definition_has_the_common_and_kind_columns(modality, kind):
    schema = dataset_schema(modality, kind, token_dtype="uint16", latent_dtype="bfloat16", dim=16,
                            metadata={"fingerprint": "x"})
    assert schema.names[:4] == ["id", "source", "locator", "modality"]
    assert ("tokens" in schema.names) == (kind == "hard") and ("latents" in schema.names) == (kind == "soft")
    assert "num_tokens" in schema.names
    if kind == "hard":
        assert schema.field("tokens").type.value_type == pa.uint16()
    else:
        assert schema.field("latents").type == pa.binary()  # num_tokens x dim values per row
    if modality != "text":
        assert schema.field("grid").type.list_size == (2 if modality == "image" else 3)
        assert schema.field("orig_height").nullable
    if modality == "video":
        assert {"clip_start", "clip_end", "fps", "frame_indices"} <= set(schema.names)
    assert read_metadata(schema) == {"fingerprint": "x", "schema_version": 1}
    assert all(f.metadata[b"doc"] for f in schema)


def test_json_definition_names_parameters_until_given():
    generic = describe("image", "soft")
    latents = next(f for f in generic["fields"] if f["name"] == "latents")
    assert latents["type"] == "binary"
    assert latents["tensor"] == {"element": {"param": "latent_storage"}, "shape": ["num_tokens", {"param": "dim"}],
                                 "order": "row-major", "byte_order": "little"}
    concrete = describe("image", "soft", latent_dtype="float16", dim=16)
    latents = next(f for f in concrete["fields"] if f["name"] == "latents")
    assert latents["tensor"]["element"] == "halffloat" and latents["tensor"]["shape"] == ["num_tokens", 16]
    grid = next(f for f in concrete["fields"] if f["name"] == "grid")
    assert grid["type"] == {"fixed_size_list": "int32", "size": 2}
    tokens = next(f for f in describe("text", "hard", token_dtype="uint32")["fields"] if f["name"] == "tokens")
    assert tokens["type"] == {"list": "uint32"}


def test_schema_command_prints_json_and_refuses_undefined_pairs():
    proc = run_cli("tokenmill.pipelines.cli", "schema", "--modality", "image", "--kind", "soft", "--format", "json")
    assert proc.returncode == 0
    parsed = json.loads(proc.stdout)
    assert parsed["modality"] == "image" and parsed["kind"] == "soft"
    assert [f["name"] for f in parsed["fields"]][:4] == ["id", "source", "locator", "modality"]
    bad = run_cli("tokenmill.pipelines.cli", "schema", "--modality", "text", "--kind", "soft")
    assert bad.returncode == 2 and "no text/soft schema" in bad.stderr


def test_schema_differences_are_precise():
    want = dataset_schema("text", "hard", token_dtype="uint32")
    got = dataset_schema("text", "hard", token_dtype="uint16").remove(3)
    assert schema_differences(got, want) == ["missing column 'modality' (string)",
                                             "column 'tokens' is list<element: uint16 not null>, "
                                             "expected list<element: uint32 not null>"]


def test_build_writes_schema_json_next_to_the_manifest(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "hello"}])
    out = tmp_path / "out"
    assert run_build(["--input", str(tmp_path / "a.jsonl"), "--output", str(out), "--tokenizer", "bytes"]) == 0
    written = json.loads((out / "_schema.json").read_text())
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["schema_file"] == "_schema.json"
    expected = describe("text", "hard", token_dtype="uint16", metadata=manifest["tokenizer"])
    assert written == json.loads(json.dumps(expected))
