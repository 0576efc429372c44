"""TokenReader as a torch IterableDataset, and a collate_fn for its unpacked samples (needs the `torch` extra)."""
from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import IterableDataset

from tokenmill.loaders.dataset import TokenReader


def _to_torch(sample: Any, latent_dtype: str | None) -> Any:
    import torch

    if isinstance(sample, np.ndarray):
        return torch.from_numpy(sample)
    out = dict(sample)
    if "tokens" in out:
        out["tokens"] = torch.from_numpy(out["tokens"])
    if "latents" in out:
        t = torch.from_numpy(np.ascontiguousarray(out["latents"]))
        out["latents"] = t.view(torch.bfloat16) if latent_dtype == "bfloat16" else t
    if "grid" in out:
        out["grid"] = torch.tensor(out["grid"], dtype=torch.int64)
    return out


class TorchTokenDataset(IterableDataset):
    """TokenReader as a torch IterableDataset: tensors out (int64 tokens; latents in their dtype).

    Splits across DataLoader workers and distributed ranks by itself; with
    torchdata's StatefulDataLoader, state_dict/load_state_dict resume mid-epoch.
    """

    def __init__(self, root: str, **kwargs: Any) -> None:
        self.reader = TokenReader(root, **kwargs)

    def __iter__(self):
        latent_dtype = self.reader.manifest.tokenizer.get("latent_dtype")
        samples = iter(self.reader)  # now, not at the first next(): see TokenReader.__iter__
        return (_to_torch(sample, latent_dtype) for sample in samples)

    def set_epoch(self, epoch: int) -> None:
        self.reader.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.reader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reader.load_state_dict(state)


def collate_variable(batch: list[dict[str, Any]], pad_id: int = 0) -> dict[str, Any]:
    """A DataLoader collate_fn for unpacked samples, whose lengths differ.

    "tokens" become an int64 (B, L) tensor padded at the end with `pad_id` to the longest sample;
    "latents" a (B, N, dim) tensor in their dtype, padded with zeros. "lengths" (int64, (B,)) holds each
    sample's true length and "attention_mask" (bool, (B, L) or (B, N)) is True on real positions.
    Every other field ("id", "grid", metadata from `fields=`) becomes a list, one value per sample.
    Packed windows (seq_len) all have one length: the default collate stacks them.
    """
    import torch

    payload = "tokens" if "tokens" in batch[0] else "latents"
    values = [torch.as_tensor(s[payload]) for s in batch]
    lengths = torch.tensor([len(v) for v in values], dtype=torch.int64)
    longest = int(lengths.max())
    padded = torch.full((len(values), longest, *values[0].shape[1:]), pad_id if payload == "tokens" else 0,
                        dtype=values[0].dtype)
    for i, v in enumerate(values):
        padded[i, : len(v)] = v
    out: dict[str, Any] = {payload: padded, "lengths": lengths,
                           "attention_mask": torch.arange(longest) < lengths[:, None]}
    for name in batch[0]:
        if name != payload:
            out[name] = [s[name] for s in batch]
    return out
