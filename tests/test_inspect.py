"""`tokenmill inspect` on real datasets: text, image (patch and vq) and video."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tokenmill.pipelines import commands
from tokenmill.reports.render import contact_sheet, token_pieces
from tests.conftest import MULTILINGUAL, read_rows, video_frames_fixture
from tokenmill.transforms.decoders.images import decode_image
from tokenmill.transforms.tokenizers.spec import load_image_tokenizer


def run_inspect(capsys, *argv: str) -> dict:
    assert commands.inspect([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_text_rows_mark_every_token_with_its_id_and_length(text_dataset, capsys, cl100k):
    rows = read_rows(text_dataset).to_pylist()
    by_text = {cl100k.decode(r["tokens"][:-1]): r for r in rows}  # without the EOS
    row = by_text["dataGridView1.DefaultCellStyle.BackColor = Color.Red;"]
    result = run_inspect(capsys, str(text_dataset), "--id", row["id"])
    shown = result["rows"][0]
    assert [t["id"] for t in shown["tokens"]] == row["tokens"]
    assert shown["text"] == row_text(row, cl100k) + "<|endoftext|>"
    packed = next(t for t in shown["tokens"] if t["text"] == ".DefaultCellStyle")
    assert packed == {"id": cl100k.encode(".DefaultCellStyle")[0], "text": ".DefaultCellStyle", "chars": 17,
                      "bytes": 17}
    assert shown["marked"].startswith("|dataGridView|1|.DefaultCellStyle|.BackColor| =|")
    assert result["counts"] == {"rows": len(MULTILINGUAL), "tokens": sum(len(r["tokens"]) for r in rows),
                                "errors": 1, "data_files": 1, "error_files": 1, "inputs": 1}
    assert [f["name"] for f in result["schema"]] == ["id", "source", "locator", "modality", "tokens", "num_tokens"]
    assert result["metadata"]["spec"] == "tiktoken:cl100k_base"
    assert result["versions"][0]["rows"] == len(MULTILINGUAL)


def row_text(row, tok) -> str:
    return tok.decode(row["tokens"][:-1])


def test_a_character_split_across_tokens_shows_its_bytes_and_counts_once(text_dataset, capsys, cl100k):
    rows = read_rows(text_dataset).to_pylist()
    row = next(r for r in rows if "🚀" in row_text(r, cl100k))
    shown = run_inspect(capsys, str(text_dataset), "--id", row["id"])["rows"][0]
    text = row_text(row, cl100k) + "<|endoftext|>"
    assert sum(t["chars"] for t in shown["tokens"]) == len(text)
    assert sum(t["bytes"] for t in shown["tokens"]) == len(text.encode())
    # cl100k cuts the rocket (f0 9f 9a 80) in three: each part shows its bytes, and the boundaries are marked
    at = next(k for k, t in enumerate(shown["tokens"]) if t["text"] == " \\xf0\\x9f")
    rocket = [(t["text"], t["chars"], t["split"]) for t in shown["tokens"][at:at + 3]]
    assert rocket == [(" \\xf0\\x9f", 1, "end"), ("\\x9a", 0, "both"), ("\\x80", 1, "start")]
    assert "| \\xf0\\x9f¦\\x9a¦\\x80|" in shown["marked"]
    assert token_pieces([b"\xf0\x9f", b"\x9a\x80", b"!"]) == ["\\xf0\\x9f", "\\x9a\\x80", "!"]


def test_text_output_for_a_terminal(text_dataset, capsys):
    assert commands.inspect([str(text_dataset), "--rows", "2"]) == 0
    out = capsys.readouterr().out
    assert f"{len(MULTILINGUAL)} rows" in out and "1 errors" in out and "tokens: |" in out
    assert out.count("\nrow ") == 2 and "(id:characters)" in out


@pytest.mark.parametrize("name", ["patch", "vq"])
def test_image_rows_show_grid_codes_and_a_reconstruction(image_datasets, capsys, tmp_path, name):
    root = image_datasets[name]
    result = run_inspect(capsys, str(root), "--rows", "2", "--out", str(tmp_path))
    assert result["counts"]["rows"] == 12 and result["counts"]["errors"] == 1
    tok = load_image_tokenizer(result["metadata"]["spec"])
    rows = {r["id"]: r for r in read_rows(root).to_pylist()}
    for shown in result["rows"]:
        row = rows[shown["id"]]
        original = decode_image((image_datasets["images"] / shown["source"].rsplit("/", 1)[-1]).read_bytes())[0]
        picture = np.asarray(Image.open(shown["reconstruction"]))
        assert shown["grid"] == row["grid"] and picture.shape == original.shape == (48, 64, 3)
        if name == "vq":
            assert shown["codes"] == np.asarray(row["tokens"]).reshape(row["grid"]).tolist()
            expected = tok.decode_image(np.asarray(row["tokens"]), tuple(row["grid"]), 48, 64)
            assert np.array_equal(picture, expected)
        else:
            assert shown["grid"] == [3, 4] and shown["latents"]["shape"] == [12, 768]
            assert np.array_equal(picture, original)  # patches are lossless


def test_video_rows_show_clip_timing_grid_and_a_contact_sheet(video_dataset, capsys, tmp_path):
    result = run_inspect(capsys, str(video_dataset), "--out", str(tmp_path))
    shown = result["rows"][0]
    assert shown["grid"] == [3, 3, 4] and (shown["clip_start"], shown["clip_end"], shown["fps"]) == (0.0, 0.5, 10.0)
    assert shown["frame_indices"] == [0, 2, 4, 6, 8]
    frames = video_frames_fixture()
    sheet = np.asarray(Image.open(shown["contact_sheet"]))
    assert np.array_equal(sheet, contact_sheet(frames))  # five frames back, padding cut off
    assert np.array_equal(sheet[:20, 30:58], frames[1])
    assert commands.inspect([str(video_dataset), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "clip:   0.0 s to 0.5 s at 10.0 fps" in out and "contact sheet: " in out


def test_misuse_is_one_line_and_exit_2(text_dataset, tmp_path, capsys):
    for argv, message in (([str(tmp_path)], "no _manifest.json"),
                          ([str(text_dataset), "--id", "nope"], "no row with id nope"),
                          ([str(text_dataset), "--rows", "-1"], "--rows must be")):
        with pytest.raises(SystemExit) as e:
            commands.inspect(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
