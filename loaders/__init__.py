"""The training-side reader of tokenmill datasets (no Beam; torch only for TorchTokenDataset and collate_variable)."""
from tokenmill.loaders.dataset import DatasetMismatchError, TokenReader
from tokenmill.loaders.latents import LatentFormat, latents_to_array, latents_to_arrays

__all__ = ["DatasetMismatchError", "LatentFormat", "TokenReader", "TorchTokenDataset", "collate_variable",
           "latents_to_array", "latents_to_arrays"]


def __getattr__(name: str):
    if name in ("TorchTokenDataset", "collate_variable"):  # imported on first use: torch is heavy and optional
        from tokenmill.loaders import torch_dataset

        return getattr(torch_dataset, name)
    raise AttributeError(name)
