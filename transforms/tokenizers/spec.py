"""Tokenizer specs: the strings users pass to --tokenizer, parsed into tokenizers.

    tiktoken:cl100k_base      the GPT-4 vocabulary, offline
    tiktoken:o200k_base       the GPT-4o vocabulary, offline
    tiktoken:PATH_OR_URI      any .tiktoken rank file (see transforms/tokenizers/bpe.py)
    bytes                     UTF-8 byte-level tokens
    hf:PATH_OR_URI            a Hugging Face tokenizer.json or save_pretrained folder
"""
from __future__ import annotations

import functools
from typing import Any

from transforms.tokenizers.base import TextTokenizer, TokenizerSpecError

TEXT_SPECS = ("tiktoken:cl100k_base", "tiktoken:o200k_base", "tiktoken:PATH_OR_URI", "bytes", "hf:PATH_OR_URI")


def load_text_tokenizer(spec: str, *, bos: bool = False, eos: bool = False,
                        engine: str = "tiktoken") -> TextTokenizer:
    """Load the tokenizer a spec names; raises TokenizerSpecError with a one-line reason.

    `engine` picks the BPE implementation for tiktoken vocabularies (see engines.py).
    """
    family, _, arg = spec.partition(":")
    if engine != "tiktoken" and family != "tiktoken":
        raise TokenizerSpecError(f"--engine {engine} applies to tiktoken vocabularies, not {spec!r}")
    if family == "bytes" and not arg:
        from transforms.tokenizers.byte_level import ByteTokenizer

        return ByteTokenizer(spec, bos=bos, eos=eos)
    if family == "tiktoken" and arg:
        from transforms.tokenizers.bpe import OFFLINE_ENCODINGS, TiktokenTokenizer

        if arg not in OFFLINE_ENCODINGS and "/" not in arg and "." not in arg:
            raise TokenizerSpecError(
                f"unknown tiktoken encoding {arg!r}: available offline: "
                f"{', '.join(sorted(OFFLINE_ENCODINGS))}, or give a path/URI to a .tiktoken file")
        return TiktokenTokenizer(spec, arg, bos=bos, eos=eos, engine=engine)
    if family == "hf" and arg:
        from transforms.tokenizers.hf import HFTokenizer

        return HFTokenizer(spec, arg, bos=bos, eos=eos)
    raise TokenizerSpecError(f"unknown tokenizer spec {spec!r}: expected one of {', '.join(TEXT_SPECS)}")


@functools.lru_cache(maxsize=8)
def shared_text_tokenizer(spec: str, bos: bool = False, eos: bool = False,
                          engine: str = "tiktoken") -> TextTokenizer:
    """One tokenizer per process and spec: workers in one process (and the
    launcher, on a local runner) share it instead of each loading its own.
    Tokenizers are safe to call from several threads."""
    return load_text_tokenizer(spec, bos=bos, eos=eos, engine=engine)


IMAGE_SPECS = ("patch:P", "vq:PATH_OR_URI", "pca:PATH_OR_URI", "torchscript:PATH_OR_URI")
IMAGE_FAMILIES = ("patch", "vq", "pca", "torchscript")


def load_image_tokenizer(spec: str, **options):
    """Load an image tokenizer from its spec; raises TokenizerSpecError with a one-line reason.

    `options` (device, dtype, batch_size, pad_multiple, vocab_size) apply to torchscript: only.
    """
    family, _, arg = spec.partition(":")
    if family == "torchscript" and arg:
        from transforms.tokenizers.torchscript import TorchScriptImageTokenizer

        return TorchScriptImageTokenizer(spec, arg, **options)
    if family == "patch":
        if not arg.isdigit():
            raise TokenizerSpecError(f"patch spec needs a size: patch:16, not {spec!r}")
        from transforms.tokenizers.patches import PatchTokenizer

        return PatchTokenizer(spec, int(arg))
    if family in ("vq", "pca") and arg:
        from transforms.tokenizers.codebook import PCATokenizer, VQTokenizer

        return VQTokenizer(spec, arg) if family == "vq" else PCATokenizer(spec, arg)
    raise TokenizerSpecError(f"unknown image tokenizer spec {spec!r}: expected one of {', '.join(IMAGE_SPECS)}")


@functools.lru_cache(maxsize=8)
def shared_image_tokenizer(spec: str, options: tuple[tuple[str, Any], ...] = ()):
    """One image tokenizer per process, spec and options (see shared_text_tokenizer)."""
    return load_image_tokenizer(spec, **dict(options))


VIDEO_SPECS = ("patch:T,P", "vq:PATH_OR_URI", "pca:PATH_OR_URI", "torchscript:PATH_OR_URI")


def load_video_tokenizer(spec: str, **options):
    """Load a video tokenizer from its spec; raises TokenizerSpecError with a one-line reason.

    `options` (device, dtype, batch_size, pad_multiple, temporal_factor, vocab_size) apply to torchscript: only.
    """
    family, _, arg = spec.partition(":")
    if family == "torchscript" and arg:
        from transforms.tokenizers.torchscript import TorchScriptVideoTokenizer

        return TorchScriptVideoTokenizer(spec, arg, **options)
    if family == "patch":
        t, comma, p = arg.partition(",")
        if not (comma and t.isdigit() and p.isdigit()):
            raise TokenizerSpecError(f"video patch spec needs frames and size: patch:2,16, not {spec!r}")
        from transforms.tokenizers.patches import VideoPatchTokenizer

        return VideoPatchTokenizer(spec, int(t), int(p))
    if family in ("vq", "pca") and arg:
        from transforms.tokenizers.codebook import VideoPCATokenizer, VideoVQTokenizer

        return VideoVQTokenizer(spec, arg) if family == "vq" else VideoPCATokenizer(spec, arg)
    raise TokenizerSpecError(f"unknown video tokenizer spec {spec!r}: expected one of {', '.join(VIDEO_SPECS)}")


@functools.lru_cache(maxsize=8)
def shared_video_tokenizer(spec: str, options: tuple[tuple[str, Any], ...] = ()):
    """One video tokenizer per process, spec and options (see shared_text_tokenizer)."""
    return load_video_tokenizer(spec, **dict(options))
