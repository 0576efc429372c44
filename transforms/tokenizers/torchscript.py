"""`torchscript:PATH_OR_URI`: any TorchScript image or video encoder (extra: tokenmill[torch]).

The Cosmos Tokenizer interface is the contract (transforms/tokenizers/neural.py,
which holds everything the neural families share). A discrete encoder declares
its vocabulary with a `vocab_size` (or `codebook_size`) attribute, or the
--vocab-size option. The model is loaded with torch.jit.load (TorchScript, not
pickle) once per worker process.

TorchScript is deprecated from torch 2.13 (torch.jit.load warns); `export:`
(transforms/tokenizers/exported.py) loads the torch.export programs that
replace it, with the same interface and options.
"""
from __future__ import annotations

import io
import warnings
from typing import Any

from tokenmill.transforms.tokenizers.base import TokenizerSpecError
from tokenmill.transforms.tokenizers.neural import (DTYPES, EncoderModel, NeuralImageTokenizer,  # noqa: F401
                                                    NeuralVideoTokenizer, load_family, neural_options)


class TorchScriptModel(EncoderModel):
    family, what = "torchscript", "TorchScript model"

    def _load(self, data: bytes):
        import torch

        try:
            with warnings.catch_warnings():  # the deprecation is said once, in the docs, not per worker
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", FutureWarning)
                model = torch.jit.load(io.BytesIO(data), map_location=self.device).eval()
        except Exception as e:
            raise TokenizerSpecError(f"cannot load TorchScript model {self.uri}: "
                                     f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
                                     ) from None
        if self.dtype != "fp32":
            model = model.to(self.torch_dtype)  # weights and input in the same dtype
        return model

    def _declared_vocab_size(self) -> int | None:
        return next((int(getattr(self.model, a)) for a in ("vocab_size", "codebook_size")
                     if hasattr(self.model, a)), None)


class TorchScriptImageTokenizer(NeuralImageTokenizer):
    model_class = TorchScriptModel


class TorchScriptVideoTokenizer(NeuralVideoTokenizer):
    model_class = TorchScriptModel


def load(spec: str, arg: str, modality: str, **options: Any):
    return load_family(TorchScriptImageTokenizer, TorchScriptVideoTokenizer, spec, arg, modality, **options)


def _family():
    from tokenmill.transforms.registry import TokenizerFamily

    return TokenizerFamily("torchscript", ("image", "video"), ("torchscript:PATH_OR_URI",),
                           loader=f"{__name__}:load", options=neural_options(), extra="torch", requires=("torch",))


FAMILY = _family()
