"""export: torch.export programs (.pt2) against torchscript: on the same modules, built by the test.

The modules are the Cosmos-style encoders of tests/test_torchscript.py and
tests/test_video.py, scripted and exported (with Dim dynamic shapes), built
through the real pipeline and compared column by column.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tests.conftest import read_errors, read_rows, run_build
from tests.test_torchscript import ContinuousEncoder, DiscreteEncoder, direct, scene
from tests.test_video import ContinuousVideoEncoder, DiscreteVideoEncoder, make_video
from tokenmill.pipelines import build
from tokenmill.schemas.manifest import read_manifest
from tokenmill.transforms.tokenizers.base import TokenizerSpecError
from tokenmill.transforms.tokenizers.spec import load_image_tokenizer

Dim = torch.export.Dim
SIZES = [(64, 64), (50, 70), (33, 17), (64, 64)]


def export_image(module: torch.nn.Module, path: Path, dtype=torch.float32, **save) -> Path:
    """Exported with a dynamic batch and any H, W that are multiples of 8 (the encoders' stride)."""
    shapes = {"x": {0: Dim("B", max=64), 2: 8 * Dim("h", max=128), 3: 8 * Dim("w", max=128)}}
    program = torch.export.export(module.to(dtype).eval(), (torch.zeros(2, 3, 64, 64, dtype=dtype),),
                                  dynamic_shapes=shapes)
    torch.export.save(program, path, **save)
    return path


def export_video(module: torch.nn.Module, path: Path, **save) -> Path:
    """T = 1 + 4k frames (the causal first frame plus groups of 4), H and W multiples of 8."""
    shapes = {"x": {0: Dim("B", max=64), 2: 4 * Dim("k", max=16) + 1, 3: 8 * Dim("h", max=64),
                    4: 8 * Dim("w", max=64)}}
    program = torch.export.export(module.eval(), (torch.zeros(2, 3, 9, 32, 48),), dynamic_shapes=shapes)
    torch.export.save(program, path, **save)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("imgs")
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(scene(h, w, i)).save(folder / f"i{i}.png")
    return folder


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    make_video(folder / "a.mp4", n=11, w=40, h=24)
    make_video(folder / "b.mp4", n=7, w=32, h=32)
    return folder


IMAGE_MODULES = {"discrete": DiscreteEncoder, "continuous": ContinuousEncoder}
VIDEO_MODULES = {"discrete": DiscreteVideoEncoder, "continuous": ContinuousVideoEncoder}


@pytest.fixture(scope="module")
def twin_builds(tmp_path_factory, images, videos):
    """(modality, kind) -> the torchscript: and export: datasets of the same module, built lazily."""
    built: dict[tuple[str, str], tuple[Path, Path]] = {}

    def get(modality: str, kind: str) -> tuple[Path, Path]:
        if (modality, kind) not in built:
            tmp = tmp_path_factory.mktemp(f"{modality}-{kind}")
            module = (IMAGE_MODULES if modality == "image" else VIDEO_MODULES)[kind]()
            scripted = tmp / "enc.jit"
            torch.jit.script(module).save(str(scripted))
            save = {"extra_files": {"vocab_size": str(module.vocab_size)}} if kind == "discrete" else {}
            exported = (export_image if modality == "image" else export_video)(module, tmp / "enc.pt2", **save)
            common = (["--input", str(images / "*.png")] if modality == "image" else
                      ["--input", str(videos), "--clip-frames", "6", "--temporal-factor", "4"])
            outs = []
            for spec in (f"torchscript:{scripted}", f"export:{exported}"):
                out = tmp / spec.partition(":")[0]
                assert run_build([*common, "--output", str(out), "--tokenizer", spec, "--batch-size", "2"]) == 0
                outs.append(out)
            built[modality, kind] = tuple(outs)
        return built[modality, kind]

    return get


@pytest.mark.parametrize("modality,kind", [("image", "discrete"), ("image", "continuous"),
                                           ("video", "discrete"), ("video", "continuous")])
def test_exported_and_scripted_encoder_give_byte_identical_token_columns(twin_builds, modality, kind):
    scripted, exported = twin_builds(modality, kind)
    ms, me = read_manifest(str(scripted)), read_manifest(str(exported))
    assert me.tokenizer["kind"] == ms.tokenizer["kind"] == ("hard" if kind == "discrete" else "soft")
    assert me.errors == ms.errors == 0 and me.rows == ms.rows == (4 if modality == "image" else 2)
    assert me.tokenizer["fingerprint"] != ms.tokenizer["fingerprint"]
    payload = "tokens" if kind == "discrete" else "latents"
    a, b = read_rows(scripted), read_rows(exported)
    for column in ("id", payload, "grid", "num_tokens") + (("padding",) if modality == "video" else ()):
        assert a.column(column).equals(b.column(column)), column
    if kind == "discrete":
        assert me.tokenizer["vocab_size"] == ms.tokenizer["vocab_size"]  # the .pt2's extra file vocab_size
    # The Parquet files themselves hold the same token bytes.
    col = lambda root, m: pq.read_table(root / m.files[0], columns=[payload]).column(payload)  # noqa: E731
    assert col(scripted, ms).equals(col(exported, me))


def test_exported_images_of_several_sizes_are_bucketed_by_shape_not_padded_to_the_largest(twin_builds, images):
    _, exported = twin_builds("image", "discrete")
    module = DiscreteEncoder()
    rows = {Path(r["source"]).name: r for r in read_rows(exported).to_pylist()}
    for i, (h, w) in enumerate(SIZES):
        row = rows[f"i{i}.png"]
        indices, _ = direct(module, scene(h, w, i))  # this image alone, padded to its own multiple of 16
        assert row["grid"] == [-(-h // 16) * 2, -(-w // 16) * 2]
        assert row["tokens"] == indices[0].reshape(-1).tolist()


def test_a_program_exported_for_one_shape_makes_error_rows_of_the_other_sizes(tmp_path, images):
    program = torch.export.export(ContinuousEncoder().eval(), (torch.zeros(1, 3, 64, 64),))  # no dynamic shapes
    torch.export.save(program, tmp_path / "static.pt2")
    out = tmp_path / "ds"
    assert run_build(["--input", str(images / "*.png"), "--output", str(out), "--tokenizer",
                      f"export:{tmp_path / 'static.pt2'}", "--max-error-fraction", "1"]) == 0
    assert sorted(Path(r["source"]).name for r in read_rows(out).to_pylist()) == ["i0.png", "i3.png"]
    errors = read_errors(out)
    assert [(Path(e["source"]).name, e["stage"]) for e in errors] == [("i1.png", "tokenize"), ("i2.png", "tokenize")]
    assert "failed on input 1x3x64x80" in errors[0]["message"] and "1x3x48x32" in errors[1]["message"]


def _rewritten(src: Path, dst: Path, change) -> Path:
    """A copy of a .pt2 whose models/model.json is changed by `change` (what an attacker could ship)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name.endswith("models/model.json"):
                data = json.dumps(change(json.loads(data))).encode()
            zout.writestr(name, data)
    return dst


def test_pt2_loader_refuses_programs_that_would_run_code(tmp_path):
    good = export_image(DiscreteEncoder(), tmp_path / "good.pt2")
    marker = tmp_path / "ran"

    def expression(j):  # sympy.sympify evaluates Python: torch.export.load runs this while loading
        size = next(s for tv in j["graph_module"]["graph"]["tensor_values"].values() for s in tv["sizes"]
                    if "as_expr" in s)
        size["as_expr"]["expr_str"] = f"__import__('pathlib').Path({str(marker)!r}).touch() or 1"
        return j

    def target(j):  # torch resolves targets by attribute path under torch: torch.os.system is os.system
        node = next(n for n in j["graph_module"]["graph"]["nodes"] if n["target"] == "torch.ops.aten.tanh.default")
        node["target"] = "torch.os.system"
        node["inputs"] = [{"name": "command", "arg": {"as_string": f"touch {marker}"}, "kind": 1}]
        return j

    evil = _rewritten(good, tmp_path / "evil.pt2", expression)
    with pytest.raises(TokenizerSpecError, match="shape expression that is not plain sympy"):
        load_image_tokenizer(f"export:{evil}")
    assert not marker.exists()
    try:  # the check is not idle: torch itself runs the expression
        torch.export.load(str(evil))
    except Exception:  # noqa: BLE001 - whatever it raises after, the code has run
        pass
    assert marker.exists()
    with pytest.raises(TokenizerSpecError, match="'torch.os.system', which is not a torch operator"):
        load_image_tokenizer(f"export:{_rewritten(good, tmp_path / 'target.pt2', target)}")


def test_pt2_loader_refuses_pickled_weights(tmp_path):
    good = export_image(ContinuousEncoder(), tmp_path / "good.pt2")
    bad = tmp_path / "pickled.pt2"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name.endswith("model_weights_config.json"):
                config = json.loads(data)
                next(iter(config["config"].values()))["use_pickle"] = True
                data = json.dumps(config).encode()
            zout.writestr(name, data)
    with pytest.raises(TokenizerSpecError, match="stored with pickle"):
        load_image_tokenizer(f"export:{bad}")


def test_vocabulary_from_a_buffer_or_the_option(tmp_path):
    class WithBuffer(DiscreteEncoder):
        def __init__(self):
            super().__init__()
            self.register_buffer("codebook_size", torch.tensor(625))

    assert load_image_tokenizer(f"export:{export_image(WithBuffer(), tmp_path / 'b.pt2')}").vocab_size == 625
    plain = export_image(DiscreteEncoder(), tmp_path / "plain.pt2")
    with pytest.raises(TokenizerSpecError, match="declares no vocab_size; pass --vocab-size"):
        load_image_tokenizer(f"export:{plain}")
    assert load_image_tokenizer(f"export:{plain}", vocab_size=700).vocab_size == 700


def test_dtypes_fp16_and_bf16(tmp_path):
    image = scene(40, 24, 0)
    scripted = tmp_path / "enc.jit"
    torch.jit.script(ContinuousEncoder()).save(str(scripted))
    fp32 = load_image_tokenizer(f"torchscript:{scripted}")
    fp16 = load_image_tokenizer(f"torchscript:{scripted}", dtype="fp16")
    assert fp16.latent_dtype == "float16" and fp16.metadata()["dtype"] == "fp16"
    assert fp16.fingerprint() != fp32.fingerprint()
    (a, _), (b, _) = fp32.encode_image(image), fp16.encode_image(image)
    assert b.dtype == np.float16 and np.allclose(a, b.astype(np.float32), atol=2e-2)
    exported32 = export_image(ContinuousEncoder(), tmp_path / "fp32.pt2")
    with pytest.raises(TokenizerSpecError, match="exported for float32 inputs; --dtype bf16"):
        load_image_tokenizer(f"export:{exported32}", dtype="bf16")
    bf16 = load_image_tokenizer(f"export:{export_image(ContinuousEncoder(), tmp_path / 'bf.pt2', torch.bfloat16)}",
                                dtype="bf16")
    latents, _ = bf16.encode_image(image)
    assert bf16.latent_dtype == "bfloat16" and latents.dtype == np.uint16
    widened = (latents.astype(np.uint32) << 16).view(np.float32)
    assert np.allclose(widened, a, atol=5e-2)


def test_device_cuda_without_cuda_is_one_line(tmp_path, images, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model = export_image(ContinuousEncoder(), tmp_path / "enc.pt2")
    with pytest.raises(SystemExit) as exit_:
        build.run(["--input", str(images / "*.png"), "--output", str(tmp_path / "o"), "--tokenizer",
                   f"export:{model}", "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1
    assert "--device cuda: CUDA is not available here" in err[0] and "use --device cpu" in err[0]


def test_a_file_that_is_not_a_pt2_is_one_line_exit_2(tmp_path, images, capsys):
    (tmp_path / "junk.pt2").write_bytes(b"not a program")
    with pytest.raises(SystemExit) as exit_:
        build.run(["--input", str(images / "*.png"), "--output", str(tmp_path / "o"), "--tokenizer",
                   f"export:{tmp_path / 'junk.pt2'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1
    assert "cannot load exported program" in err[0] and "not a .pt2 archive" in err[0]
    assert not (tmp_path / "o" / "_manifest.json").exists()


def test_model_handler_under_runinference_gives_the_tokenizers_tokens_and_keeps_failures_as_data(tmp_path):
    import apache_beam as beam
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.util import assert_that, equal_to

    from tokenmill.transforms.neural_inference import NeuralModelHandler

    program = torch.export.export(ContinuousEncoder().eval(), (torch.zeros(1, 3, 64, 64),))  # 64 x 64 only
    torch.export.save(program, tmp_path / "static.pt2")
    spec = f"export:{tmp_path / 'static.pt2'}"
    images = {f"i{i}": scene(h, w, i) for i, (h, w) in enumerate(SIZES)}
    want = [(key, ("failed on input" in str(r)) if isinstance(r, Exception) else (r[0].tobytes(), r[1]))
            for key, r in zip(images, load_image_tokenizer(spec).encode_images(list(images.values())))]
    assert sum(isinstance(v, bool) for _, v in want) == 2  # the two images the program refuses

    def seen(kv):
        key, result = kv
        r = result.inference
        return key, ("failed on input" in str(r)) if isinstance(r, Exception) else (r[0].tobytes(), r[1])

    options = PipelineOptions(["--runner=FnApiRunner", "--direct_num_workers=1", "--direct_running_mode=in_memory"])
    with beam.Pipeline(options=options) as p:
        results = (p | beam.Create(sorted(images.items()))
                   | RunInference(KeyedModelHandler(NeuralModelHandler(spec, "image", {"batch_size": 2}))))
        assert_that(results | beam.Map(seen), equal_to(want))


def test_export_reads_a_program_from_a_uri(tmp_path):
    import fsspec

    data = export_image(DiscreteEncoder(), tmp_path / "enc.pt2", extra_files={"vocab_size": "625"}).read_bytes()
    with fsspec.open("memory://models/enc.pt2", "wb") as f:
        f.write(data)
    uri_tokenizer = load_image_tokenizer("export:memory://models/enc.pt2")
    local = load_image_tokenizer(f"export:{tmp_path / 'enc.pt2'}")
    assert uri_tokenizer.vocab_size == 625 and uri_tokenizer.identity() == local.identity()
    image = scene(40, 24, 0)
    assert np.array_equal(uri_tokenizer.encode_image(image)[0], local.encode_image(image)[0])
