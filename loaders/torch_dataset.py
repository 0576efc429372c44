"""TokenReader as a torch IterableDataset (needs the `torch` extra)."""
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
