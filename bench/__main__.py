"""`python -m bench [text_build|reader|image_build|video_build|incremental|hf_tokenizers|compare ...]`: run the named benchmarks (default: all)."""
import sys

from bench import compare, hf_tokenizers, image_build, incremental, reader, text_build, video_build

BENCHES = {"text_build": text_build.main, "reader": reader.main, "image_build": image_build.main,
           "video_build": video_build.main, "incremental": incremental.main, "hf_tokenizers": hf_tokenizers.main,
           "compare": compare.main}

if __name__ == "__main__":
    names = [a for a in sys.argv[1:] if a in BENCHES] or list(BENCHES)
    rest = [a for a in sys.argv[1:] if a not in BENCHES]
    sys.exit(max(BENCHES[n](rest) for n in names))
