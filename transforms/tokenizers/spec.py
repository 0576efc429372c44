"""Tokenizer specs, the strings users pass to --tokenizer, loaded per modality.

A thin face over transforms/registry.py, kept for callers that know their
modality (tests, reports, the training reader):

    load_text_tokenizer("tiktoken:cl100k_base", eos=True)
    load_image_tokenizer("patch:16")
    load_video_tokenizer("patch:2,16")

`tokenmill build --help` lists every family's spec forms, from the registry.
"""
from __future__ import annotations

from typing import Any

from tokenmill.transforms.registry import load_tokenizer, shared_tokenizer
from tokenmill.transforms.tokenizers.base import TextTokenizer


def load_text_tokenizer(spec: str, *, bos: bool = False, eos: bool = False,
                        engine: str = "tiktoken") -> TextTokenizer:
    """Load the text tokenizer a spec names; raises TokenizerSpecError with a one-line reason."""
    return load_tokenizer(spec, "text", {"bos": bos, "eos": eos, "engine": engine})


def shared_text_tokenizer(spec: str, bos: bool = False, eos: bool = False, engine: str = "tiktoken") -> TextTokenizer:
    """One text tokenizer per process and spec (see registry.shared_tokenizer)."""
    return shared_tokenizer(spec, "text", (("bos", bos), ("engine", engine), ("eos", eos)))


def load_image_tokenizer(spec: str, **options: Any):
    """Load an image tokenizer; `options` are its family's (device, dtype, ... for neural encoders)."""
    return load_tokenizer(spec, "image", options)


def recorded_options(manifest: Any) -> dict[str, Any]:
    """The tokenizer options a dataset was built with (its manifest's spec), to load the same tokenizer
    again for decode and reports: a neural family's dtype or sampling is part of its fingerprint."""
    recorded = ((getattr(manifest, "spec", None) or {}).get("tokenizer") or {}).get("options") or {}
    return dict(recorded) if isinstance(recorded, dict) else {}


def load_video_tokenizer(spec: str, **options: Any):
    """Load a video tokenizer; `options` are its family's (device, temporal_factor, ... for neural encoders)."""
    return load_tokenizer(spec, "video", options)
