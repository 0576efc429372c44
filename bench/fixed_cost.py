"""What a tiny build costs beyond importing Beam: whole processes, side by side.

    ./run_local.sh bench fixed_cost [--repeat 5]

In rounds (best of --repeat, all runs kept), each a fresh process:
  import Beam        python -c "import apache_beam" (the floor: every build imports it)
  tiny build         tokenmill build on the repository's samples (3.7 kB of text,
                     tiktoken:cl100k_base --eos), default runner: the command
                     ./run_local.sh runs
  tiny build, 2 workers  the same with --direct_num_workers=2 (warm forked workers)
  tiny build, no Beam short-cuts  the tiny build with TOKENMILL_BEAM_SHORTCUTS=0
                     (pipelines/beam_seam.py: what the lean Beam import and Beam's
                     options and DoFn caches save)
Reports whole-process wall and CPU seconds (user + system of the process tree)
and the build's in-pipeline seconds. Target: the tiny build at most 1.0 s more
than importing Beam.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.peers import TOKENMILL, compile_sources
from bench.text_build import REPO, manifest_seconds


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.fixed_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "data" / "fixed_cost.json")
    args = ap.parse_args(argv)
    compile_sources()
    with tempfile.TemporaryDirectory(prefix="tokenmill-fixed-") as tmp:
        out = Path(tmp) / "out"
        build = [*TOKENMILL, "--input", str(REPO / "samples" / "text" / "*"), "--output", str(out), "--overwrite",
                 "--tokenizer", "tiktoken:cl100k_base", "--eos", "--progress", "none"]
        sides = {"import Beam": [sys.executable, "-c", "import apache_beam"],
                 "tiny build": build,
                 "tiny build, 2 workers": [*build, "--direct_num_workers=2"],
                 "tiny build, no Beam short-cuts": build}
        envs = {"tiny build, no Beam short-cuts": {"TOKENMILL_BEAM_SHORTCUTS": "0"}}
        timed(sides["tiny build"])  # once first: caches warm alike for every side
        runs: dict[str, list[tuple[float, float, float | None]]] = {k: [] for k in sides}
        print(f"load before: {os.getloadavg()}", flush=True)
        for _ in range(args.repeat):
            for name, cmd in sides.items():
                shutil.rmtree(out, ignore_errors=True)
                os.sync()
                wall, cpu = timed(cmd, envs.get(name))
                inner = manifest_seconds(json.loads((out / "_manifest.json").read_text())) if cmd is not sides[
                    "import Beam"] else None
                runs[name].append((wall, cpu, inner))
    load = os.getloadavg()
    print(f"load after: {load}\n\n{'':32s} {'wall s':>7s} {'cpu s':>6s} {'inner s':>8s}   runs (wall s)")
    best = {}
    for name, rs in runs.items():
        w = min(r[0] for r in rs)
        c = min(r[1] for r in rs)
        inner = min((r[2] for r in rs if r[2] is not None), default=None)
        best[name] = {"wall_s": w, "cpu_s": c, "pipeline_s": inner, "runs_wall": [round(r[0], 2) for r in rs],
                      "runs_cpu": [round(r[1], 2) for r in rs]}
        print(f"{name:32s} {w:7.2f} {c:6.2f} {'' if inner is None else f'{inner:8.2f}':>8s}   {best[name]['runs_wall']}")
    extra = best["tiny build"]["wall_s"] - best["import Beam"]["wall_s"]
    print(f"\ntiny build - import Beam: {extra:+.2f} s wall, "
          f"{best['tiny build']['cpu_s'] - best['import Beam']['cpu_s']:+.2f} s CPU "
          f"(target <= +1.0 s: {'met' if extra <= 1.0 else 'MISSED'})")
    off, on = best["tiny build, no Beam short-cuts"], best["tiny build"]
    print(f"Beam short-cuts (pipelines/beam_seam.py) save {off['wall_s'] - on['wall_s']:+.2f} s wall, "
          f"{off['cpu_s'] - on['cpu_s']:+.2f} s CPU (best against best)")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"results": best, "load_after": load}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
