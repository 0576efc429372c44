"""diffusers: tiny autoencoders (AutoencoderKL, VQModel, AutoencoderKLWan) built from configs with random
weights, saved with save_pretrained, and run through real builds; rows and decodes are checked against direct
calls of the library on the same inputs."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, AutoencoderKLWan, VQModel  # noqa: E402

from tokenmill.pipelines import commands  # noqa: E402
from tokenmill.schemas.manifest import read_manifest  # noqa: E402
from tokenmill.schemas.validate import validate  # noqa: E402
from tests.conftest import REPO, read_errors, read_rows, run_build  # noqa: E402
from tests.test_video import make_video  # noqa: E402
from tokenmill.transforms.decoders.images import decode_image  # noqa: E402
from tokenmill.transforms.decoders.video import ClipSpec, iter_clips  # noqa: E402
from tokenmill.transforms.decoders.images import SizePolicy  # noqa: E402
from tokenmill.transforms.tokenizers.base import TokenizerSpecError  # noqa: E402
from tokenmill.transforms.tokenizers.spec import load_image_tokenizer  # noqa: E402

# Float tolerance between a build's rows and a direct call: the build batches 2 images per call, the direct call
# one, and oneDNN's convolutions may round differently by batch size (seen: about 1e-7).
ATOL = 1e-5
SHAPES = [(32, 32), (30, 45), (17, 9), (32, 32)]  # (17, 9): odd sizes, padded to 18 x 10
TINY = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("diffusers-models")
    torch.manual_seed(0)
    out = {"kl": folder / "kl", "vq": folder / "vq", "wan": folder / "wan"}
    AutoencoderKL(**TINY, scaling_factor=0.3611, shift_factor=0.1159).save_pretrained(out["kl"])  # FLUX's factors
    VQModel(**TINY, num_vq_embeddings=64, vq_embed_dim=4).save_pretrained(out["vq"])
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                     temperal_downsample=[False, True, True], latents_mean=[0.1, 0.2, 0.3, 0.4],
                     latents_std=[1.5, 1.0, 2.0, 0.5]).save_pretrained(out["wan"])
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Gradients of several sizes, a grayscale PNG (made RGB by the decoder) and a file that is no image."""
    folder = tmp_path_factory.mktemp("diffusers-images")
    for i, (h, w) in enumerate(SHAPES):
        y, x = np.mgrid[0:h, 0:w]
        Image.fromarray(np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 60 * i)], -1).astype(np.uint8)
                        ).save(folder / f"i{i}.png")
    Image.fromarray((np.arange(20 * 24).reshape(20, 24) % 256).astype(np.uint8), "L").save(folder / "gray.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return folder


def build(images: Path, model: Path, out: Path, *extra: str) -> Path:
    assert run_build(["--input", str(images / "*.png"), "--output", str(out), "--tokenizer", f"diffusers:{model}",
                      "--batch-size", "2", "--progress", "none", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def kl_dataset(models, images, tmp_path_factory) -> Path:
    return build(images, models["kl"], tmp_path_factory.mktemp("kl") / "ds")


def model_input(image: np.ndarray, multiple: int) -> torch.Tensor:
    """The documented input: edge-padded bottom/right to the multiple, x / 127.5 - 1, 1 x 3 x H x W."""
    H, W = image.shape[:2]
    padded = np.pad(image, ((0, -H % multiple), (0, -W % multiple), (0, 0)), mode="edge")
    return torch.from_numpy(padded).permute(2, 0, 1)[None].float() / 127.5 - 1


def latents(row: dict) -> np.ndarray:
    return np.frombuffer(row["latents"], "<f4").reshape(row["num_tokens"], -1)


def source_image(row: dict) -> np.ndarray:
    return decode_image(Path(row["source"]).read_bytes())[0]


def test_kl_rows_are_the_latent_mean_of_the_library_on_the_padded_input(models, kl_dataset):
    assert validate(str(kl_dataset)) == []
    m = read_manifest(str(kl_dataset))
    tok = m.tokenizer
    assert (tok["kind"], tok["dim"], tok["class"], tok["latent"]) == ("soft", 4, "AutoencoderKL", "mean")
    assert (tok["scaling_factor"], tok["shift_factor"], tok["latents_mean"]) == (0.3611, 0.1159, None)
    assert tok["geometry"]["pad_multiple"] == 2
    vae = AutoencoderKL.from_pretrained(models["kl"]).eval()
    rows = read_rows(kl_dataset).to_pylist()
    assert len(rows) == 5  # four RGB images and the grayscale one
    for row in rows:
        image = source_image(row)
        with torch.inference_mode():
            mean = vae.encode(model_input(image, 2)).latent_dist.mean[0]
        assert row["grid"] == list(mean.shape[1:]) and (row["height"], row["width"]) == image.shape[:2]
        np.testing.assert_allclose(latents(row), mean.reshape(4, -1).T.numpy(), atol=ATOL, rtol=0)
    by_name = {Path(r["source"]).name: r for r in rows}
    assert by_name["i2.png"]["grid"] == [9, 5] and by_name["gray.png"]["grid"] == [10, 12]
    (error,) = read_errors(kl_dataset)
    assert Path(error["source"]).name == "broken.png" and error["stage"] == "decode"


def test_decode_is_the_library_decoder_on_the_stored_latents_cropped_to_the_row(models, kl_dataset, tmp_path):
    row = next(r for r in read_rows(kl_dataset).to_pylist() if r["source"].endswith("i1.png"))  # 30 x 45
    out = tmp_path / "row.png"
    assert commands.decode([str(kl_dataset), "--id", row["id"], "--out", str(out)]) == 0
    got = np.asarray(Image.open(out))
    vae = AutoencoderKL.from_pretrained(models["kl"]).eval()
    z = torch.from_numpy(latents(row).copy()).T.reshape(1, 4, *row["grid"])
    with torch.inference_mode():
        pixels = vae.decode(z).sample[0, :, :30, :45]
    want = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert got.shape == (30, 45, 3)
    np.testing.assert_array_equal(got, want)


def row_noise(seed: int, padded: np.ndarray, shape) -> torch.Tensor:
    """The documented draw: torch.randn on the CPU, seeded by sha256(f"{seed}:{shape}" + the padded pixels)."""
    h = hashlib.sha256(f"{seed}:{padded.shape}".encode())
    h.update(padded.tobytes())
    g = torch.Generator().manual_seed(int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1))
    return torch.randn(tuple(shape), generator=g)


def test_sampled_latents_depend_on_the_seed_and_the_input_only(models, images, kl_dataset, tmp_path):
    out = build(images, models["kl"], tmp_path / "sample", "--latent", "sample", "--seed", "3")
    m = read_manifest(str(out))
    assert (m.tokenizer["latent"], m.tokenizer["seed"]) == ("sample", 3)
    assert m.tokenizer["fingerprint"] != read_manifest(str(kl_dataset)).tokenizer["fingerprint"]
    vae = AutoencoderKL.from_pretrained(models["kl"]).eval()
    for row in read_rows(out).to_pylist():
        image = source_image(row)
        H, W = image.shape[:2]
        padded = np.pad(image, ((0, -H % 2), (0, -W % 2), (0, 0)), mode="edge")
        with torch.inference_mode():  # one image per call here, two per call in the build
            dist = vae.encode(model_input(image, 2)).latent_dist
            z = (dist.mean + dist.std * row_noise(3, padded, dist.mean.shape[1:]))[0]
        np.testing.assert_allclose(latents(row), z.reshape(4, -1).T.numpy(), atol=ATOL, rtol=0)
        assert not np.allclose(latents(row), dist.mean[0].reshape(4, -1).T.numpy(), atol=1e-3)


def test_vq_rows_are_the_quantizer_codes_and_decode_through_the_codebook(models, images, tmp_path):
    out = build(images, models["vq"], tmp_path / "vq")
    m = read_manifest(str(out))
    assert (m.tokenizer["kind"], m.tokenizer["vocab_size"], m.token_dtype) == ("hard", 64, "uint8")
    vq = VQModel.from_pretrained(models["vq"]).eval()
    tok = load_image_tokenizer(f"diffusers:{models['vq']}", batch_size=2)
    assert tok.fingerprint() == m.tokenizer["fingerprint"]
    for row in read_rows(out).to_pylist():
        with torch.inference_mode():
            h = vq.encode(model_input(source_image(row), 2)).latents
            codes = vq.quantize(h)[2][2]
            assert row["tokens"] == codes.tolist() and row["grid"] == list(h.shape[2:])
            quant = vq.quantize.get_codebook_entry(codes, (1, *h.shape[2:], 4))
            want = vq.decode(quant, force_not_quantize=True).sample[0, :, :row["height"], :row["width"]]
        want = ((want.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        got = tok.decode_image(np.array(row["tokens"]), tuple(row["grid"]), row["height"], row["width"])
        np.testing.assert_array_equal(got, want)


def test_wan_clips_are_padded_to_1_plus_4k_frames_and_decode_to_the_clip(models, tmp_path):
    videos = tmp_path / "in"
    videos.mkdir()
    make_video(videos / "a.mp4", n=11, w=36, h=20)
    out = tmp_path / "wan"
    assert run_build(["--input", str(videos), "--output", str(out), "--tokenizer", f"diffusers:{models['wan']}",
                      "--clip-frames", "6", "--progress", "none"]) == 0
    m = read_manifest(str(out))
    assert m.modality == "video" and m.errors == 0
    assert (m.tokenizer["geometry"]["temporal_factor"], m.tokenizer["geometry"]["pad_multiple"]) == (4, 8)
    assert m.tokenizer["latents_std"] == [1.5, 1.0, 2.0, 0.5] and m.tokenizer["scaling_factor"] is None
    (row,) = read_rows(out).to_pylist()
    assert row["padding"] == [3, 4, 4] and row["frame_indices"] == list(range(6))
    (clip,) = list(iter_clips(str(videos / "a.mp4"), ClipSpec(frames=6), SizePolicy.parse("native:1024")))[:1]
    padded = np.pad(clip.frames, ((0, 3), (0, 4), (0, 4), (0, 0)), mode="edge")
    x = torch.from_numpy(padded).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    wan = AutoencoderKLWan.from_pretrained(models["wan"]).eval()
    with torch.inference_mode():
        mean = wan.encode(x).latent_dist.mean[0]
    assert row["grid"] == list(mean.shape[1:]) == [3, 3, 5]
    np.testing.assert_allclose(latents(row), mean.reshape(4, -1).T.numpy(), atol=ATOL, rtol=0)
    from tokenmill.transforms.tokenizers.spec import load_video_tokenizer

    tok = load_video_tokenizer(f"diffusers:{models['wan']}")
    frames = tok.decode_clip(latents(row), tuple(row["grid"]), 6, 20, 36)
    with torch.inference_mode():
        pixels = wan.decode(torch.from_numpy(latents(row).copy()).T.reshape(1, 4, 3, 3, 5)).sample[0]
    want = ((pixels[:, :6, :20, :36].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    assert frames.shape == (6, 20, 36, 3)
    np.testing.assert_array_equal(frames, want)
    # `tokenmill decode` and the report draw those frames, as one contact sheet
    from PIL import Image

    from tests.test_report import images_of
    from tokenmill.pipelines import commands
    from tokenmill.reports.render import contact_sheet

    assert commands.decode([str(out), "--id", row["id"], "--out", str(tmp_path / "row.png")]) == 0
    assert commands.report([str(out), "--out", str(tmp_path / "report")]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "row.png")), contact_sheet(frames))
    pictures = dict(images_of((tmp_path / "report" / "index.html").read_text()))
    label = f"a.mp4 clip:0, {row['clip_start']}–{row['clip_end']} s"
    np.testing.assert_array_equal(pictures[f"reconstructed frames {label}"], contact_sheet(frames))


def test_fingerprint_follows_the_weights_and_config_not_the_folder(models, tmp_path):
    def fingerprint(folder: Path) -> str:
        return load_image_tokenizer(f"diffusers:{folder}").fingerprint()

    base = fingerprint(models["kl"])
    shutil.copytree(models["kl"], tmp_path / "moved")
    assert fingerprint(tmp_path / "moved") == base
    vae = AutoencoderKL.from_pretrained(models["kl"])
    with torch.no_grad():
        vae.encoder.conv_in.bias[0] += 1e-3
    vae.save_pretrained(tmp_path / "retrained")
    assert fingerprint(tmp_path / "retrained") != base
    config = json.loads((tmp_path / "moved" / "config.json").read_text())
    (tmp_path / "moved" / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.5}))
    assert fingerprint(tmp_path / "moved") != base
    assert load_image_tokenizer(f"diffusers:{models['kl']}", dtype="bf16").fingerprint() != base


def test_object_storage_and_sharded_folders_load_the_same_model(models, tmp_path):
    import fsspec

    memory = fsspec.filesystem("memory")
    for f in models["kl"].iterdir():
        memory.pipe(f"/diffusers-test/kl/{f.name}", f.read_bytes())
    local = load_image_tokenizer(f"diffusers:{models['kl']}")
    assert load_image_tokenizer("diffusers:memory://diffusers-test/kl").fingerprint() == local.fingerprint()
    AutoencoderKL.from_pretrained(models["kl"]).save_pretrained(tmp_path / "shards", max_shard_size="20KB")
    assert len(list((tmp_path / "shards").glob("*.safetensors"))) > 1
    sharded = load_image_tokenizer(f"diffusers:{tmp_path / 'shards'}")
    image = np.arange(12 * 10 * 3, dtype=np.uint8).reshape(12, 10, 3)
    np.testing.assert_array_equal(sharded.encode_image(image)[0], local.encode_image(image)[0])


def test_folders_that_cannot_load_are_refused_in_one_line(models, images, tmp_path, capsys):
    AutoencoderKL.from_pretrained(models["kl"]).save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert sorted(p.name for p in (tmp_path / "pickled").iterdir()) == ["config.json", "diffusion_pytorch_model.bin"]
    with pytest.raises(SystemExit) as e:
        run_build(["--input", str(images / "*.png"), "--output", str(tmp_path / "o"), "--tokenizer",
                   f"diffusers:{tmp_path / 'pickled'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only pickle weights (diffusion_pytorch_model.bin)" in err
    assert "loads safetensors only" in err and not (tmp_path / "o" / "_manifest.json").exists()
    (tmp_path / "pipeline" / "vae").mkdir(parents=True)
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    cases = {tmp_path / "pipeline": "a pipeline folder; point at its vae/ (or vqvae/) subfolder",
             tmp_path / "missing": "no such model folder",
             models["kl"] / "config.json": "is a file; give the folder that holds config.json",
             models["wan"]: "AutoencoderKLWan is a video autoencoder, not for image inputs"}
    for folder, message in cases.items():
        with pytest.raises(TokenizerSpecError) as info:
            load_image_tokenizer(f"diffusers:{folder}")
        assert message in str(info.value) and "\n" not in str(info.value)


def test_latents_that_overflow_the_dtype_are_error_rows_not_nan(models, tmp_path):
    vae = AutoencoderKL.from_pretrained(models["kl"])
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1e5)  # beyond float16's 65504 at the first convolution
    vae.save_pretrained(tmp_path / "hot")
    image = np.full((8, 8, 3), 255, np.uint8)
    column, grids, failures = load_image_tokenizer(f"diffusers:{tmp_path / 'hot'}", dtype="fp16").encode_batch(
        [image, image])
    assert len(column) == 0 and [i for i, _ in failures] == [0, 1]
    assert "fp16 latents are not finite" in str(failures[0][1])
    column, _, failures = load_image_tokenizer(f"diffusers:{tmp_path / 'hot'}").encode_batch([image])
    assert len(column) == 1 and failures == []


HIDE_DIFFUSERS = """
import runpy, sys
sys.modules["diffusers"] = None  # find_spec and import both see it as not installed
sys.argv = ["tokenmill build", *sys.argv[1:]]
runpy.run_module("tokenmill.pipelines.build", run_name="__main__")
"""


def test_a_missing_extra_is_one_line_naming_it(models, images, tmp_path):
    proc = subprocess.run([sys.executable, "-c", HIDE_DIFFUSERS, "--input", str(images / "*.png"), "--output",
                           str(tmp_path / "o"), "--tokenizer", f"diffusers:{models['kl']}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("tokenmill build: error: diffusers: tokenizers need diffusers, which is not "
                                   "installed: pip install 'tokenmill[diffusers]'")


BUILD_AND_SAY_ENVIRONMENT = """
import os, sys
from tokenmill.pipelines import build
from tokenmill.transforms.tokenizers.neural import torch_environment
rc = build.run(sys.argv[1:])
print(rc, os.environ.get("OMP_WAIT_POLICY"), os.environ.get("THP_MEM_ALLOC_ENABLE"), torch_environment())
"""


def test_the_torch_environment_is_set_before_torch_loads_and_changes_no_latent(models, tmp_path):
    """A build process sets passive OpenMP waiting and 2 MiB pages before it imports torch (a variable the user
    set wins; TOKENMILL_TORCH_TUNING=0 sets none), and the latents are the same bytes either way. 256 x 256
    inputs in batches of 2 make tensors of 2 MiB and more, the ones that get huge pages."""
    import os

    folder = tmp_path / "big"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / f"n{i}.png")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "THP_MEM_ALLOC_ENABLE")}
    said, latents = {}, {}
    for name, extra in (("tuned", {}), ("user", {"OMP_WAIT_POLICY": "ACTIVE"}),
                        ("off", {"TOKENMILL_TORCH_TUNING": "0"})):
        out = tmp_path / name
        proc = subprocess.run([sys.executable, "-c", BUILD_AND_SAY_ENVIRONMENT, "--input", str(folder / "*.png"),
                               "--output", str(out), "--tokenizer", f"diffusers:{models['kl']}", "--batch-size", "2",
                               "--progress", "none", "--runner=FnApiRunner", "--direct_num_workers=1",
                               "--direct_running_mode=in_memory"],
                              cwd=REPO, capture_output=True, text=True, timeout=300, env={**env, **extra})
        assert proc.returncode == 0, proc.stderr[-2000:]
        said[name] = proc.stdout.strip().splitlines()[-1]
        latents[name] = read_rows(out).column("latents").to_pylist()
    assert said == {"tuned": "0 PASSIVE 1 False", "user": "0 ACTIVE 1 False", "off": "0 None None False"}
    assert len(latents["tuned"]) == 3 and all(len(v) == 128 * 128 * 4 * 4 for v in latents["tuned"])  # f = 2, fp32
    assert latents["tuned"] == latents["off"] == latents["user"]
