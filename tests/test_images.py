"""Images: decoding rules, patch tokens, bad inputs and tar safety, through a real Beam build."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tokenmill.loaders import TokenReader
from tokenmill.schemas.manifest import read_manifest
from tokenmill.schemas.validate import validate
from tests.conftest import read_errors, read_rows, run_build
from tokenmill.transforms.decoders.images import DecompressionBomb, SizePolicy, decode_image
from tokenmill.transforms.tokenizers.patches import image_to_patches, patches_to_image
from tokenmill.transforms.tokenizers.spec import load_image_tokenizer


def structured(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth, structured test image: gradients and a disc, not noise."""
    y, x = np.mgrid[0:h, 0:w]
    r = ((x - w / 2) ** 2 + (y - h / 2) ** 2) < (min(h, w) / 3) ** 2
    img = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.where(r, 200, 40)], -1)
    return ((img + seed * 37) % 256).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_patches_round_trip_exactly_for_any_size():
    for h, w, p in [(32, 48, 16), (37, 50, 16), (1, 1, 16), (5, 300, 8)]:
        img = structured(h, w)
        patches, grid = image_to_patches(img, p)
        assert grid == (-(-h // p), -(-w // p)) and patches.shape == (grid[0] * grid[1], p * p * 3)
        assert np.array_equal(patches_to_image(patches, grid, p, h, w), img)
    # row-major grid, (y, x, c) inside each patch
    img = structured(32, 32)
    patches, _ = image_to_patches(img, 16)
    assert np.array_equal(patches[1].reshape(16, 16, 3), img[:16, 16:32])


def test_size_policies():
    data = encode(Image.fromarray(structured(300, 400)), "PNG")
    assert decode_image(data, SizePolicy.parse("native"))[0].shape == (300, 400, 3)
    assert decode_image(data, SizePolicy.parse("native:200"))[0].shape == (150, 200, 3)
    assert decode_image(data, SizePolicy.parse("crop:128"))[0].shape == (128, 128, 3)
    assert decode_image(data, SizePolicy.parse("shorter:150"))[0].shape == (150, 200, 3)
    for bad in ["square", "crop", "shorter:x", "native:0"]:
        with pytest.raises(ValueError):
            SizePolicy.parse(bad)


def test_exif_orientation_is_applied_and_changes_the_grid():
    img = Image.fromarray(structured(32, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    arr, info = decode_image(encode(img, "JPEG", exif=exif.tobytes()), SizePolicy())
    assert arr.shape == (64, 32, 3) and (info["orig_height"], info["orig_width"]) == (64, 32)
    tok = load_image_tokenizer("patch:16")
    assert tok.encode_image(arr)[1] == (4, 2)
    plain, _ = decode_image(encode(img, "JPEG"), SizePolicy())
    assert tok.encode_image(plain)[1] == (2, 4)


def test_every_mode_becomes_rgb_by_the_documented_rule():
    gray = Image.fromarray(np.full((4, 4), 90, np.uint8), "L")
    assert decode_image(encode(gray, "PNG"))[0][0, 0].tolist() == [90, 90, 90]
    sixteen = Image.fromarray(np.full((4, 4), 257 * 100, np.uint16))
    arr, info = decode_image(encode(sixteen, "PNG"))
    assert info["mode"].startswith("I") and arr[0, 0].tolist() == [100, 100, 100]
    clear = Image.fromarray(np.array([[[10, 20, 30, 0]] * 4] * 4, np.uint8), "RGBA")
    assert decode_image(encode(clear, "PNG"))[0][0, 0].tolist() == [255, 255, 255]  # over white
    half = Image.fromarray(np.array([[[0, 0, 0, 128]] * 4] * 4, np.uint8), "RGBA")
    assert decode_image(encode(half, "PNG"))[0][0, 0].tolist() == [127, 127, 127]
    la = Image.fromarray(np.array([[[0, 0]] * 4] * 4, np.uint8), "LA")
    assert decode_image(encode(la, "PNG"))[0][0, 0].tolist() == [255, 255, 255]
    pal = Image.fromarray(structured(8, 8)).convert("P")
    pal.info["transparency"] = 0
    assert decode_image(encode(pal, "PNG", transparency=0))[0].shape == (8, 8, 3)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    r, g, b = decode_image(encode(cmyk, "JPEG"))[0][0, 0].tolist()
    assert r > 200 and g < 60 and b < 60
    gif = Image.fromarray(structured(8, 8)).convert("P")
    assert decode_image(encode(gif, "GIF"))[0].shape == (8, 8, 3)


def test_bombs_are_refused_from_the_header():
    bomb = encode(Image.new("1", (12_000, 12_000)), "PNG")  # 144 M pixels in a few kB
    assert len(bomb) < 100_000
    with pytest.raises(DecompressionBomb, match="144000000 pixels"):
        decode_image(bomb, SizePolicy(), max_pixels=50_000_000)


@pytest.fixture
def image_inputs(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        Image.fromarray(structured(40 + 8 * i, 64, i)).save(src / f"img{i}.png")
    Image.fromarray(structured(70, 30, 5)).save(src / "photo.jpg", quality=95)
    full = encode(Image.fromarray(structured(64, 64, 6)), "JPEG")
    (src / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (src / "notes.png").write_bytes(b"this is text with an image name")
    (src / "empty.webp").write_bytes(b"")
    Image.new("1", (12_000, 12_000)).save(src / "bomb.png")
    Image.fromarray(np.full((1, 1, 3), 7, np.uint8)).save(src / "tiny.png")
    Image.fromarray(np.full((10, 10), 257 * 200, np.uint16)).save(src / "deep.png")
    Image.fromarray(structured(20, 20)).convert("P").save(src / "palette.png")
    with tarfile.open(src / "shard.tar", "w") as tar:
        def add(name, data, kind=tarfile.REGTYPE, link=""):
            ti = tarfile.TarInfo(name)
            ti.size, ti.type, ti.linkname = len(data), kind, link
            tar.addfile(ti, io.BytesIO(data))
        for k in range(3):
            add(f"sample{k}.jpg", encode(Image.fromarray(structured(32, 48, k)), "JPEG"))
            add(f"sample{k}.json", json.dumps({"caption": f"picture {k}"}).encode())
            add(f"sample{k}.txt", f"text {k}".encode())
        add("../escape.jpg", encode(Image.fromarray(structured(8, 8)), "JPEG"))
        add("/abs/path.jpg", encode(Image.fromarray(structured(8, 8)), "JPEG"))
        add("link.jpg", b"", tarfile.SYMTYPE, "/etc/passwd")
    return src


def test_image_build_rows_errors_and_round_trip(tmp_path, image_inputs):
    out = tmp_path / "out"
    assert run_build(["--input", str(image_inputs / "*"), "--output", str(out), "--tokenizer", "patch:16",
                      "--max-pixels", "50000000"]) == 0
    assert validate(str(out)) == []
    rows = {(Path(r["source"]).name, r["locator"]): r for r in read_rows(out).to_pylist()}
    errors = {(Path(e["source"]).name, e["locator"]): (e["stage"], e["error_type"]) for e in read_errors(out)}
    assert errors == {
        ("truncated.jpg", "file"): ("decode", "OSError"),
        ("notes.png", "file"): ("decode", "NotAnImage"),
        ("empty.webp", "file"): ("read", "EmptyFile"),
        ("bomb.png", "file"): ("decode", "DecompressionBomb"),
        ("shard.tar", "member:../escape.jpg"): ("read", "UnsafeMember"),
        ("shard.tar", "member:/abs/path.jpg"): ("read", "UnsafeMember"),
        ("shard.tar", "member:link.jpg"): ("read", "UnsafeMember"),
    }
    # rows + errors = inputs: 4 png + photo + tiny + deep + palette + 3 tar samples; 7 rejected
    assert len(rows) == 11
    m = read_manifest(str(out))
    assert m.rows == 11 and m.errors == 7 and m.modality == "image"
    assert m.tokenizer["normalization"]["offset"] == -1.0 and m.options["size_policy"] == "native:1024"

    tok = load_image_tokenizer("patch:16")
    for name in ["img0.png", "img3.png", "tiny.png", "deep.png"]:
        row = rows[(name, "file")]
        want, _ = decode_image((image_inputs / name).read_bytes(), SizePolicy.parse("native:1024"))
        latents = np.frombuffer(row["latents"], np.uint8).reshape(row["num_tokens"], 768)
        assert tuple(row["grid"]) == (-(-want.shape[0] // 16), -(-want.shape[1] // 16))
        assert np.array_equal(tok.decode_image(latents, tuple(row["grid"]), row["height"], row["width"]), want)
    assert rows[("tiny.png", "file")]["num_tokens"] == 1
    assert list(rows[("deep.png", "file")]["latents"][:3]) == [200, 200, 200]
    sample = rows[("shard.tar", "member:sample1.jpg")]
    assert json.loads(sample["meta"]) == {"json": {"caption": "picture 1"}, "txt": "text 1"}
    assert (sample["height"], sample["width"], tuple(sample["grid"])) == (32, 48, (2, 3))

    got = {s["id"]: s for s in TokenReader(str(out), shuffle=False)}
    one = got[sample["id"]]
    assert one["latents"].dtype == np.float32 and one["latents"].shape == (6, 768)
    pixels = np.frombuffer(sample["latents"], np.uint8).reshape(6, 768)
    assert np.allclose(one["latents"], pixels / 127.5 - 1, atol=1e-6)
    assert one["grid"] == (2, 3)


def test_decode_threads_give_the_same_shards_and_errors(tmp_path, image_inputs):
    """Records decoded in parallel keep their block order: rows, error rows and files are unchanged."""
    digests = []
    for threads in ("1", "4"):
        out = tmp_path / f"out{threads}"
        assert run_build(["--input", str(image_inputs / "*"), "--output", str(out), "--tokenizer", "patch:16",
                          "--max-pixels", "50000000", "--decode-threads", threads]) == 0
        m = read_manifest(str(out))
        assert (m.rows, m.errors) == (11, 7)
        digests.append(sorted((Path(s["path"]).name, s["sha256"]) for s in m.shards + m.error_shards))
    assert digests[0] == digests[1]


def test_compression_codec_changes_the_files_not_the_rows(tmp_path, image_inputs):
    tables = {}
    for codec, want in (("zstd", "ZSTD"), ("lz4", "LZ4"), ("none", "UNCOMPRESSED"), ("zstd:-3", "ZSTD"),
                        ("auto", "LZ4")):  # auto: lz4 for soft latents
        out = tmp_path / codec.replace(":", "")
        assert run_build(["--input", str(image_inputs / "*.png"), "--output", str(out), "--tokenizer", "patch:16",
                          "--compression", codec]) == 0
        m = read_manifest(str(out))
        for shard in m.shards:
            column = pq.ParquetFile(out / shard["path"]).metadata.row_group(0).column(
                pq.ParquetFile(out / shard["path"]).schema_arrow.get_field_index("latents"))
            assert column.compression == want, (codec, column.compression)
        tables[codec] = read_rows(out)
        assert validate(str(out)) == []
    assert all(t.equals(tables["zstd"]) for t in tables.values())


def test_parquet_image_column_with_bytes_or_hf_struct(tmp_path):
    images = [encode(Image.fromarray(structured(16, 16, k)), "PNG") for k in range(3)]
    pq.write_table(pa.table({"image": [{"bytes": images[0], "path": "a.png"}, {"bytes": images[1], "path": None},
                                       {"bytes": None, "path": "missing.png"}]}), tmp_path / "hf.parquet")
    pq.write_table(pa.table({"img": images}), tmp_path / "raw.parquet")
    out = tmp_path / "out"
    assert run_build(["--input", str(tmp_path / "hf.parquet"), "--output", str(out), "--tokenizer", "patch:8"]) == 0
    assert read_rows(out).num_rows == 2
    assert [(e["locator"], e["error_type"]) for e in read_errors(out)] == [("row:2", "NotImageBytes")]
    out2 = tmp_path / "out2"
    assert run_build(["--input", str(tmp_path / "raw.parquet"), "--output", str(out2), "--tokenizer", "patch:8",
                      "--image-field", "img", "--modality", "image"]) == 0
    assert read_rows(out2).num_rows == 3


def test_image_cli_misuse_exits_2(tmp_path):
    from tests.conftest import run_cli

    Image.fromarray(structured(8, 8)).save(tmp_path / "a.png")
    for args, message in [(["--tokenizer", "patch:x"], "patch spec needs a size"),
                          (["--tokenizer", "bytes"], "the inputs are image files but --tokenizer bytes is a text"),
                          (["--tokenizer", "patch:16", "--size", "square"], "unknown size policy"),
                          (["--tokenizer", "patch:16", "--decode-threads", "0"], "--decode-threads must be 1 or more"),
                          (["--tokenizer", "patch:16", "--compression", "lzma"], "unknown compression 'lzma'"),
                          (["--tokenizer", "patch:16", "--compression", "lz4:3"], "only zstd, gzip and brotli")]:
        proc = run_cli("tokenmill.pipelines.build", "--input", str(tmp_path / "a.png"), "--output", str(tmp_path / "o"), *args)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_decode_command_gives_back_the_tokenized_image(tmp_path):
    from tests.conftest import run_cli

    Image.fromarray(structured(37, 53, 2)).save(tmp_path / "a.png")
    out = tmp_path / "ds"
    assert run_build(["--input", str(tmp_path / "a.png"), "--output", str(out), "--tokenizer", "patch:16"]) == 0
    row = read_rows(out).to_pylist()[0]
    proc = run_cli("tokenmill.pipelines.cli", "decode", str(out), "--id", row["id"], "--out", str(tmp_path / "back.png"))
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "back.png")), structured(37, 53, 2))
    missing = run_cli("tokenmill.pipelines.cli", "decode", str(out), "--id", "nope", "--out", str(tmp_path / "x.png"))
    assert missing.returncode == 2 and "no row with id nope" in missing.stderr


def test_a_big_tar_is_split_into_member_ranges_read_in_parallel(tmp_path):
    from tests.conftest import TWO_PROCESSES
    from tokenmill.transforms.records import TarIndexTask
    from tokenmill.transforms.sources.images import split_tar

    src = tmp_path / "in"
    src.mkdir()
    with tarfile.open(src / "big.tar", "w") as tar:
        for k in range(150):
            for name, data in ((f"s{k:03d}.png", encode(Image.fromarray(structured(8, 8, k)), "PNG")),
                               (f"s{k:03d}.json", json.dumps({"k": k}).encode())):
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
    size = (src / "big.tar").stat().st_size
    tasks, errors = split_tar(TarIndexTask(str(src / "big.tar"), 0, size), 64)
    assert errors == [] and [len(t.entries) for t in tasks] == [64, 64, 22] and [t.block for t in tasks] == [0, 1, 2]
    tables = []
    for name, runner in (("one", None), ("two", TWO_PROCESSES)):
        assert run_build(["--input", str(src), "--output", str(tmp_path / name), "--tokenizer", "patch:8"],
                         runner) == 0
        tables.append(read_rows(tmp_path / name))
    assert tables[0].equals(tables[1]) and tables[0].num_rows == 150
    row = next(r for r in tables[0].to_pylist() if r["locator"] == "member:s149.png")
    assert json.loads(row["meta"]) == {"json": {"k": 149}} and tuple(row["grid"]) == (1, 1)
