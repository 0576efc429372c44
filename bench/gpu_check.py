"""GPU check for the neural families: the same builds with --device cuda and --device cpu must agree.

    python -m bench.gpu_check [--images 64] [--size 256] [--device cuda:0]

Run it on a machine with CUDA (it exits 2 with one line where there is none;
`--device cpu` is a dry run of the script, cpu against cpu).
It generates JPEGs (bench.image_build's scenes), builds a Cosmos-style
continuous encoder and a discrete one (FSQ, 5^4 = 625 codes) on top of the
same network, saves each as TorchScript (`torchscript:`) and as a torch.export
program (`export:`, dynamic batch, H and W), and builds every combination of
family x kind x {cpu, cuda} x {fp32, bf16} with `tokenmill build` (1 worker).
Then, per combination, it compares the cuda rows with the cpu rows:
  soft, fp32   max |cuda - cpu| <= 1e-3 + 1e-3 * max |cpu|   (cuDNN and TF32 reorder sums)
  soft, bf16   max |cuda - cpu| <= 5e-2 + 2e-2 * max |cpu|   (bf16 keeps 8 bits of mantissa)
  hard         at least 99% of codes equal (fp32) / 95% (bf16): a code flips only where a
               latent sits on a rounding boundary
and prints images/s from each build's manifest (pipeline start to commit).
bf16 `export:` needs a program exported in bf16; the check exports one.
Exit code 0 when every comparison is within tolerance, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.image_build import make_images
from bench.text_build import REPO, manifest_seconds

TOLERANCE = {("soft", "fp32"): (1e-3, 1e-3), ("soft", "bf16"): (5e-2, 2e-2),
             ("hard", "fp32"): 0.99, ("hard", "bf16"): 0.95}


def models(folder: Path) -> dict[tuple[str, str, str], Path]:
    """(family, kind, dtype) -> model file."""
    import torch

    class Continuous(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            c = [3, 64, 128, 256, 256]
            self.net = torch.nn.Sequential(*[m for i in range(4) for m in (
                torch.nn.Conv2d(c[i], c[i + 1], 4, 2, 1), torch.nn.GELU())], torch.nn.Conv2d(256, 16, 1))

        def forward(self, x):
            return (self.net(x),)

    class Discrete(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Continuous()
            self.register_buffer("vocab_size", torch.tensor(625))

        def forward(self, x):
            codes = torch.round(torch.tanh(self.inner(x)[0][:, :4]) * 2)
            levels = (codes + 2).to(torch.int64)
            return levels[:, 0] + 5 * levels[:, 1] + 25 * levels[:, 2] + 125 * levels[:, 3], codes

    Dim = torch.export.Dim
    out = {}
    for kind, cls in (("soft", Continuous), ("hard", Discrete)):
        module = cls().eval()
        path = folder / f"{kind}.jit"
        torch.jit.script(module).save(str(path))
        out["torchscript", kind, "fp32"] = out["torchscript", kind, "bf16"] = path
        for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            program = torch.export.export(cls().eval().to(torch_dtype), (torch.zeros(2, 3, 64, 64, dtype=torch_dtype),),
                                          dynamic_shapes={"x": {0: Dim("B", max=256), 2: 16 * Dim("h", max=128),
                                                                3: 16 * Dim("w", max=128)}})
            path = folder / f"{kind}-{dtype}.pt2"
            torch.export.save(program, path)
            out["export", kind, dtype] = path
    return out


def build(images: Path, spec: str, device: str, dtype: str, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "tokenmill.pipelines.build", "--input", str(images / "*.jpg"),
                           "--output", str(out), "--tokenizer", spec, "--device", device, "--dtype", dtype,
                           "--batch-size", "16", "--runner=FnApiRunner", "--direct_num_workers=1",
                           "--direct_running_mode=in_memory"], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"build failed ({spec} {device} {dtype}): {proc.stderr.strip().splitlines()[-1]}")
    import pyarrow as pa
    import pyarrow.parquet as pq

    m = json.loads((out / "_manifest.json").read_text())
    table = pa.concat_tables([pq.read_table(out / f) for f in m["files"]]).sort_by("id")
    return {"manifest": m, "rows": table.to_pylist(), "seconds": manifest_seconds(m)}


def values(row: dict, meta: dict) -> np.ndarray:
    if meta["kind"] == "hard":
        return np.asarray(row["tokens"])
    stored = meta["latent_dtype"]
    raw = np.frombuffer(row["latents"], {"float32": "<f4", "bfloat16": "<u2", "float16": "<f2"}[stored])
    return (raw.astype(np.uint32) << 16).view(np.float32) if stored == "bfloat16" else raw.astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    import torch

    if args.device != "cpu" and not torch.cuda.is_available():
        print(f"gpu_check: CUDA is not available here (torch {torch.__version__}); run it on a GPU machine",
              file=sys.stderr)
        return 2
    images = REPO / "bench" / "data" / f"images-{args.size}"
    make_images(images, args.images, args.size)
    ok = True
    where = torch.cuda.get_device_name(0) if args.device != "cpu" else "cpu against cpu (a dry run of this script)"
    print(f"{where}, torch {torch.__version__}, {args.images} images {args.size}px")
    print(f"{'family':12s} {'kind':5s} {'dtype':5s} {'cpu img/s':>10s} {'cuda img/s':>11s}  agreement")
    with tempfile.TemporaryDirectory(prefix="tokenmill-gpu-check-") as tmp:
        files = models(Path(tmp))
        for (family, kind, dtype), path in files.items():
            spec = f"{family}:{path}"
            cpu = build(images, spec, "cpu", dtype, Path(tmp) / "cpu")
            gpu = build(images, spec, args.device, dtype, Path(tmp) / "gpu")
            meta = cpu["manifest"]["tokenizer"]
            assert [r["id"] for r in cpu["rows"]] == [r["id"] for r in gpu["rows"]]
            pairs = [(values(a, meta), values(b, meta)) for a, b in zip(cpu["rows"], gpu["rows"])]
            if kind == "hard":
                agree = sum(int((a == b).sum()) for a, b in pairs) / max(1, sum(a.size for a, _ in pairs))
                passed = agree >= TOLERANCE[kind, dtype]
                verdict = f"{agree:.4%} codes equal (need {TOLERANCE[kind, dtype]:.0%})"
            else:
                atol, rtol = TOLERANCE[kind, dtype]
                diff = max(float(np.abs(a - b).max()) for a, b in pairs)
                scale = max(float(np.abs(a).max()) for a, _ in pairs)
                passed = diff <= atol + rtol * scale
                verdict = f"max |diff| {diff:.2e} (limit {atol + rtol * scale:.2e})"
            ok &= passed
            n = len(cpu["rows"])
            print(f"{family:12s} {kind:5s} {dtype:5s} {n / cpu['seconds']:10.1f} {n / gpu['seconds']:11.1f}  "
                  f"{verdict} {'ok' if passed else 'FAILED'}", flush=True)
    print("gpu_check: " + ("every build agrees within tolerance" if ok else "SOME BUILDS DISAGREE"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
