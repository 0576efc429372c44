"""A tokenizer whose library is not installed: it loads, but cannot encode anything.

Like a plain install whose tokenizer imports an undeclared dependency at
encode time (pyarrow's to_pandas_dtype without pandas, as once happened).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tokenmill.transforms.registry import TokenizerFamily
from tokenmill.transforms.tokenizers.base import TextTokenizer, text_policy_options


class NeedsMissing(TextTokenizer):
    name = "needs-missing"
    special_tokens: dict[str, int] = {}
    vocab_size = 256

    def _identity(self) -> dict[str, Any]:
        return {"family": "needs-missing", "version": 1}

    def _encode(self, text: str) -> np.ndarray:
        import tokenmill_test_dependency_that_is_not_installed  # noqa: F401

        return np.zeros(0, np.uint32)

    def decode(self, ids):
        return ""


def load(spec: str, arg: str, modality: str, *, bos: bool = False, eos: bool = False) -> NeedsMissing:
    return NeedsMissing(spec, bos=bos, eos=eos)


FAMILY = TokenizerFamily("needs-missing", ("text",), ("needs-missing",), loader=f"{__name__}:load",
                         options=text_policy_options(), bare=True)
