"""Image build benchmark: `tokenmill build` with patch:16 and vq: against a plain loop, same images.

    ./run_local.sh bench image_build [--images 1000] [--size 512]

The images are generated here once (structured scenes: gradients, discs and
bars, JPEG quality 90), then, each as a fresh process tree with its peak RSS:
  loop, 1 proc     for each file: read, decode_image (same size policy), patchify,
                   and for vq the nearest codes (same numpy search as the tokenizer)
  loop, 2 proc     the same loop split over a multiprocessing.Pool of 2
  tokenmill        `tokenmill build` with 1 worker and with 2 workers; timed from
                   pipeline start to commit (the manifest's timing: the summary's figure)
Each is run --repeat times (default 3) and the fastest run counts, for both sides.
The vq codebook (K=256 by default) is fitted once on the images with
`tokenmill fit`. The loop writes nothing; tokenmill also writes every token to
Parquet (for patch:16 that is 786 kB of uint8 pixels per 512x512 image).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.text_build import REPO, bench_result, best_of, manifest_seconds, run_measured

POLICY = "native:1024"
PATCH = 16


def make_images(folder: Path, count: int, size: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / "_images.json"
    files = [folder / f"img-{i:05d}.jpg" for i in range(count)]
    if stamp.exists() and json.loads(stamp.read_text()) == {"count": count, "size": size} and all(
            f.exists() for f in files):
        return files
    for stray in set(folder.glob("img-*.jpg")) - set(files):  # the build reads folder/*.jpg
        stray.unlink()
    y, x = np.mgrid[0:size, 0:size]
    for i, f in enumerate(files):
        rng = np.random.default_rng(i)
        base = np.stack([(x * rng.uniform(0.2, 1) + y * rng.uniform(0, 0.5)) % 256,
                         (y * rng.uniform(0.2, 1)) % 256, np.full_like(x, rng.integers(0, 256))], -1)
        for _ in range(6):
            cx, cy, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(size // 16, size // 4))]
            base[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
        Image.fromarray(base.astype(np.uint8)).save(f, quality=90)
    stamp.write_text(json.dumps({"count": count, "size": size}))
    return files


_CODEBOOK: str | None = None
_WRITE: str | None = None  # a folder: the loop also writes its tokens to Parquet (zstd), 64 images per row group


def _loop(paths: list[str]) -> int:
    """Decode and tokenize each image; patches, or with a codebook the nearest codes."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tokenmill.transforms.decoders.images import SizePolicy, decode_image
    from tokenmill.transforms.tokenizers.codebook import nearest_codes, to_unit
    from tokenmill.transforms.tokenizers.patches import image_to_patches

    codes = norms = None
    if _CODEBOOK:
        with np.load(_CODEBOOK, allow_pickle=False) as z:
            codes = z["codes"].astype(np.float32)
        norms = (codes ** 2).sum(1)
    policy, tokens, batch = SizePolicy.parse(POLICY), 0, []
    writer = pq.ParquetWriter(os.path.join(_WRITE, f"{os.getpid()}.parquet"), pa.schema([("tokens", pa.binary())]),
                              compression="zstd") if _WRITE else None
    for p in paths:
        with open(p, "rb") as f:
            image, _ = decode_image(f.read(), policy)
        patches, _ = image_to_patches(image, PATCH)
        if codes is not None:
            patches = nearest_codes(to_unit(patches), codes, norms).astype(np.uint8)
        tokens += len(patches)
        if writer is not None:
            batch.append(patches.tobytes())
            if len(batch) == 64 or p == paths[-1]:
                writer.write_table(pa.table({"tokens": pa.array(batch, pa.binary())}))
                batch = []
    if writer is not None:
        writer.close()
    return tokens


