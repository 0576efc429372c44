"""Neural encoders: tokenmill's block DoFn against Beam's RunInference, same images, same model.

    ./run_local.sh bench neural_inference [--images 192] [--size 128] [--repeat 3]

A Cosmos-style continuous encoder (stride-16 conv stack, 12 M parameters,
48 MB of fp32 weights) is exported once with torch.export (dynamic batch, H, W)
to an `export:` .pt2. Generated JPEGs (structured scenes) are then encoded,
each run a fresh process tree with its wall time, CPU seconds and peak memory,
in alternating rounds:
  tokenmill N       `tokenmill build --tokenizer export:enc.pt2`, N = 1, 2 workers:
                    blocks of decoded images, one DoFn per block (transforms/tokenize.py)
  runinference N    the pipeline a Beam user would write: fileio.MatchFiles →
                    ReadMatches → decode (tokenmill's decode_image, same size policy)
                    → RunInference(KeyedModelHandler(NeuralModelHandler)) (BatchElements,
                    Beam's metrics) → rows → WriteToParquet; N = 1, 2 workers
  runinference 2, shared   the same with share_model_across_processes=True
                    (one copy of the model per machine, Beam's multi_process_shared)
  runinference 2, warm     the same pipeline on tokenmill's local runner: workers forked
                    warm from the launcher, which loaded the model first, as a build does
                    (what RunInference inside `tokenmill build` would cost)
Both sides call the same tokenizer object (transforms/tokenizers/neural.py) with
the same --batch-size, so the difference is the orchestration. Both write every
latent to Parquet; the latents are checked equal (by file). Times are whole
processes (wall, start to exit), best of --repeat alternating rounds; every run
is listed. Memory is the peak over the process tree of the sum of RSS (a page
shared by forked workers counts once per process) and of PSS (shared pages split
among the processes that map them: what the tree really holds).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from bench.image_build import make_images
from bench.text_build import REPO, best_of_rounds

POLICY = "native:1024"
BATCH = 8


def make_model(path: Path) -> Path:
    import torch

    if path.exists():
        return path

    class Encoder(torch.nn.Module):  # like Cosmos CI16x16: (latent,) with 16 channels at 1/16 resolution
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            c = [3, 64, 128, 256, 512]
            self.down = torch.nn.Sequential(*[m for i in range(4) for m in (
                torch.nn.Conv2d(c[i], c[i + 1], 4, 2, 1), torch.nn.GELU())])
            self.mid = torch.nn.Sequential(*[m for _ in range(4) for m in (
                torch.nn.Conv2d(512, 512, 3, 1, 1), torch.nn.GELU())])
            self.out = torch.nn.Conv2d(512, 16, 1)

        def forward(self, x):
            return (self.out(self.mid(self.down(x))),)

    Dim = torch.export.Dim
    program = torch.export.export(Encoder().eval(), (torch.zeros(2, 3, 128, 128),), dynamic_shapes={
        "x": {0: Dim("B", max=256), 2: 16 * Dim("h", max=256), 3: 16 * Dim("w", max=256)}})
    torch.export.save(program, path)
    return path


def runinference_main(pattern: str, model: str, out: str, workers: int, shared: bool, warm: bool = False) -> None:
    """The RunInference pipeline (run as its own process by the benchmark). `warm`: run it as tokenmill runs a
    build, on its local runner (workers forked warm from the launcher, which has loaded the model first)."""
    import apache_beam as beam
    import numpy as np
    import pyarrow as pa
    from apache_beam.io import fileio
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.options.pipeline_options import PipelineOptions

    from tokenmill.transforms.decoders.images import SizePolicy, decode_image
    from tokenmill.transforms.neural_inference import NeuralModelHandler

    policy = SizePolicy.parse(POLICY)

    def decode(readable):
        image, _ = decode_image(readable.read(), policy)
        return readable.metadata.path, image

    def row(keyed):
        path, result = keyed
        latents, grid = result.inference
        return {"source": path, "latents": np.ascontiguousarray(latents).tobytes(), "grid": list(grid)}

    schema = pa.schema([("source", pa.string()), ("latents", pa.binary()), ("grid", pa.list_(pa.int32()))])
    handler = KeyedModelHandler(NeuralModelHandler(f"export:{model}", "image", {"batch_size": BATCH},
                                                   share_across_processes=shared))
    args = ["--runner=FnApiRunner", f"--direct_num_workers={workers}",
            f"--direct_running_mode={'multi_processing' if workers > 1 else 'in_memory'}"]
    if warm:
        from tokenmill.pipelines import runners

        handler.load_model()  # as tokenmill's launcher does in prepare(): the forked workers inherit it
        options = runners.pipeline_options(runners.local_defaults(args)[0])
        runners.tune_local(options)
        p = beam.Pipeline(runner=runners.make_runner(options), options=options)
    else:
        p = beam.Pipeline(options=PipelineOptions(args))
    _ = (p | fileio.MatchFiles(pattern) | fileio.ReadMatches() | "Decode" >> beam.Map(decode)
         | RunInference(handler) | "Rows" >> beam.Map(row)
         | beam.io.WriteToParquet(out + "/part", schema, file_name_suffix=".parquet"))
    if warm:
        assert runners.execute(p, "bench").code == 0
    else:
        p.run().wait_until_finish()


def run_measured(cmd: list[str]) -> tuple[float, int, int, float]:
    """Run a command; (wall seconds, peak RSS, peak PSS, CPU seconds) of its process tree (bench.text_build.measure:
    PSS is what a model forked into workers really costs, RSS counts it once per process)."""
    from bench.text_build import measure

    m = measure(cmd, pss=True)
    return m.wall, m.peak_rss, m.peak_pss, m.cpu_s


def read_latents(files) -> dict[str, bytes]:
    import pyarrow.parquet as pq

    rows: dict[str, bytes] = {}
    for f in files:
        for r in pq.read_table(f, columns=["source", "latents"]).to_pylist():
            rows[r["source"]] = r["latents"]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.neural_inference", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--runinference", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.runinference:
        pattern, model, out, workers, shared = args.runinference
        runinference_main(pattern, model, out, int(workers), shared == "1", args.warm)
        return 0
    folder = REPO / "bench" / "data" / f"images-{args.size}"
    files = make_images(folder, args.images, args.size)
    model = make_model(REPO / "bench" / "data" / "neural-encoder.pt2")
    print(f"images: {len(files)} JPEGs of {args.size}x{args.size}; model {model} "
          f"({model.stat().st_size / 1e6:.0f} MB)", flush=True)
    latents: dict[str, dict[str, bytes]] = {}
    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-neural-") as tmp:
        def tokenmill(n: int):
            target = Path(tmp) / f"tm{n}"

            def run() -> dict:
                shutil.rmtree(target, ignore_errors=True)
                runner = ["--runner=FnApiRunner", f"--direct_num_workers={n}",
                          f"--direct_running_mode={'multi_processing' if n > 1 else 'in_memory'}"]
                wall, rss, pss, cpu = run_measured([sys.executable, "-m", "tokenmill.pipelines.build", "--input",
                                              str(folder / "*.jpg"), "--output", str(target), "--tokenizer",
                                              f"export:{model}", "--batch-size", str(BATCH), "--size", POLICY,
                                              *runner])
                m = json.loads((target / "_manifest.json").read_text())
                latents[f"tokenmill {n}"] = read_latents(target / f for f in m["files"])
                return {"seconds": wall, "images": m["rows"], "errors": m["errors"], "peak_rss": rss,
                        "peak_pss": pss, "cpu_s": cpu}
            return run

        def runinference(n: int, shared: bool, warm: bool = False):
            target = Path(tmp) / f"ri{n}{shared}{warm}"

            def run() -> dict:
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir()
                wall, rss, pss, cpu = run_measured([sys.executable, "-m", "bench.neural_inference", "--runinference",
                                              str(folder / "*.jpg"), str(model), str(target), str(n),
                                              "1" if shared else "0", *(["--warm"] if warm else [])])
                got = read_latents(sorted(target.glob("*.parquet")))
                latents[f"runinference {n}{' shared' if shared else ''}{' warm' if warm else ''}"] = got
                return {"seconds": wall, "images": len(got), "errors": 0, "peak_rss": rss, "peak_pss": pss,
                        "cpu_s": cpu}
            return run

        cpu_runs: dict[str, list[float]] = {}

        def noting_cpu(name: str, run):
            def wrapped() -> dict:
                r = run()
                cpu_runs.setdefault(name, []).append(r["cpu_s"])
                return r
            return wrapped

        runs = {"tokenmill, 1 worker": tokenmill(1), "runinference, 1 worker": runinference(1, False),
                "tokenmill, 2 workers": tokenmill(2), "runinference, 2 workers": runinference(2, False),
                "runinference, 2 workers, shared model": runinference(2, True),
                "runinference, 2 workers, tokenmill's warm workers": runinference(2, False, warm=True)}
        results = best_of_rounds(args.repeat, {name: noting_cpu(name, run) for name, run in runs.items()})
    reference = latents["tokenmill 1"]
    for name, got in latents.items():
        same = {Path(k).name: v for k, v in got.items()} == {Path(k).name: v for k, v in reference.items()}
        assert same, f"{name} latents differ from tokenmill's"
    print(f"\n{'':52s} {'wall s':>7s} {'images/s':>9s} {'CPU s':>6s} {'peak RSS':>9s} {'peak PSS':>9s}   "
          "runs (wall s; CPU s)")
    for name, r in results.items():
        print(f"{name:52s} {r['seconds']:7.2f} {r['images'] / r['seconds']:9.1f} {r['cpu_s']:6.1f} "
              f"{r['peak_rss'] / 2**20:5.0f} MiB {r['peak_pss'] / 2**20:5.0f} MiB   {r['runs']}; "
              f"{[round(c, 1) for c in cpu_runs[name]]}")
    for n in (1, 2):
        tm, ri = results[f"tokenmill, {n} worker{'s' if n > 1 else ''}"], \
            results[f"runinference, {n} worker{'s' if n > 1 else ''}"]
        print(f"{n} worker(s): runinference / tokenmill wall = {ri['seconds'] / tm['seconds']:.2f}x, "
              f"CPU = {ri['cpu_s'] / tm['cpu_s']:.2f}x")
    (REPO / "bench" / "data" / "neural_inference.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
