"""`python -m bench [NAME ...] [options]`: run the named benchmarks (default: all); `python -m bench --list` names them.

One line per bench below: its name and its module, imported only when run (some need extras).
"""
import importlib
import sys

BENCHES = {
    "text_build": "bench.text_build",
    "reader": "bench.reader",
    "image_build": "bench.image_build",
    "video_build": "bench.video_build",
    "incremental": "bench.incremental",
    "hf_tokenizers": "bench.hf_tokenizers",
    "compare": "bench.compare",
    "portable": "bench.portable",
    "diffusers_vae": "bench.diffusers_vae",
    "peers": "bench.peers",
    "fixed_cost": "bench.fixed_cost",
    "neural_inference": "bench.neural_inference",
    "scaling": "bench.scaling",
}

if __name__ == "__main__":
    if "--list" in sys.argv[1:]:
        print("\n".join(BENCHES))
        sys.exit(0)
    names = [a for a in sys.argv[1:] if a in BENCHES] or list(BENCHES)
    rest = [a for a in sys.argv[1:] if a not in BENCHES]
    sys.exit(max(importlib.import_module(BENCHES[n]).main(rest) for n in names))
