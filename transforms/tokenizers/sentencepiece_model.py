"""Raw SentencePiece models: `sentencepiece:PATH_OR_URI` names a `.model` file (extra `tokenmill[sentencepiece]`).

IDs equal `SentencePieceProcessor(model_file=PATH).encode(text)`: the model's
own normalisation and byte fallback, no BOS/EOS. Sampling (`enable_sampling`,
subword regularisation) draws a new segmentation on every call, so a dataset's
IDs would not follow from its text: there is no option for it.

--bos/--eos add the model's bos_id/eos_id; a model trained without one
(bos_id=-1) cannot meet the policy, a usage error. The control and unknown
pieces are the special tokens; a literal `<s>` in a document is text, as
SentencePiece itself encodes it. Fingerprint: the model file's sha256.
"""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np

from tokenmill.schemas.storage import read_bytes
from tokenmill.transforms.tokenizers import spans
from tokenmill.transforms.tokenizers.base import TextTokenizer, TokenizerSpecError


class SentencePieceTokenizer(TextTokenizer):
    def __init__(self, spec: str, uri: str, *, bos: bool = False, eos: bool = False):
        super().__init__(spec, bos=bos, eos=eos)
        import sentencepiece

        try:
            contents = read_bytes(uri)
        except FileNotFoundError:
            raise TokenizerSpecError(f"sentencepiece:{uri}: no such file") from None
        except OSError as e:
            raise TokenizerSpecError(f"sentencepiece:{uri}: cannot read it: {e}") from None
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=contents)
        except Exception as e:
            raise TokenizerSpecError(f"sentencepiece:{uri}: not a SentencePiece model "
                                     f"({type(e).__name__}: {str(e).strip()[:160]})") from None
        sp = self._sp
        self._sha256 = hashlib.sha256(contents).hexdigest()
        self.name = uri.rstrip("/").rsplit("/", 1)[-1].removesuffix(".model")
        self.vocab_size = sp.get_piece_size()
        self.special_tokens = {sp.id_to_piece(i): i for i in range(self.vocab_size)
                               if sp.is_control(i) or sp.is_unknown(i)}
        self.bos_token = sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None
        self.eos_token = sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None
        _ = self.bos_id, self.eos_id  # fail at load time if the policy cannot be met
        self._names = {i: t for t, i in self.special_tokens.items()}

    def _identity(self) -> dict[str, Any]:
        return {"family": "sentencepiece", "model_sha256": self._sha256}

    def _encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.uint32)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of the IDs, control and unknown pieces written as their names (SentencePiece drops them)."""
        out: list[str] = []
        run: list[int] = []
        for i in map(int, ids):
            if i in self._names:
                out.append(self._sp.decode(run) if run else "")
                out.append(self._names[i])
                run = []
            else:
                run.append(i)
        out.append(self._sp.decode(run) if run else "")
        return "".join(out)

    def token_bytes(self, token_id: int) -> bytes:
        """The piece's own bytes: `<0xE4>` byte pieces as that byte, ▁ as the space it stands for."""
        token_id = int(token_id)
        if token_id in self._names:
            return self._names[token_id].encode("utf-8")
        piece = self._sp.id_to_piece(token_id)
        if self._sp.is_byte(token_id):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("▁", " ").encode("utf-8")

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """From SentencePiece's byte offsets of each piece (see TextTokenizer.token_spans)."""
        proto = self._sp.encode(text, return_type="proto")
        data = spans.utf8(text)
        pieces = [self.token_bytes(p.id) for p in proto.pieces]
        exact = spans.spans_of_pieces(data, pieces)
        if exact is not None:
            return exact
        return spans.refine(spans.tile([(p.begin, p.end) for p in proto.pieces], len(data)), pieces, data)

    def token_pieces(self, ids: Sequence[int]) -> list[bytes]:
        return self._pieces_by_reencoding(ids)


def load(spec: str, arg: str, modality: str, *, bos: bool = False, eos: bool = False) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(spec, arg, bos=bos, eos=eos)


def _family():
    from tokenmill.transforms.registry import TokenizerFamily
    from tokenmill.transforms.tokenizers.base import text_policy_options

    return TokenizerFamily("sentencepiece", ("text",), ("sentencepiece:PATH_OR_URI",), loader=f"{__name__}:load",
                           options=text_policy_options(), extra="sentencepiece", requires=("sentencepiece",))


FAMILY = _family()
