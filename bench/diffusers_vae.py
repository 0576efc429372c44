"""diffusers: benchmark: `tokenmill build --tokenizer diffusers:...` (an AutoencoderKL) against a plain loop.

    ./run_local.sh bench diffusers_vae [--images 64] [--size 512] [--batch-size 8] [--repeat 3]

The images are generated once (bench/image_build's structured scenes, JPEG
quality 90) and so is the model: a small random-weight AutoencoderKL
(block_out_channels 8, 16, 32, 32, one layer per block, mid-block attention,
4 latent channels, f = 8), saved with save_pretrained. Then, as fresh
processes with their peak RSS, in alternating rounds:
  loop        one process: for each batch of --batch-size files, PIL decode
              (convert("RGB")), stack, x / 127.5 - 1, vae.encode(x).latent_dist.mean;
              at the end it saves the latents to one .npy (a build must persist its tokens)
  loop, tuned the same loop with tokenmill's torch environment (transforms/tokenizers/neural.py,
              TORCH_ENVIRONMENT: passive OpenMP waiting, 2 MiB pages for big tensors): what
              tokenmill's own work costs beside the same torch settings
  tokenmill   `tokenmill build --tokenizer diffusers:MODEL --batch-size N` with one
              worker in one process (FnApiRunner in_memory); it writes every latent to
              Parquet and commits the dataset
All use torch's default thread count (one per core). Two figures per side: the timed part (the loop from its
first read to its saved latents, after imports and model load; tokenmill from pipeline start to commit, after
its one model load, from the manifest) and the whole process's wall time (imports, model load, and for
tokenmill the Beam graph). The fastest of --repeat rounds counts for each; the ratio is loop time over
tokenmill time (target >= 0.9). Each side's CPU seconds (user + system, process tree), minor page faults and
the 1-minute load average at its start are recorded too: with the machine loaded several times over, wall
time is mostly waiting for a core. Both must count the same latent positions.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.image_build import make_images
from bench.text_build import REPO, bench_result, best_of_rounds, manifest_seconds, measure
from tokenmill.transforms.tokenizers.neural import TORCH_ENVIRONMENT

CONFIG = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              block_out_channels=(8, 16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8)


def make_model(folder: Path) -> Path:
    """The small AutoencoderKL, seeded, saved once as a diffusers folder."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**CONFIG).save_pretrained(folder)
    return folder


def measured(cmd: list[str], env: dict | None = None) -> dict:
    """Wall seconds, peak RSS, CPU seconds, minor page faults and the load average at the start: on a shared
    machine whose load is several times its cores, wall time mostly measures waiting for a core; CPU time
    measures the work."""
    load = os.getloadavg()[0]
    faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    m = measure(cmd, env)
    return {"out": m.out, "wall_s": m.wall, "peak_rss": m.peak_rss, "cpu_s": m.cpu_s, "load": round(load, 2),
            "minflt": resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - faults}


def loop_main(model: str, batch_size: int, paths: list[str], out: str) -> None:
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    vae = AutoencoderKL.from_pretrained(model, use_safetensors=True).eval()
    start, cpu = time.perf_counter(), time.process_time()
    positions, latents = 0, []
    with torch.inference_mode():
        for s in range(0, len(paths), batch_size):
            batch = []
            for p in paths[s:s + batch_size]:
                with Image.open(p) as im:
                    batch.append(np.asarray(im.convert("RGB")))
            x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            mean = vae.encode(x).latent_dist.mean
            positions += int(mean.shape[0] * mean.shape[2] * mean.shape[3])
            latents.append(mean.numpy())
    np.save(out, np.concatenate(latents))
    print("BENCH " + json.dumps({"seconds": time.perf_counter() - start, "timed_cpu_s": time.process_time() - cpu,
                                 "tokens": positions, "images": len(paths), "threads": torch.get_num_threads()}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.diffusers_vae", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the fastest run of each side counts (default 3)")
    ap.add_argument("--loop", help=argparse.SUPPRESS)  # the model folder: run the plain loop on `paths`
    ap.add_argument("--loop-out", help=argparse.SUPPRESS)  # where the loop saves its latents
    ap.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.loop:
        loop_main(args.loop, args.batch_size, args.paths, args.loop_out)
        return 0
    data = REPO / "bench" / "data"
    folder = data / f"diffusers-images-{args.size}"
    files = make_images(folder, args.images, args.size)
    model = make_model(data / "diffusers-kl-small")
    print(f"images: {len(files)} JPEGs of {args.size}x{args.size} ({folder}); model {model}; "
          f"batch size {args.batch_size}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-diffusers-") as tmp:
        target = Path(tmp) / "ds"

        def loop(env: dict | None = None) -> dict:
            m = measured([sys.executable, "-m", "bench.diffusers_vae", "--loop", str(model), "--loop-out",
                          str(Path(tmp) / "latents.npy"), "--batch-size", str(args.batch_size), *map(str, files)],
                         env)
            return {**bench_result(m.pop("out")), **m}

        def build() -> dict:
            shutil.rmtree(target, ignore_errors=True)
            r = measured([sys.executable, "-m", "tokenmill.pipelines.build", "--input",
                          str(folder / "*.jpg"), "--output", str(target), "--tokenizer",
                          f"diffusers:{model}", "--batch-size", str(args.batch_size),
                          "--progress", "none", "--runner=FnApiRunner", "--direct_num_workers=1",
                          "--direct_running_mode=in_memory"])
            del r["out"]
            m = json.loads((target / "_manifest.json").read_text())
            return {"seconds": manifest_seconds(m), "tokens": m["tokens"], "images": m["rows"],
                    "errors": m["errors"], **r}

        results = best_of_rounds(args.repeat, {"loop (PIL + vae.encode), 1 proc": loop,
                                               "loop, tokenmill's torch env": lambda: loop(TORCH_ENVIRONMENT),
                                               "tokenmill diffusers:, 1 worker": build})
    print(f"\n{'':34s} {'seconds':>8s} {'images/s':>9s} {'wall s':>7s} {'CPU s':>7s} {'faults':>8s} "
          f"{'peak RSS':>9s} {'load':>5s}  runs")
    for name, r in results.items():
        print(f"{name:34s} {r['seconds']:8.2f} {r['images'] / r['seconds']:9.2f} {r['wall_s']:7.2f} "
              f"{r['cpu_s']:7.2f} {r['minflt']:8d} {r['peak_rss'] / 2**20:6.0f} MiB {r['load']:5.1f}  {r['runs']}")
    loop_r, tuned, tm = results.values()
    assert tm["tokens"] == loop_r["tokens"] == tuned["tokens"] and tm["errors"] == 0, (tm, loop_r)
    ratio = loop_r["seconds"] / tm["seconds"]
    print(f"\ntokenmill vs loop, timed part: {ratio:.2f}x (target >= 0.9x: {'met' if ratio >= 0.9 else 'MISSED'}); "
          f"whole processes: {loop_r['wall_s'] / tm['wall_s']:.2f}x; whole-process CPU: "
          f"{loop_r['cpu_s'] / tm['cpu_s']:.2f}x ({tm['cpu_s'] - loop_r['cpu_s']:+.1f} CPU s)")
    print(f"tokenmill vs the loop with the same torch environment, timed part: "
          f"{tuned['seconds'] / tm['seconds']:.2f}x; whole-process CPU: {tuned['cpu_s'] / tm['cpu_s']:.2f}x "
          f"({tm['cpu_s'] - tuned['cpu_s']:+.1f} CPU s)")
    (data / "diffusers_vae.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
