"""Video build benchmark: `tokenmill build` with patch:2,16 against raw decord in one process, same videos.

    ./run_local.sh bench video_build [--videos 8] [--frames 320] [--content textured|gradient] [--small]

The corpus is generated here once: 640x360 h264 (libx264, yuv420p, 25 fps)
with PyAV, by default textured so that decord decodes it at about the 550
frames/s the issue calibrates with (see make_videos). Then, each as a fresh
process with its peak RSS:
  raw decord   for each video: decord.VideoReader (one decode thread, as
               tokenmill's readers), get_batch of each 16-frame clip, and the
               same numpy spacetime patching (clip_to_patches) as the tokenizer;
               and the same again writing its patches to one Parquet file (zstd)
  tokenmill    `tokenmill build --tokenizer patch:2,16 --clip-frames 16`, timed
               from pipeline start to commit (the manifest's timing); it also
               writes every patch to Parquet. Three ways:
               - 1 worker: one process, like the raw loop, with its default
                 --decode-threads (the machine's cores: videos decoded at once);
               - 1 worker, --decode-threads 1: one decoder, like the raw loop;
               - default: what a plain `tokenmill build` runs here (a worker
                 process per core, one decoder each).
Each is run --repeat times (default 3), in rounds, and the fastest run counts, for every side.
Both count frames; the ratio is tokenmill frames/s over raw frames/s (target >= 0.9),
given for each way.
--small is a smoke run (2 short videos) that checks the bench works, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.text_build import REPO, bench_result, best_of_rounds, manifest_seconds, run_measured

CLIP = 16
SPEC = "patch:2,16"


def make_videos(folder: Path, count: int, frames: int, width: int = 640, height: int = 360,
                content: str = "textured") -> list[Path]:
    """h264 videos (libx264, yuv420p, 25 fps) made with PyAV, once.

    textured: a camera pan across a multi-scale noise texture with film grain,
    x264 crf 20 (about 3.6 Mbit/s); decord decodes it at about 515 frames/s
    here, near the ~550 frames/s the issue gives for 640x360 h264.
    gradient: moving colour gradients, which x264 squeezes to almost nothing
    and decord decodes at ~1,700 frames/s: decoding is then nearly free.
    """
    import av

    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / "_videos.json"
    files = [folder / f"vid-{i:04d}.mp4" for i in range(count)]
    want = {"count": count, "frames": frames, "width": width, "height": height, "content": content}
    if stamp.exists() and json.loads(stamp.read_text()) == want and all(f.exists() for f in files):
        return files
    y, x = np.mgrid[0:height, 0:width]
    for i, f in enumerate(files):
        rng = np.random.default_rng(i)
        if content == "textured":
            big_h, big_w = height + frames // 2 + 64, width + frames + 64
            texture = np.zeros((big_h, big_w, 3), np.float32)
            for scale in (4, 16, 64):
                small = rng.uniform(0, 255, (big_h // scale + 2, big_w // scale + 2, 3)).astype(np.float32)
                texture += np.kron(small, np.ones((scale, scale, 1), np.float32))[:big_h, :big_w] / 3
        with av.open(str(f), "w") as c:
            s = c.add_stream("libx264", rate=25)
            s.width, s.height, s.pix_fmt = width, height, "yuv420p"
            if content == "textured":
                s.options = {"crf": "20"}
            for k in range(frames):
                if content == "textured":
                    a = texture[k // 2:k // 2 + height, k:k + width] + rng.normal(0, 8, (height, width, 3))
                else:
                    a = np.stack([(x + 4 * k + 50 * i) % 256, (y + 2 * k) % 256, (x // 4 + y // 4 + k) % 256], -1)
                frame = av.VideoFrame.from_ndarray(np.clip(a, 0, 255).astype(np.uint8), format="rgb24")
                for p in s.encode(frame):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
    stamp.write_text(json.dumps(want))
    return files


def raw_main(paths: list[str], write: str | None = None) -> None:
    """decord get_batch per clip plus the tokenizer's numpy; with `write`, also a Parquet file of the patches."""
    import decord
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tokenmill.transforms.tokenizers.patches import clip_to_patches

    start = time.perf_counter()
    frames = tokens = 0
    writer = pq.ParquetWriter(write, pa.schema([("latents", pa.binary())]), compression="zstd") if write else None
    for path in paths:
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        for s in range(0, len(vr) - CLIP + 1, CLIP):
            clip = vr.get_batch(list(range(s, s + CLIP))).asnumpy()
            patches, _ = clip_to_patches(clip, 2, 16)
            frames += len(clip)
            tokens += len(patches)
            if writer is not None:
                writer.write_table(pa.table({"latents": pa.array([patches.tobytes()], pa.binary())}))
        del vr
    if writer is not None:
        writer.close()
    print("BENCH " + json.dumps({"seconds": time.perf_counter() - start, "frames": frames, "tokens": tokens}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.video_build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--frames", type=int, default=320, help="frames per video (default 320: 12.8 s)")
    ap.add_argument("--small", action="store_true", help="smoke run: 2 videos of 48 frames")
    ap.add_argument("--content", choices=("textured", "gradient"), default="textured",
                    help="textured: decodes at about the issue's 550 frames/s (default); gradient: nearly free "
                         "to decode, so the run measures tokenizing and writing alone")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the fastest counts (default 3)")
    ap.add_argument("--compression", default="auto", help="tokenmill's --compression (default: its own default)")
    ap.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--write", help=argparse.SUPPRESS)
    ap.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.raw:
        raw_main(args.paths, args.write)
        return 0
    if args.small:
        args.videos, args.frames = 2, 48
    folder = REPO / "bench" / "data" / f"videos-640x360-{args.videos}x{args.frames}-{args.content}"
    files = make_videos(folder, args.videos, args.frames, content=args.content)
    mb = sum(f.stat().st_size for f in files) / 1e6
    print(f"videos: {len(files)} h264 640x360 ({args.content}), {args.frames} frames each, {mb:.1f} MB ({folder})",
          flush=True)
    def raw_run(*extra: str) -> dict:
        out, wall, peak = run_measured([sys.executable, "-m", "bench.video_build", "--raw", *extra, *map(str, files)])
        return {**bench_result(out), "wall_s": wall, "peak_rss": peak}

    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-video-") as tmp:
        target = Path(tmp) / "tm"

        def build(*runner: str) -> dict:
            shutil.rmtree(target, ignore_errors=True)
            out, wall, peak = run_measured([sys.executable, "-m", "tokenmill.pipelines.build", "--input", str(folder / "*.mp4"),
                                            "--output", str(target), "--tokenizer", SPEC, "--clip-frames", str(CLIP),
                                            "--compression", args.compression, *runner])
            m = json.loads((target / "_manifest.json").read_text())
            return {"seconds": manifest_seconds(m), "frames": m["rows"] * CLIP, "tokens": m["tokens"],
                    "errors": m["errors"], "wall_s": wall, "peak_rss": peak,
                    "output_mb": sum(s["bytes"] for s in m["shards"]) / 1e6}

        one = ["--runner=FnApiRunner", "--direct_num_workers=1", "--direct_running_mode=in_memory"]
        ways = {f"tokenmill, 1 worker, {args.compression}": one,
                "tokenmill, 1 worker, 1 decoder": [*one, "--decode-threads", "1"],
                f"tokenmill, default ({os.cpu_count()} workers)": ["--runner=FnApiRunner"]}
        results = best_of_rounds(args.repeat, {
            "raw decord + numpy, 1 proc": raw_run,
            "raw + Parquet write (zstd), 1 proc": lambda: raw_run("--write", str(Path(tmp) / "raw.parquet")),
            **{name: lambda runner=runner: build(*runner) for name, runner in ways.items()}})
    raw, raw_write = results["raw decord + numpy, 1 proc"], results["raw + Parquet write (zstd), 1 proc"]
    tms = {name: results[name] for name in ways}
    print(f"\n{'':38s} {'seconds':>8s} {'frames/s':>9s} {'wall s':>7s} {'peak RSS':>9s} {'vs raw':>7s}")
    raw_fps = raw["frames"] / raw["seconds"]
    for name, r in results.items():
        assert r["frames"] == raw["frames"] and r["tokens"] == raw["tokens"], (name, r, raw)
        r["vs_raw"] = round(r["frames"] / r["seconds"] / raw_fps, 3)
        print(f"{name:38s} {r['seconds']:8.2f} {r['frames'] / r['seconds']:9.0f} {r['wall_s']:7.2f} "
              f"{r['peak_rss'] / 2**20:6.0f} MiB {r['vs_raw']:6.2f}x")
    first = next(iter(tms.values()))
    print(f"\ntokenmill, 1 worker vs raw decord: {first['vs_raw']:.2f}x (target >= 0.9x: "
          f"{'met' if first['vs_raw'] >= 0.9 else 'MISSED'}); vs raw + the same Parquet write: "
          f"{first['vs_raw'] / raw_write['vs_raw']:.2f}x; it wrote {first['output_mb']:.0f} MB"
          + ("  [--small: a smoke run, not a measurement]" if args.small else ""))
    (REPO / "bench" / "data" / f"video_build-{args.content}-{args.compression.replace(':', '')}.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