def loop_main(processes: int, paths: list[str], codebook: str | None, write: str | None = None) -> None:
    global _CODEBOOK, _WRITE
    import tokenmill.transforms.decoders.images  # noqa: F401  (imports outside the timed part)
    import tokenmill.transforms.tokenizers.codebook  # noqa: F401

    _CODEBOOK, _WRITE = codebook, write
    start = time.perf_counter()
    if processes == 1:
        tokens = _loop(paths)
    else:
        chunks = [paths[i::processes] for i in range(processes)]
        with mp.get_context("fork").Pool(processes) as pool:
            tokens = sum(pool.map(_loop, chunks))
    print("BENCH " + json.dumps({"seconds": time.perf_counter() - start, "tokens": tokens, "images": len(paths)}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.image_build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--loop", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--codebook", help=argparse.SUPPRESS)
    ap.add_argument("--write", help=argparse.SUPPRESS)
    ap.add_argument("--codes", type=int, default=256, help="vq codebook size for the vq runs (default 256)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the fastest counts (default 3)")
    ap.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.loop:
        loop_main(args.loop, args.paths, args.codebook, args.write)
        return 0
    folder = REPO / "bench" / "data" / f"images-{args.size}"
    files = make_images(folder, args.images, args.size)
    mb = sum(f.stat().st_size for f in files) / 1e6
    print(f"images: {len(files)} JPEGs of {args.size}x{args.size}, {mb:.1f} MB ({folder})", flush=True)
    codebook = folder / f"codebook-p{PATCH}-k{args.codes}.npz"
    if not codebook.exists():  # fitted once on these images with tokenmill's own fit pipeline
        run_measured([sys.executable, "-m", "tokenmill.pipelines.fit", "--kind", "vq", "--input", str(folder / "*.jpg"),
                      "--output", str(codebook), "--patch", str(PATCH), "--codes", str(args.codes),
                      "--samples-per-image", "32", "--max-samples", "20000", "--iterations", "10"])
    results: dict[str, dict] = {}
    pairs = []
    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-img-") as tmp:
        for spec, cb in [(f"patch:{PATCH}", None), (f"vq:{codebook}", str(codebook))]:
            label = spec if cb is None else f"vq:K={args.codes}"
            for n in (1, 2):
                # Same rule as tokenmill's local workers: one BLAS thread per process when there are several.
                blas = {v: "1" for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")} if n > 1 else {}
                def run_loop(*extra: str) -> dict:
                    out, wall, peak = run_measured([sys.executable, "-m", "bench.image_build", "--loop", str(n),
                                                    *extra, *map(str, files)], env=blas)
                    return {**bench_result(out), "wall_s": wall, "peak_rss": peak}

                loop_name = f"loop {label}, {n} proc"
                results[loop_name] = best_of(args.repeat, lambda: run_loop(*(["--codebook", cb] if cb else [])))
                written = None
                if cb is None:  # the same loop, also writing its patches to Parquet (zstd) as the build must
                    sink = Path(tmp) / f"loop-write-{n}"

                    def loop_writing() -> dict:
                        shutil.rmtree(sink, ignore_errors=True)
                        sink.mkdir()
                        return run_loop("--write", str(sink))

                    written = f"loop {label} + Parquet write, {n} proc"
                    results[written] = best_of(args.repeat, loop_writing)
                    shutil.rmtree(sink, ignore_errors=True)
                runner = ["--runner=FnApiRunner", f"--direct_num_workers={n}",
                          f"--direct_running_mode={'multi_processing' if n > 1 else 'in_memory'}"]
                target = Path(tmp) / f"tm{n}"

                def build() -> dict:
                    shutil.rmtree(target, ignore_errors=True)
                    out, wall, peak = run_measured([sys.executable, "-m", "tokenmill.pipelines.build", "--input",
                                                    str(folder / "*.jpg"), "--output", str(target), "--tokenizer",
                                                    spec, "--size", POLICY, *runner])
                    m = json.loads((target / "_manifest.json").read_text())
                    return {"seconds": manifest_seconds(m), "tokens": m["tokens"], "images": m["rows"],
                            "errors": m["errors"], "wall_s": wall, "peak_rss": peak,
                            "output_mb": sum(s["bytes"] for s in m["shards"]) / 1e6}

                tm_name = f"tokenmill {label}, {n} worker"
                results[tm_name] = best_of(args.repeat, build)
                pairs.append((tm_name, loop_name, n, written))
                shutil.rmtree(target, ignore_errors=True)
                print(f"  done: {tm_name}", flush=True)
    print(f"\n{'':34s} {'seconds':>8s} {'images/s':>9s} {'wall s':>7s} {'peak RSS':>9s}")
    for name, r in results.items():
        print(f"{name:34s} {r['seconds']:8.2f} {r['images'] / r['seconds']:9.0f} {r['wall_s']:7.2f} "
              f"{r['peak_rss'] / 2**20:6.0f} MiB")
    print()
    for tm_name, loop_name, n, written in pairs:
        tm, loop = results[tm_name], results[loop_name]
        assert tm["tokens"] == loop["tokens"], (tm["tokens"], loop["tokens"])
        ratio = loop["seconds"] / tm["seconds"]
        print(f"{tm_name} vs {loop_name}: {ratio:.2f}x (target >= 0.9x: {'met' if ratio >= 0.9 else 'MISSED'}); "
              f"it also wrote {tm['output_mb']:.0f} MB")
        if written:
            print(f"{tm_name} vs {written}: {results[written]['seconds'] / tm['seconds']:.2f}x (same output work)")
    (REPO / "bench" / "data" / "image_build.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
