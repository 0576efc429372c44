"""`tokenmill report`: the statistics, the page, and the page rendered in headless Chromium."""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from tokenmill.pipelines import commands
from tokenmill.reports.stats import codebook_usage, error_summary, throughput, token_granularity
from tests.conftest import read_rows

IMG = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)">')


def make_report(root: Path, out: Path, capsys) -> str:
    assert commands.report([str(root), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith(str(out / "index.html"))
    return (out / "index.html").read_text()


def images_of(page: str) -> list[tuple[str, np.ndarray]]:
    return [(alt, np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))) for alt, data in IMG.findall(page)]


def test_granularity_counts_characters_bytes_and_long_tokens():
    vocab = {0: b"a", 1: b".DefaultCellStyle", 2: b"\xe5\x88", 3: b"\x86"}
    g = token_granularity(np.array([3, 1, 2, 0]), vocab.__getitem__, top=2)
    assert g["tokens"] == 6 and g["distinct_tokens"] == 3
    assert g["share_long"] == pytest.approx(1 / 6)
    assert g["chars_per_token"] == pytest.approx((3 * 1 + 17 + 0) / 6)
    assert g["bytes_per_token"] == pytest.approx((3 + 17 + 2 * 2) / 6)
    assert g["longest"][0] == {"id": 1, "text": ".DefaultCellStyle", "chars": 17, "bytes": 17, "count": 1}
    assert g["chars_hist"] == {0: 2, 1: 3, 17: 1}


def test_codebook_perplexity_and_dead_codes():
    u = codebook_usage(np.array([5, 5, 5, 5, 0, 0]), 8)
    assert u["perplexity"] == pytest.approx(4.0) and u["used"] == 4 and u["dead_codes"] == [4, 5, 6, 7]
    assert codebook_usage(np.array([9, 0]), 2)["perplexity"] == pytest.approx(1.0)


def test_errors_group_by_stage_and_type_and_throughput_accumulates():
    t = pa.table({"source": ["a", "a", "b"], "locator": ["1", "2", "3"], "stage": ["decode", "decode", "read"],
                  "error_type": ["X", "X", "Y"], "message": ["m1", "m2", "m3"]})
    groups = error_summary(t, examples=1)
    assert [(g["stage"], g["error_type"], g["count"]) for g in groups] == [("decode", "X", 2), ("read", "Y", 1)]
    assert groups[0]["examples"] == [{"source": "a", "locator": "1", "message": "m1"}]
    tp = throughput({"started_at": 100.0, "finished_at": 104.0, "blocks": [[101.0, 2, 10, 0], [103.0, 3, 5, 1]]})
    assert tp["seconds"].tolist() == [0, 1, 3] and tp["tokens"].tolist() == [0, 10, 15]
    assert tp["total_seconds"] == 4 and throughput({}) is None


def test_text_report_shows_granularity_errors_and_throughput(text_dataset, tmp_path, capsys):
    page = make_report(text_dataset, tmp_path / "report", capsys)
    assert "Tokens per document" in page and "Granularity" in page
    assert "<code>.DefaultCellStyle</code></td><td>17</td>" in page
    assert "(16 special tokens such as BOS/EOS left out)" in page and "endoftext" not in page
    errors = re.search(r"<h2>Errors</h2>(.*?)<h2>", page, re.S).group(1)
    assert "<td>decode</td><td>JSONDecodeError</td><td>1</td>" in errors
    assert "docs.jsonl offset:" in errors and "malformed JSON" in errors
    assert "tokens/s overall" in page
    pictures = images_of(page)
    assert len(pictures) == 4 and all(p.ndim == 3 and p.shape[0] > 100 for _, p in pictures)
    assert "http://" not in page and "https://" not in page  # nothing to fetch: loads offline


def test_vq_report_shows_codebook_usage_and_psnr(image_datasets, tmp_path, capsys):
    root = image_datasets["vq"]
    page = make_report(root, tmp_path / "report", capsys)
    codes = np.concatenate([np.asarray(t) for t in read_rows(root).column("tokens").to_pylist()])
    used = len(np.unique(codes))
    assert f"{used} of 32 codes used" in page and f"{32 - used} dead codes" in page
    p = np.bincount(codes, minlength=32) / len(codes)
    perplexity = np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())
    assert f"perplexity <b>{perplexity:.1f}</b>" in page
    scores = [float(s) for s in re.findall(r"PSNR ([\d.]+) dB", page)]
    assert len(scores) == 8 and all(15 < s < 60 for s in scores)
    alts = [alt for alt, _ in images_of(page)]
    assert alts.count("original") == alts.count("reconstruction") == 8


def test_patch_report_reconstructs_losslessly(image_datasets, tmp_path, capsys):
    page = make_report(image_datasets["patch"], tmp_path / "report", capsys)
    assert page.count("lossless") == 8 and "Codebook usage" not in page
    assert "<td>decode</td><td>NotAnImage</td><td>1</td>" in page and "broken.png file:" in page


def test_video_report_counts_tokens_per_clip(video_dataset, tmp_path, capsys):
    page = make_report(video_dataset, tmp_path / "report", capsys)
    assert "Tokens per clip" in page and "not recorded" in page


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CHECK_IMAGES = """<script>
window.addEventListener("load", () => {
  const all = Array.from(document.images);
  const ok = all.filter(i => i.complete && i.naturalWidth > 0);
  document.body.setAttribute("data-images-loaded", ok.length + "/" + all.length);
});
</script>"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed on CI (run_local.sh test installs Debian's chromium)")
        pytest.skip("no chromium on PATH: install Debian's chromium (run_local.sh test does, as root)")
    return found


def run_chromium(*args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="tokenmill-chromium-") as profile:
        return subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=120)


def test_report_renders_in_headless_chromium_with_every_image_loaded(image_datasets, tmp_path, capsys):
    page = make_report(image_datasets["vq"], tmp_path / "report", capsys)
    check = tmp_path / "report" / "check.html"
    check.write_text(page.replace("</body>", CHECK_IMAGES + "</body>"))
    done = run_chromium("--virtual-time-budget=10000", "--dump-dom", check.as_uri())
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', done.stdout)
    assert loaded, f"chromium rendered no page: {done.stderr[-2000:]}"
    ok, total = map(int, loaded.groups())
    assert total == len(IMG.findall(page)) >= 17 and ok == total
    shot = tmp_path / "report" / "screenshot.png"
    run_chromium("--window-size=1200,2400", f"--screenshot={shot}", (tmp_path / "report" / "index.html").as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2400, 1200) and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    keep = os.environ.get("TOKENMILL_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
