"""Golden builds: the same inputs built by two versions of tokenmill must give the same bytes.

`python -m tests.golden.builds --write` records, for a fixed set of inputs
under a fixed folder, every shard's sha256 and each manifest with its
timestamps removed (tests/golden/golden.json). tests/test_golden.py builds
the same datasets with the code under test and compares. The recorded file was
made by the code before the spine rework (issue 15), so a refactor that changes
one byte of any shard, or any manifest key, fails it. It was re-recorded once, on
purpose, when clip fps became the container's rational rate and PyAV's clip
times microseconds (issue 16): only the video shard changed (its fps and
clip_end columns); the other keys it gained are manifest keys added since.

The inputs live at a fixed absolute path because rows carry their source URI.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path("/tmp/tokenmill-golden-fixture")
GOLDEN = Path(__file__).with_name("golden.json")
ONE_WORKER = ["--runner=FnApiRunner", "--direct_num_workers=1", "--direct_running_mode=in_memory"]
# Keys whose values differ from run to run (times, the installed version) or that
# name the commit (a hash over times); everything else must match exactly.
VOLATILE = {"created_at", "started_at", "finished_at", "written_at", "committed_at", "tokenmill_version",
            "commit", "parent", "timing", "change_token"}

TEXTS = [
    "Hello, world! This is plain English text with punctuation.",
    "dataGridView1.DefaultCellStyle.BackColor = Color.Red;",
    "分词的粒度很重要。一个词被编码成一个标记。",
    "Гранулярность токенизации важна.",
    "Emoji 🚀🔥🧪🇫🇷 and combining marks: e\u0301, n\u0303.",
    "A literal <|endoftext|> is text here.",
    "    indented\n\n\n\ttabs\r\n  trailing spaces   ",
    "",
]


def make_inputs(root: Path = ROOT) -> dict[str, Path]:
    """Write every input (text, images, a video) under `root`, replacing what was there."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    from PIL import Image

    shutil.rmtree(root, ignore_errors=True)
    text, images, video = root / "in" / "text", root / "in" / "images", root / "in" / "video"
    for d in (text, images, video):
        d.mkdir(parents=True)
    lines = "".join(json.dumps({"text": t, "lang": "x"}, ensure_ascii=False) + "\n" for t in TEXTS)
    (text / "a.jsonl").write_text(lines + "{not json\n", encoding="utf-8")
    with gzip.GzipFile(text / "b.jsonl.gz", "wb", mtime=0) as f:
        f.write(lines.upper().encode())
    (text / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    pq.write_table(pa.table({"text": [t + "!" for t in TEXTS]}), text / "d.parquet", row_group_size=3)
    (text / "e.txt").write_text(TEXTS[0] + "\n" + TEXTS[2], encoding="utf-8")
    rng = np.random.default_rng(7)
    for i in range(6):
        y, x = np.mgrid[0:40, 0:56]
        img = np.stack([x * 4, y * 5, np.full_like(x, 20 * i)], -1) + rng.normal(0, 4, (40, 56, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(images / f"im{i:02d}.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    import av

    with av.open(str(video / "v.avi"), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
        for i in range(12):
            y, x = np.mgrid[0:32, 0:48]
            frame = np.stack([x * 5, y * 7, np.full_like(x, 20 * i)], -1).astype(np.uint8)
            for packet in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return {"text": text, "images": images, "video": video}


def builds(inputs: dict[str, Path], root: Path = ROOT) -> dict[str, list[str]]:
    """The builds recorded: name -> `tokenmill build` arguments (runner options added by the caller)."""
    out = root / "out"
    return {
        "text-cl100k": ["--input", f"{inputs['text']}/*", "--output", f"{out}/text-cl100k",
                        "--tokenizer", "tiktoken:cl100k_base", "--eos", "--block-size", "256"],
        "text-bytes": ["--input", f"{inputs['text']}/*.jsonl*", "--output", f"{out}/text-bytes",
                       "--tokenizer", "bytes", "--bos", "--txt-per-line"],
        "image-patch": ["--input", f"{inputs['images']}/*.png", "--output", f"{out}/image-patch",
                        "--tokenizer", "patch:16", "--size", "native:48"],
        "image-vq": ["--input", f"{inputs['images']}/*.png", "--output", f"{out}/image-vq",
                     "--tokenizer", f"vq:{root}/vq.npz"],
        "video-patch": ["--input", f"{inputs['video']}/*.avi", "--output", f"{out}/video-patch",
                        "--tokenizer", "patch:2,8", "--clip-frames", "4"],
    }


# A run's folder name is new for every run (versions/<version>/run-<id>/).
_RUN = re.compile(r"run-[0-9a-f]{12}")


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return _RUN.sub("run-*", value) if isinstance(value, str) else value


def digest(dataset: Path) -> dict[str, Any]:
    """sha256 of every file a dataset's manifest names, and the manifest without volatile keys."""
    manifest = json.loads((dataset / "_manifest.json").read_text())
    files = sorted(set(manifest["files"]) | set(manifest["error_files"]))
    return {"files": {_strip(f): hashlib.sha256((dataset / f).read_bytes()).hexdigest() for f in files},
            "manifest": _strip(manifest)}


def input_digest(inputs: dict[str, Path]) -> dict[str, str]:
    return {str(p.relative_to(ROOT)): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in inputs.values() for p in sorted(d.iterdir())}


def record(build: Callable[[list[str]], int], fit: Callable[[list[str]], int]) -> dict[str, Any]:
    """Make the inputs, run every build, and return what golden.json holds."""
    inputs = make_inputs()
    assert fit(["--kind", "vq", "--input", f"{inputs['images']}/im*.png", "--output", str(ROOT / "vq.npz"),
                "--patch", "8", "--codes", "16", *ONE_WORKER]) == 0
    out: dict[str, Any] = {"inputs": input_digest(inputs),
                           "vq.npz": hashlib.sha256((ROOT / "vq.npz").read_bytes()).hexdigest(), "datasets": {}}
    for name, argv in builds(inputs).items():
        assert build([*argv, "--progress", "none", *ONE_WORKER]) == 0, name
        out["datasets"][name] = digest(ROOT / "out" / name)
    return out


def _entry_points() -> tuple[Callable, Callable]:
    try:
        from tokenmill.pipelines import build, fit
    except ImportError:  # the code before the tokenmill namespace, which made golden.json
        from pipelines import build, fit  # type: ignore[no-redef]
    return build.run, fit.run


if __name__ == "__main__":
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):
        result = record(*_entry_points())
    text = json.dumps(result, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    if "--write" in sys.argv:
        GOLDEN.write_text(text)
        print(f"wrote {GOLDEN}")
    else:
        sys.stdout.write(text)
